"""The answering policy that every front end applies (the API, the UI and eval), so the same
question in the same mode gets the same prompt, and the same answer, whichever one asks it.

- Prompt limit: `serve.max_prompt_tokens`, and one token less than `engine.max_model_len` so an
  answer has room for at least one token. Retrieved passages are dropped, lowest-scored first,
  until the templated prompt fits (core.answer.Answerer.prepare); a conversation or raw prompt
  that does not fit on its own is refused (PromptTooLong).
- New tokens: what was asked, at most `serve.max_new_tokens` and the room the prompt leaves in
  `engine.max_model_len`, and at least 1. An answer that runs out of that room ends with
  finish_reason "length", which tells the caller.
- Admission: at most `serve.max_concurrency` requests do model work at once (retrieval,
  tokenizing, embedding, generating); up to `serve.max_queue` more wait in arrival order, and
  beyond that a request is refused (Busy) and told to retry after RETRY_AFTER_S seconds.
"""
from __future__ import annotations

import asyncio
import dataclasses
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from kinject.core.engines import SamplingParams
from kinject.core.errors import KinjectError
from kinject.core.settings import Settings

RETRY_AFTER_S = 1


class PromptTooLong(KinjectError):
    def __init__(self, tokens: int, limit: int):
        super().__init__(
            f"the prompt has {tokens} tokens after the chat template, more than the limit of {limit} "
            "(serve.max_prompt_tokens): shorten the conversation"
        )
        self.tokens, self.limit = tokens, limit


class Busy(KinjectError):
    """Every slot is taken and the queue is full."""

    def __init__(self, active: int, waiting: int):
        super().__init__(f"the server is busy: {active} requests running and {waiting} waiting (serve.max_queue); retry later")
        self.active, self.waiting = active, waiting
        self.retry_after_s = RETRY_AFTER_S


# ---- prompt and answer length -------------------------------------------------------------------
def prompt_limit(settings: Settings) -> int:
    """The most tokens a templated prompt may have."""
    return min(settings.serve.max_prompt_tokens, settings.engine.max_model_len - 1)


def check_prompt(tokens: int, settings: Settings) -> None:
    """Refuse a prompt of `tokens` tokens that is over the limit (PromptTooLong)."""
    limit = prompt_limit(settings)
    if tokens > limit:
        raise PromptTooLong(tokens, limit)


def new_tokens(wanted: int, prompt_tokens: int, settings: Settings) -> int:
    """How many tokens an answer after a prompt of `prompt_tokens` tokens may add."""
    room = settings.engine.max_model_len - prompt_tokens
    return max(1, min(wanted, settings.serve.max_new_tokens, room))


def fit_answer(params: SamplingParams, prompt_tokens: int, settings: Settings) -> SamplingParams:
    """A copy of `params` whose max_new_tokens is clamped by `new_tokens`."""
    return dataclasses.replace(params, max_new_tokens=new_tokens(params.max_new_tokens, prompt_tokens, settings))


# ---- admission ----------------------------------------------------------------------------------
class Slot:
    """One admitted request's hold on a slot. Released once, by whoever holds it last: the route,
    or the streamed response it was passed on to."""

    def __init__(self, release: Callable[[], None]):
        self._release: Callable[[], None] | None = release

    def pass_on(self) -> "Slot":
        """Hand the hold to a streamed response; leaving the route's `async with` keeps it."""
        release, self._release = self._release, None
        assert release is not None, "the slot was already released"
        return Slot(release)

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class Slots:
    """The slots of one event loop's front ends: the API and the UI mounted beside it share one."""

    def __init__(self, max_concurrency: int, max_queue: int):
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self._sem = asyncio.Semaphore(max_concurrency)
        self.waiting = 0
        self.active = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> "Slots":
        return cls(settings.serve.max_concurrency, settings.serve.max_queue)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        """Wait in the queue for a slot (Busy when the queue is full); released on leaving unless
        passed on."""
        if self.active >= self.max_concurrency and self.waiting >= self.max_queue:
            raise Busy(self.active, self.waiting)
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        held = Slot(self._release)
        try:
            yield held
        finally:
            held.release()

    def _release(self) -> None:
        self.active -= 1
        self._sem.release()
