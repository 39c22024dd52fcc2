"""OpenAI-compatible HTTP backend: a kinject or vLLM server, or any endpoint that speaks the API.

Requests go through the official `openai` client: `messages` to /v1/chat/completions, `prompt` to
/v1/completions. `generate` sends up to `engine.openai_max_concurrency` requests at a time (the same
bound covers concurrent `stream` calls). Failed calls are retried with exponential backoff
(`engine.openai_retry_backoff_s`, doubling) on 429, 5xx, timeouts and connection errors, never on
other 4xx, at most `engine.openai_max_retries` times; then EndpointUnavailable names the URL.
Several endpoints (`engine.openai_base_urls`) are one engine in openai_fleet.py.

Adapters: the endpoint serves them, so an adapter is a served model name. `add_adapter(name, x)`
maps `name` to `x` when `x` is a model name (`kinject-ft` on a kinject server, the LoRA module
name on a vLLM server); when `x` is a local adapter folder, which cannot be uploaded, the endpoint
is expected to serve that adapter under `name` (as `vllm serve --lora-modules name=folder` does).

Scoring (`loglikelihood`, `prompt_logprobs`) uses /v1/completions with `echo=True, logprobs=N,
max_tokens=1` (what lm-evaluation-harness sends; vLLM and kinject servers accept it) and picks the
prompt's tokens by their character offsets (`text_offset`). Hosted OpenAI models no longer offer
echo with logprobs; there the scoring calls fail with the server's message.

Token counts: with a tokenizer available locally (the first of `engine.openai_model`, the model
reference given, `models.llm` that resolves without a download) counts are exact for that model;
otherwise `count_tokens` estimates len(text) / 4, the usual rule of thumb for English.
"""
from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property, partial
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from kinject.core.engines.base import (
    Engine,
    Generation,
    GenRequest,
    Progress,
    StreamChunk,
    TokenLogprob,
    render_prompt,
    wait_all,
)
from kinject.core.errors import KinjectError
from kinject.core.settings import Settings

T = TypeVar("T")


class OpenAIEngineError(KinjectError):
    pass


class EndpointUnavailable(OpenAIEngineError):
    """The endpoint did not answer after its retries (connection refused, timeouts, 429/5xx),
    as opposed to refusing the request itself (other 4xx)."""


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(self, settings: Settings, model_ref: str | None = None, base_url: str | None = None):
        """`base_url`: the endpoint, by default `engine.openai_base_url`."""
        import openai

        e = settings.engine
        base_url = base_url or e.openai_base_url
        if not base_url:
            raise OpenAIEngineError(
                "the openai engine needs an endpoint: set engine.openai_base_url (e.g. http://127.0.0.1:8000/v1)"
            )
        self.settings = settings
        self.base_url = base_url.rstrip("/")
        self.model = e.openai_model or model_ref or settings.models.llm
        self.max_retries = e.openai_max_retries
        self.backoff_s = e.openai_retry_backoff_s
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key=e.openai_api_key.get_secret_value() or "unused",
            timeout=e.openai_timeout_s,
            max_retries=0,  # retried here: the client's own policy also retries 408/409
        )
        self._slots = threading.BoundedSemaphore(e.openai_max_concurrency)
        self._pool = ThreadPoolExecutor(e.openai_max_concurrency, thread_name_prefix="kinject-openai")
        self._served: dict[str, str] = {}
        self._tokenizer_refs = [e.openai_model, model_ref, settings.models.llm]

    @cached_property
    def tokenizer(self):
        """A local tokenizer for the served model, or None (loaded on first use)."""
        return _local_tokenizer(self._tokenizer_refs, self.settings)

    # ---- prompts, tokens, adapters -------------------------------------------------------
    def render(self, request: GenRequest) -> str:
        """The text the endpoint will read, as far as it can be known here (for token counts)."""
        return render_prompt(self.tokenizer, request)

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return (len(text) + 3) // 4
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def add_adapter(self, name: str, path: Path | str) -> None:
        self._served[name] = name if Path(path).is_dir() else str(path)

    @property
    def adapters(self) -> list[str]:
        return list(self._served)

    def model_for(self, adapter: str | None) -> str:
        """The served model name a request for `adapter` goes to; KeyError for an unknown adapter."""
        if adapter is None:
            return self.model
        if adapter not in self._served:
            loaded = ", ".join(self._served) or "none is loaded"
            raise KeyError(f"unknown adapter {adapter!r}; loaded: {loaded}")
        return self._served[adapter]

    # ---- HTTP with bounded concurrency and retries ----------------------------------------
    def _call(self, what: str, fn: Callable[[], T], hold_slot: bool = True) -> T:
        import openai

        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with self._slots if hold_slot else contextlib.nullcontext():
                    return fn()
            except openai.APIStatusError as err:
                if err.status_code != 429 and err.status_code < 500:
                    raise OpenAIEngineError(
                        f"{self.base_url} refused the {what} request ({err.status_code}): {_message(err)}"
                    ) from err
                last = err
            except openai.APIConnectionError as err:  # includes timeouts
                last = err
        detail = f"{last.status_code}: {_message(last)}" if isinstance(last, openai.APIStatusError) else str(last)
        raise EndpointUnavailable(
            f"{self.base_url} did not answer the {what} request after {self.max_retries + 1} attempts ({detail})"
        ) from last

    def _sampling(self, request: GenRequest) -> dict:
        p = request.params
        kw: dict = {"model": self.model_for(request.adapter), "max_tokens": p.max_new_tokens}
        if p.greedy:
            kw["temperature"] = 0.0
        else:
            kw.update(temperature=p.temperature, top_p=p.top_p)
            if p.seed is not None:
                kw["seed"] = p.seed
        if p.stop:
            kw["stop"] = list(p.stop)
        return kw

    # ---- generation ----------------------------------------------------------------------
    def _generate_one(self, request: GenRequest) -> Generation:
        kw = self._sampling(request)
        if request.messages is not None:
            resp = self._call("chat", lambda: self.client.chat.completions.create(messages=request.messages, **kw))
            choice = resp.choices[0]
            text = choice.message.content or ""
        else:
            resp = self._call("completion", lambda: self.client.completions.create(prompt=request.prompt, **kw))
            choice = resp.choices[0]
            text = choice.text or ""
        usage = resp.usage
        prompt_tokens = usage.prompt_tokens if usage else self.count_tokens(self.render(request))
        completion_tokens = usage.completion_tokens if usage else self.count_tokens(text)
        finish = "length" if choice.finish_reason == "length" else "stop"
        return Generation(text, prompt_tokens, completion_tokens, finish, endpoint=self.base_url)

    def submit(self, request: GenRequest) -> Future:
        """One generation started on this endpoint's threads (a Future of a Generation)."""
        return self._pool.submit(self._generate_one, request)

    def generate(self, requests: list[GenRequest], progress: Progress | None = None, cancel: threading.Event | None = None) -> list[Generation]:
        """`cancel` drops the requests not yet sent; those in flight finish (a plain HTTP call
        cannot be stopped halfway), and Cancelled is raised."""
        for r in requests:
            self.model_for(r.adapter)  # unknown adapters fail before anything is sent
        futures = [self.submit(r) for r in requests]
        try:
            wait_all(futures, cancel, progress)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        return [f.result() for f in futures]

    def stream(self, request: GenRequest, cancel: threading.Event | None = None) -> Iterator[StreamChunk]:
        """Deltas as the endpoint sends them; `cancel` is checked between deltas and closes the
        connection, which stops generation on servers that watch for disconnects."""
        kw = self._sampling(request)
        kw.update(stream=True, stream_options={"include_usage": True})
        chat = request.messages is not None
        # Retries cover opening the stream; once text has arrived a failure is raised as is.
        with self._slots:
            if chat:
                open_ = partial(self.client.chat.completions.create, messages=request.messages, **kw)
            else:
                open_ = partial(self.client.completions.create, prompt=request.prompt, **kw)
            events = self._call("chat" if chat else "completion", open_, hold_slot=False)
            text, finish, usage = "", None, None
            with events:  # closes the connection also when the consumer stops early
                for event in events:
                    if event.usage is not None:
                        usage = event.usage
                    if not event.choices:
                        continue
                    choice = event.choices[0]
                    delta = (choice.delta.content if chat else choice.text) or ""
                    finish = choice.finish_reason or finish
                    if delta:
                        text += delta
                        yield StreamChunk(delta)
                    if cancel is not None and cancel.is_set():
                        break
        prompt_tokens = usage.prompt_tokens if usage else self.count_tokens(self.render(request))
        completion_tokens = usage.completion_tokens if usage else self.count_tokens(text)
        yield StreamChunk("", "length" if finish == "length" else "stop", prompt_tokens, completion_tokens)

    # ---- scoring -------------------------------------------------------------------------
    def _echo(self, text: str, adapter: str | None, top: int) -> list[tuple[str, int, float | None, dict]]:
        """(token, char offset, logprob, top logprobs) for each token of `text` as the endpoint
        tokenizes it; the one generated token is dropped."""
        model = self.model_for(adapter)
        resp = self._call(
            "scoring",
            lambda: self.client.completions.create(
                model=model, prompt=text, echo=True, logprobs=max(top, 1), max_tokens=1, temperature=0.0
            ),
        )
        lp = resp.choices[0].logprobs
        if lp is None or lp.text_offset is None or lp.token_logprobs is None:
            raise OpenAIEngineError(f"{self.base_url} returned no prompt logprobs for an echo request (model {model})")
        tops = lp.top_logprobs or [None] * len(lp.tokens)
        rows = zip(lp.tokens, lp.text_offset, lp.token_logprobs, tops)
        return [(tok, off, logprob, top_ or {}) for tok, off, logprob, top_ in rows if off < len(text)]

    def _scored(self, texts: list[str], adapter: str | None, top: int) -> list:
        futures = [self._pool.submit(self._echo, t, adapter, top) for t in texts]
        return [f.result() for f in futures]

    def loglikelihood(self, pairs: list[tuple[str, str]], adapter: str | None = None) -> list[tuple[float, bool]]:
        # As lm-evaluation-harness does: trailing spaces of the context belong to the continuation.
        split = [(ctx.rstrip(" "), ctx[len(ctx.rstrip(" ")) :] + cont) for ctx, cont in pairs]
        for ctx, cont in split:
            if not ctx or not cont:
                raise OpenAIEngineError("log-likelihood over HTTP needs a non-empty context and continuation")
        scored = self._scored([ctx + cont for ctx, cont in split], adapter, top=1)
        out = []
        for (ctx, cont), rows in zip(split, scored):
            total, greedy = 0.0, True
            for i, (_, offset, logprob, top) in enumerate(rows):
                end = rows[i + 1][1] if i + 1 < len(rows) else len(ctx) + len(cont)
                if end <= len(ctx):
                    continue  # a context token; one straddling the boundary counts as continuation
                if logprob is None:
                    raise OpenAIEngineError(f"{self.base_url} gave no logprob for a continuation token")
                total += logprob
                greedy = greedy and (not top or logprob >= max(top.values()) - 1e-6)
            out.append((total, greedy))
        return out

    def prompt_logprobs(self, texts: list[str], adapter: str | None = None, top: int = 0) -> list[list[TokenLogprob]]:
        todo = [t for t in texts if t]
        scored = dict(zip(todo, self._scored(todo, adapter, top)))
        return [
            [TokenLogprob(tok, logprob, dict(top_) if top and logprob is not None else {}) for tok, _, logprob, top_ in scored[t]]
            if t
            else []
            for t in texts
        ]

    @property
    def endpoints(self) -> dict[str, str]:
        """endpoint URL -> "live" or "dead" (one endpoint is never marked dead: its errors are raised)."""
        return {self.base_url: "live"}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(err, "message", err))


def _local_tokenizer(refs: list[str | None], settings: Settings):
    """A tokenizer for the first reference available on this machine without a download."""
    from kinject.core.models import BUNDLED, load_tokenizer, resolve_model

    for ref in dict.fromkeys(r for r in refs if r):
        try:
            if ref in BUNDLED or Path(ref).expanduser().exists():
                return load_tokenizer(resolve_model(ref, settings))
            from huggingface_hub import snapshot_download

            return load_tokenizer(Path(snapshot_download(ref, local_files_only=True)))
        except Exception:
            continue
    return None
