"""The UI's answering path, shared by the chat and compare tabs: the request is prepared by the
Answerer under the answering policy (core.policy), as the API and eval prepare it, and generated
in one of the slots the API also uses."""
from __future__ import annotations

import threading
from contextlib import aclosing

import anyio

from kinject.core.answer import Answerer, Prepared
from kinject.core.engines import SamplingParams
from kinject.core.policy import Slots
from kinject.core.settings import Settings
from kinject.service.streaming import in_thread


def sampling(settings: Settings) -> SamplingParams:
    """Greedy answers, so the same question gives the same answer in chat, compare and eval."""
    return SamplingParams(max_new_tokens=settings.serve.max_new_tokens, temperature=0.0, seed=settings.seed)


async def prepare(answerer: Answerer, settings: Settings, mode: str, conversation: list[dict]) -> Prepared:
    """Retrieve and build the request under the answering policy, so sources are known before
    the first token; in a worker thread."""
    return await anyio.to_thread.run_sync(lambda: answerer.prepare(mode, conversation, sampling(settings)))


async def generate(answerer: Answerer, slots: Slots, prepared: Prepared):
    """The answer's chunks, generated in one of the service's slots (Busy when the queue is full).
    Leaving early (stop pressed, page closed) cancels the generation and frees the slot."""
    cancel = threading.Event()
    async with slots.slot():
        async with aclosing(in_thread(answerer.stream_prepared(prepared, cancel), cancel)) as chunks:
            async for chunk in chunks:
                yield chunk
