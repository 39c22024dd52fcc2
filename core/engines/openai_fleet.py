"""Several OpenAI-compatible endpoints serving the same model (a fleet of vLLM or kinject servers) as one engine.

`engine.openai_base_urls` lists them; each is an OpenAIEngine with its own client, retries and
`engine.openai_max_concurrency` slots. `generate` hands each request to the live endpoint with the
fewest requests in flight, so all of them work at once and a faster one takes more. An endpoint
that still fails after its retries (connection refused, timeouts, 429/5xx: EndpointUnavailable) is
dead for the rest of this engine's life, and the requests it held go to the others; a request the
endpoint refused (another 4xx) fails the call as on one endpoint. Only when every endpoint is dead
does a call fail, with an error naming each URL and its last error.

Each request carries its own seed, and the answer says which endpoint gave it (`Generation.endpoint`),
so callers that resume by key (augment) work as on one endpoint.

Streaming and scoring go to the first live endpoint, moving on when it is down (a stream only
before its first text: what was sent cannot be taken back). Token counts, prompt rendering and
adapters are those of one endpoint: every endpoint is expected to serve the same model and names.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from kinject.core.engines.base import Cancelled, Engine, Generation, GenRequest, Progress, StreamChunk, TokenLogprob
from kinject.core.engines.openai_engine import EndpointUnavailable, OpenAIEngine, OpenAIEngineError
from kinject.core.settings import Settings

T = TypeVar("T")
log = logging.getLogger("kinject.engine")


class OpenAIFleetEngine(Engine):
    name = "openai"

    def __init__(self, settings: Settings, model_ref: str | None = None):
        urls = settings.engine.openai_base_urls
        if not urls:
            raise OpenAIEngineError("engine.openai_base_urls is empty: list the endpoints, or set engine.openai_base_url for one")
        self._fleet = [OpenAIEngine(settings, model_ref, base_url=url) for url in urls]
        self._slots = settings.engine.openai_max_concurrency
        self._dead: dict[str, str] = {}  # URL -> the error that ended it (which names the URL)
        self._lock = threading.Lock()

    @property
    def endpoints(self) -> dict[str, str]:
        """endpoint URL -> "live" or "dead" (dead ones stay dead for this engine's life)."""
        with self._lock:
            return {ep.base_url: "dead" if ep.base_url in self._dead else "live" for ep in self._fleet}

    def _live(self) -> list[OpenAIEngine]:
        with self._lock:
            return [ep for ep in self._fleet if ep.base_url not in self._dead]

    def _mark_dead(self, ep: OpenAIEngine, err: Exception) -> None:
        with self._lock:
            if ep.base_url in self._dead:
                return
            self._dead[ep.base_url] = str(err)
            left = len(self._fleet) - len(self._dead)
        log.warning("endpoint %s is down (%s); %d of %d endpoints left for this run", ep.base_url, err, left, len(self._fleet))

    def _all_dead(self) -> OpenAIEngineError:
        with self._lock:
            causes = "; ".join(self._dead.values())  # each names its URL
        return OpenAIEngineError(f"every endpoint of engine.openai_base_urls is down: {causes}")

    # ---- generation ----------------------------------------------------------------------
    def generate(self, requests: list[GenRequest], progress: Progress | None = None, cancel: threading.Event | None = None) -> list[Generation]:
        """`cancel` drops the requests not yet sent; those in flight finish, and Cancelled is raised."""
        for r in requests:
            self._fleet[0].model_for(r.adapter)  # unknown adapters fail before anything is sent
        results: list[Generation | None] = [None] * len(requests)
        todo = deque(range(len(requests)))
        running: dict[Future, tuple[int, OpenAIEngine]] = {}
        load: Counter[str] = Counter()  # requests in flight per endpoint URL
        try:
            while todo or running:
                live = self._live()  # dead endpoints get nothing new
                while todo and live:
                    ep = min(live, key=lambda e: load[e.base_url])
                    if load[ep.base_url] >= self._slots:
                        break
                    i = todo.popleft()
                    running[ep.submit(requests[i])] = (i, ep)
                    load[ep.base_url] += 1
                if not running:
                    raise self._all_dead()  # requests left and no endpoint to take them
                done, _ = wait(running, timeout=None if cancel is None else 0.05, return_when=FIRST_COMPLETED)
                for fut in done:
                    i, ep = running.pop(fut)
                    load[ep.base_url] -= 1
                    try:
                        results[i] = fut.result()
                    except EndpointUnavailable as err:
                        self._mark_dead(ep, err)
                        todo.appendleft(i)  # retried on the endpoints still live
                        continue
                    if progress:
                        progress(1)
                if (todo or running) and cancel is not None and cancel.is_set():
                    raise Cancelled()
        except BaseException:
            for fut in running:
                fut.cancel()
            raise
        return results  # type: ignore[return-value]  # every slot is filled once the loop ends

    def stream(self, request: GenRequest, cancel: threading.Event | None = None) -> Iterator[StreamChunk]:
        for ep in self._live():
            with contextlib.closing(ep.stream(request, cancel)) as chunks:
                try:
                    first = next(chunks)
                except EndpointUnavailable as err:
                    self._mark_dead(ep, err)
                    continue
                yield first
                yield from chunks
                return
        raise self._all_dead()

    # ---- scoring -------------------------------------------------------------------------
    def _on_first_live(self, fn: Callable[[OpenAIEngine], T]) -> T:
        for ep in self._live():
            try:
                return fn(ep)
            except EndpointUnavailable as err:
                self._mark_dead(ep, err)
        raise self._all_dead()

    def loglikelihood(self, pairs: list[tuple[str, str]], adapter: str | None = None) -> list[tuple[float, bool]]:
        return self._on_first_live(lambda ep: ep.loglikelihood(pairs, adapter))

    def prompt_logprobs(self, texts: list[str], adapter: str | None = None, top: int = 0) -> list[list[TokenLogprob]]:
        return self._on_first_live(lambda ep: ep.prompt_logprobs(texts, adapter, top))

    # ---- prompts, tokens, adapters: the same on every endpoint ---------------------------
    @property
    def tokenizer(self):
        return self._fleet[0].tokenizer

    def render(self, request: GenRequest) -> str:
        return self._fleet[0].render(request)

    def count_tokens(self, text: str) -> int:
        return self._fleet[0].count_tokens(text)

    def add_adapter(self, name: str, path: Path | str) -> None:
        for ep in self._fleet:
            ep.add_adapter(name, path)

    @property
    def adapters(self) -> list[str]:
        return self._fleet[0].adapters

    def close(self) -> None:
        for ep in self._fleet:
            ep.close()
