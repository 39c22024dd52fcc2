"""An asyncio event loop in a background thread, for an engine whose public methods block."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine


class EventLoopThread:
    """Runs a new event loop forever in a daemon thread (a forgotten one does not keep the
    process alive) until `stop()`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        """Schedule `coro` on the loop from any thread; cancelling the future cancels the task."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop and wait up to `timeout` seconds for its thread. The loop is closed only
        once the thread has ended: closing a loop that still runs a callback raises."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
