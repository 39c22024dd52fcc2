"""The transformers engine's stream on the bundled 135M model (the session's `engine`)."""
from __future__ import annotations

import threading

from core.engines import GenRequest, SamplingParams


class LookCountingEvent(threading.Event):
    """A cancel event that counts how often it is looked at. The transformers engine looks once per
    generated token (a stopping criterion), so the count when it is set is the tokens made so far."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0
        self.looks_when_set: int | None = None

    def is_set(self) -> bool:
        self.looks += 1
        return super().is_set()

    def set(self) -> None:
        super().set()  # first, so every look counted below saw it unset or was this one's last
        if self.looks_when_set is None:
            self.looks_when_set = self.looks


def test_cancel_stops_generation_within_one_token(engine):
    cancel = LookCountingEvent()
    stream = engine.stream(GenRequest(prompt="Write a long story:", params=SamplingParams(max_new_tokens=200)), cancel)
    next(stream), next(stream)
    cancel.set()
    last = list(stream)[-1]
    assert last.finish_reason == "stop"
    # At most the token being made when the cancel was set.
    assert 0 < cancel.looks_when_set <= last.completion_tokens <= cancel.looks_when_set + 1
