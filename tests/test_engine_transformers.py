"""The transformers engine's stream on the bundled 135M model (the session's `engine`)."""
from __future__ import annotations

from kinject.core.engines import GenRequest, SamplingParams
from tests.conftest import LookCountingEvent


def test_cancel_stops_generation_within_one_token(engine):
    cancel = LookCountingEvent()  # looked at once per token made
    stream = engine.stream(GenRequest(prompt="Write a long story:", params=SamplingParams(max_new_tokens=200)), cancel)
    next(stream), next(stream)
    cancel.set()
    last = list(stream)[-1]
    assert last.finish_reason == "stop"
    # At most the token being made when the cancel was set.
    assert 0 < cancel.looks_when_set <= last.completion_tokens <= cancel.looks_when_set + 1
