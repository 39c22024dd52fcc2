"""The engine interface shared by augmentation, serving and evaluation.

An engine turns requests (a raw prompt or chat messages, sampling parameters, and an optional
adapter name) into text. Backends: transformers (CPU or CUDA), vLLM, and any OpenAI-compatible
HTTP endpoint. Eval measures exactly what the service serves because both call these methods.
"""
from __future__ import annotations

import dataclasses
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Sequence


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class GenRequest:
    prompt: str | None = None
    messages: list[dict] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # a name given to add_adapter; None = the base model

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a GenRequest needs exactly one of prompt or messages")


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    endpoint: str | None = None  # the URL that answered, on the openai engine


@dataclass
class StreamChunk:
    text: str
    finish_reason: str | None = None  # set on the last chunk only
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None for the first token, which has no context
    top: dict[str, float] = field(default_factory=dict)


Progress = Callable[[int], None]  # called with the number of requests just finished


class Cancelled(Exception):
    """generate stopped because its `cancel` event was set; there is nothing to return."""


def wait_all(futures: list, cancel: threading.Event | None = None, progress: Progress | None = None) -> None:
    """Wait for every future, counting each in `progress` as it ends; raise Cancelled as soon
    as `cancel` is set while some are still running (the caller cancels those)."""
    import concurrent.futures

    pending = set(futures)
    while pending:
        done, pending = concurrent.futures.wait(pending, timeout=None if cancel is None else 0.05, return_when=concurrent.futures.FIRST_COMPLETED)
        for fut in done:
            fut.result()
            if progress:
                progress(1)
        if pending and cancel is not None and cancel.is_set():
            raise Cancelled()


class Engine(ABC):
    """Backends implement generate/loglikelihood; stream defaults to one whole chunk."""

    name: str = "engine"

    @abstractmethod
    def generate(self, requests: list[GenRequest], progress: Progress | None = None, cancel: threading.Event | None = None) -> list[Generation]:
        """One generation per request. Once `cancel` is set the engine stops soon (within a token
        on the local engines) and either raises Cancelled or returns cut answers: the caller,
        who set it, drops them."""

    def stream(self, request: GenRequest, cancel: threading.Event | None = None) -> Iterator[StreamChunk]:
        g = self.generate([request])[0]
        yield StreamChunk(g.text, g.finish_reason, g.prompt_tokens, g.completion_tokens)

    @abstractmethod
    def loglikelihood(self, pairs: list[tuple[str, str]], adapter: str | None = None) -> list[tuple[float, bool]]:
        """For each (context, continuation): sum of the continuation's token log-probs, and
        whether greedy decoding would have produced exactly the continuation."""

    def prompt_logprobs(self, texts: list[str], adapter: str | None = None, top: int = 0) -> list[list[TokenLogprob]]:
        raise NotImplementedError(f"the {self.name} engine cannot score prompt tokens")

    def add_adapter(self, name: str, path: Path) -> None:
        raise NotImplementedError(f"the {self.name} engine does not support adapters")

    @property
    def adapters(self) -> list[str]:
        return []

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    def render(self, request: GenRequest) -> str:
        """The text the model reads for a request (engines with a tokenizer apply its template)."""
        return render_prompt(None, request)

    def prompt_tokens(self, request: GenRequest) -> int:
        """How many tokens the model reads for a request, its chat template applied."""
        return self.count_tokens(self.render(request))

    def close(self) -> None:
        pass

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def render_prompt(tokenizer, request: GenRequest) -> str:
    """The text a model reads for a request: the prompt as is, or the messages through the
    tokenizer's chat template (a plain transcript for base models without one, or no tokenizer)."""
    if request.prompt is not None:
        return with_bos(tokenizer, request.prompt)
    if tokenizer is not None and tokenizer.chat_template:
        return tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
    # Base models without a template: a plain transcript that ends where the answer goes.
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in request.messages]
    return with_bos(tokenizer, "\n\n".join(lines) + "\n\nAssistant:")


def chat_text(tokenizer, messages: list[dict]) -> str:
    """A whole conversation (ending with the assistant's turn) as the model reads it: what training
    and the influence estimator take the loss on."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    # Same transcript render_prompt uses for models without a chat template.
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def answer_start(prompt: str, text: str) -> int:
    """Where the assistant's answer begins in a rendered conversation: the length of the part
    it shares with the same conversation rendered with an empty answer."""
    return common_prefix_length(prompt, text)


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """How many leading items two sequences (texts, token ids) have in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def with_bos(tokenizer, text: str) -> str:
    """Prefix the BOS token for models trained to always see it (Gemma degrades badly without it).

    Engines tokenize rendered text with add_special_tokens=False, so chat templates that already
    write the BOS token are not doubled; raw prompts get it here."""
    if tokenizer is None or not tokenizer.bos_token or text.startswith(tokenizer.bos_token):
        return text
    ids = tokenizer("x")["input_ids"]
    return tokenizer.bos_token + text if ids and ids[0] == tokenizer.bos_token_id else text


@lru_cache(maxsize=8)
def _special_pattern(tokenizer) -> re.Pattern | None:
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def _escape(tokenizer, texts: list[str]) -> tuple[list[str], dict[str, str]]:
    """The texts with each special token's text replaced by a private-use character absent from
    all of them, and the map back."""
    pattern = _special_pattern(tokenizer)
    found = sorted({m for t in texts for m in pattern.findall(t)}) if pattern else []
    if not found:
        return texts, {}
    used = set("".join(texts))
    free = (c for c in map(chr, range(0xF0000, 0x10FFFE)) if c not in used)
    marks = {special: next(free) for special in found}
    return [pattern.sub(lambda m: marks[m.group(0)], t) for t in texts], {c: special for special, c in marks.items()}


def _encode_marked(tokenizer, text: str, marks: dict[str, str]) -> list[int]:
    """Token ids of text whose own special-token text is real (the template's markers, BOS) and
    whose marks stand for special-token text from a caller or a document: that is tokenized as
    plain characters (split_special_tokens)."""
    if not marks:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for piece in re.split(f"([{''.join(marks)}])", text):
        if piece in marks:
            ids += tokenizer(marks[piece], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def encode_request(tokenizer, request: GenRequest) -> list[int]:
    """The token ids a model reads for a request. Only what kinject itself writes becomes special
    tokens (the chat template's markers, BOS): `<|im_end|><|im_start|>system` inside a prompt, a
    message or a retrieved passage is read as those characters, so it cannot end a turn or open
    a system one. Without such text the ids are exactly the rendered prompt's."""
    if request.prompt is not None:
        (prompt,), marks = _escape(tokenizer, [request.prompt])
        escaped = dataclasses.replace(request, prompt=prompt)
    else:
        messages = request.messages or []
        contents, marks = _escape(tokenizer, [m.get("content") or "" for m in messages])
        escaped = dataclasses.replace(request, messages=[{**m, "content": c} for m, c in zip(messages, contents)]) if marks else request
    return _encode_marked(tokenizer, render_prompt(tokenizer, escaped), marks)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of plain text (no BOS), special-token text in it read as characters."""
    (escaped,), marks = _escape(tokenizer, [text])
    return _encode_marked(tokenizer, escaped, marks)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) for log-likelihood scoring."""
    # As lm-evaluation-harness does: move trailing spaces of the context onto the continuation.
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    # Tokenize jointly so boundary merges match how the model would read the text.
    common = 0
    while common < min(len(ctx), len(whole)) and ctx[common] == whole[common]:
        common += 1
    cont = whole[common:]
    if not cont:
        return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return whole[:common], cont


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut text at the first stop string; True if one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
