"""transformers backend: one base model in memory, LoRA adapters attached with peft and switched
per request (no second copy of the weights), batched left-padded generation, token streaming."""
from __future__ import annotations

import threading
from itertools import groupby
from pathlib import Path
from typing import Iterator

import torch

from kinject.core.engines.base import (
    Cancelled,
    Engine,
    Generation,
    GenRequest,
    Progress,
    StreamChunk,
    TokenLogprob,
    encode_pair,
    encode_request,
    encode_text,
    render_prompt,
    truncate_at_stop,
)
from kinject.core.models import load_causal_lm
from kinject.core.settings import Settings


class _Cancelled:
    """StoppingCriteria that ends generation when the client has gone away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, settings: Settings, model_ref: str | None = None):
        self.settings = settings
        self.model_ref = model_ref or settings.models.llm
        self.model, self.tokenizer = load_causal_lm(self.model_ref, settings)
        self.device = self.model.device
        self.max_batch = settings.engine.max_batch_size
        self._lock = threading.RLock()  # the model serves one batch at a time
        self._adapters: dict[str, Path] = {}

    # ---- prompts -------------------------------------------------------------------------
    def render(self, request: GenRequest) -> str:
        return render_prompt(self.tokenizer, request)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(self, request: GenRequest) -> int:
        return len(encode_request(self.tokenizer, request))

    # ---- adapters ------------------------------------------------------------------------
    def add_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

        with self._lock:
            if name in self._adapters:
                self.model.delete_adapter(name)
                self.model.load_adapter(str(path), adapter_name=name)
            elif not self._adapters:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
                self.model.eval()
            else:
                self.model.load_adapter(str(path), adapter_name=name)
            self._adapters[name] = Path(path)

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def _use(self, adapter: str | None):
        """Context in which the model runs with `adapter` (None = the base weights)."""
        import contextlib

        if not self._adapters:
            if adapter is not None:
                raise KeyError(f"unknown adapter {adapter!r}; none is loaded")
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        if adapter not in self._adapters:
            raise KeyError(f"unknown adapter {adapter!r}; loaded: {', '.join(self._adapters)}")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    # ---- generation ----------------------------------------------------------------------
    def _gen_kwargs(self, request: GenRequest) -> dict:
        p = request.params
        kw: dict = {"max_new_tokens": p.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if p.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=0)
        if p.stop:
            kw.update(stop_strings=p.stop, tokenizer=self.tokenizer)
        return kw

    @staticmethod
    def _batch_key(r: GenRequest) -> tuple:
        p = r.params
        return (r.adapter or "", p.greedy, p.temperature, p.top_p, p.max_new_tokens, tuple(p.stop))

    def generate(self, requests: list[GenRequest], progress: Progress | None = None, cancel: threading.Event | None = None) -> list[Generation]:
        from transformers import StoppingCriteriaList

        results: list[Generation | None] = [None] * len(requests)
        # Similar lengths share a batch, so left padding wastes little (retrieved passages make
        # rag prompts vary by hundreds of tokens).
        prompts = [encode_request(self.tokenizer, r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: (self._batch_key(requests[i]), len(prompts[i])))
        stopping = StoppingCriteriaList([_Cancelled(cancel)]) if cancel is not None else None
        for _, group in groupby(order, key=lambda i: self._batch_key(requests[i])):
            idx = list(group)
            for start in range(0, len(idx), self.max_batch):
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                chunk = idx[start : start + self.max_batch]
                outs = self._generate_batch([requests[i] for i in chunk], [prompts[i] for i in chunk], stopping)
                for i, g in zip(chunk, outs):
                    results[i] = g
                if progress:
                    progress(len(chunk))
        return results  # type: ignore[return-value]

    def _left_padded(self, seqs: list[list[int]]) -> dict:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = [[pad] * (width - len(s)) + s for s in seqs]
        mask = [[0] * (width - len(s)) + [1] * len(s) for s in seqs]
        return {"input_ids": torch.tensor(ids, device=self.device), "attention_mask": torch.tensor(mask, device=self.device)}

    def _generate_batch(self, batch: list[GenRequest], prompts: list[list[int]], stopping=None) -> list[Generation]:
        enc = self._left_padded(prompts)
        seed = batch[0].params.seed
        kw = self._gen_kwargs(batch[0])
        if stopping is not None:
            kw["stopping_criteria"] = stopping
        with self._lock, self._use(batch[0].adapter), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**enc, **kw)
        new = out[:, enc["input_ids"].shape[1] :]
        gens = []
        for row, r, mask in zip(new, batch, enc["attention_mask"]):
            ids = row.tolist()
            ended = self.tokenizer.eos_token_id in ids or (self.tokenizer.pad_token_id in ids)
            ids = [t for t in ids if t not in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            text, stopped = truncate_at_stop(text, r.params.stop)
            n = len(ids)
            finish = "stop" if (ended or stopped or n < r.params.max_new_tokens) else "length"
            gens.append(Generation(text, int(mask.sum()), n, finish))
        return gens

    def stream(self, request: GenRequest, cancel: threading.Event | None = None) -> Iterator[StreamChunk]:
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        enc = self._left_padded([encode_request(self.tokenizer, request)])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = cancel or threading.Event()
        kw = self._gen_kwargs(request)
        kw.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]))
        holder: dict = {}

        def run() -> None:
            try:
                with self._lock, self._use(request.adapter), torch.inference_mode():
                    if request.params.seed is not None:
                        torch.manual_seed(request.params.seed)
                    holder["out"] = self.model.generate(**enc, **kw)
            except BaseException as e:  # surfaced to the consumer below
                holder["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text = ""
        stopped = False
        try:
            for piece in streamer:
                if stopped:
                    continue  # drain; generation ends at the stop string's last token
                candidate, stopped = truncate_at_stop(text + piece, request.params.stop)
                delta = candidate[len(text) :]
                text = candidate
                if delta:
                    yield StreamChunk(delta)
        finally:
            if thread.is_alive():
                cancel.set()
            thread.join()
        if "error" in holder:
            raise holder["error"]
        n_prompt = enc["input_ids"].shape[1]
        new = holder["out"][0, n_prompt:].tolist()
        eos = self.tokenizer.eos_token_id
        n = len([t for t in new if t != eos])
        finish = "stop" if (stopped or eos in new or n < request.params.max_new_tokens) else "length"
        yield StreamChunk("", finish, n_prompt, n)

    # ---- scoring -------------------------------------------------------------------------
    def loglikelihood(self, pairs: list[tuple[str, str]], adapter: str | None = None) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            c, k = encode_pair(self.tokenizer, ctx, cont)
            by_context.setdefault(tuple(c or [bos]), []).append((i, k))
        # A multiple-choice question's choices share one long context (with retrieved passages,
        # hundreds of tokens): it is run once and its cache reused for every choice.
        single: list[tuple[int, list[int], list[int]]] = []
        for c, group in by_context.items():
            if len(group) == 1:
                single.append((group[0][0], list(c), group[0][1]))
                continue
            for (i, _), score in zip(group, self._score_shared_context(list(c), [k for _, k in group], adapter)):
                out[i] = score
        for start in range(0, len(single), self.max_batch):
            chunk = single[start : start + self.max_batch]
            for (i, _, _), score in zip(chunk, self._score_batch([(c, k) for _, c, k in chunk], adapter)):
                out[i] = score
        return out  # type: ignore[return-value]

    def _score_batch(self, chunk: list[tuple[list[int], list[int]]], adapter: str | None) -> list[tuple[float, bool]]:
        seqs = [c + k for c, k in chunk]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=self.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
        with self._lock, self._use(adapter), torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        out = []
        for row, (c, k) in enumerate(chunk):
            lp = logp[row, len(c) - 1 : len(c) + len(k) - 1]
            out.append(_total_and_greedy(lp, torch.tensor(k, device=self.device)))
        return out

    def _score_shared_context(self, context: list[int], continuations: list[list[int]], adapter: str | None) -> list[tuple[float, bool]]:
        pad = self.tokenizer.pad_token_id
        width = max(len(k) for k in continuations)
        ids = torch.tensor([k + [pad] * (width - len(k)) for k in continuations], device=self.device)
        mask = torch.tensor([[1] * (len(context) + len(k)) + [0] * (width - len(k)) for k in continuations], device=self.device)
        with self._lock, self._use(adapter), torch.inference_mode():
            first = self.model(input_ids=torch.tensor([context], device=self.device), use_cache=True)
            cache = first.past_key_values
            cache.batch_repeat_interleave(len(continuations))
            logits = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits.float()
        last = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
        out = []
        for row, k in enumerate(continuations):
            # the first token follows the context's last position, the rest the continuation's own
            lp = torch.cat([last[None], logp[row, : len(k) - 1]])
            out.append(_total_and_greedy(lp, torch.tensor(k, device=self.device)))
        return out

    def prompt_logprobs(self, texts: list[str], adapter: str | None = None, top: int = 0) -> list[list[TokenLogprob]]:
        result = []
        for text in texts:
            ids = encode_text(self.tokenizer, text)
            tokens = [self.tokenizer.decode([t]) for t in ids]
            if not ids:
                result.append([])
                continue
            with self._lock, self._use(adapter), torch.inference_mode():
                logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits.float()
            logp = torch.log_softmax(logits[0], dim=-1)
            row = [TokenLogprob(tokens[0], None)]
            for i in range(1, len(ids)):
                tops = {}
                if top:
                    vals, idx = logp[i - 1].topk(top)
                    tops = {self.tokenizer.decode([j]): v for j, v in zip(idx.tolist(), vals.tolist())}
                row.append(TokenLogprob(tokens[i], logp[i - 1, ids[i]].item(), tops))
            result.append(row)
        return result


def _total_and_greedy(logp: torch.Tensor, target: torch.Tensor) -> tuple[float, bool]:
    """Sum of the target tokens' log-probabilities, and whether each was the argmax."""
    total = logp.gather(1, target[:, None]).sum().item()
    return total, bool((logp.argmax(-1) == target).all().item())
