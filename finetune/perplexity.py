"""Perplexity of texts under the base model or an adapter: how well the model knows a corpus."""
from __future__ import annotations

import math

import torch


def perplexity(engine_or_model, texts: list[str], adapter: str | None = None, tokenizer=None, max_len: int = 2048) -> float:
    """exp(mean token negative log-likelihood) over all texts, each read from its first token.

    `engine_or_model` is an Engine (scored through `prompt_logprobs`, so it measures what the
    service serves) or a transformers/peft model with its `tokenizer`. For a peft model,
    `adapter=None` scores the base weights and a name scores that adapter.
    """
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("perplexity needs at least one non-empty text")
    if tokenizer is None:
        return _engine_perplexity(engine_or_model, texts, adapter)
    return _model_perplexity(engine_or_model, tokenizer, texts, adapter, max_len)


def _engine_perplexity(engine, texts: list[str], adapter: str | None) -> float:
    total, count = 0.0, 0
    for row in engine.prompt_logprobs(texts, adapter=adapter):
        for tok in row:
            if tok.logprob is not None:
                total -= tok.logprob
                count += 1
    return math.exp(total / max(count, 1))


def _model_perplexity(model, tokenizer, texts: list[str], adapter: str | None, max_len: int) -> float:
    import contextlib

    if hasattr(model, "disable_adapter"):
        if adapter is None:
            ctx = model.disable_adapter()
        else:
            model.set_adapter(adapter)
            ctx = contextlib.nullcontext()
    elif adapter is not None:
        raise ValueError(f"the model has no adapters; cannot score with adapter {adapter!r}")
    else:
        ctx = contextlib.nullcontext()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with ctx, torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]
            if len(ids) < 2:
                continue
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
            total += nll.item()
            count += len(ids) - 1
    if was_training:
        model.train()
    return math.exp(total / max(count, 1))
