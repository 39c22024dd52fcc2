"""The transformers engine on the bundled 135M model: streaming, cancellation, and continuous
batching (concurrent requests of any adapter share decode steps and get what they get alone)."""
from __future__ import annotations

import threading

import pytest

from kinject.core.engines import GenRequest, SamplingParams
from tests.conftest import LookCountingEvent, attach_untrained_lora

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea, the wind and the rain:",
    "1, 2, 3, 4,",
    "Question: what is water made of?\nAnswer:",
]


def test_cancel_stops_generation_within_one_token(engine):
    cancel = LookCountingEvent()  # looked at once per token made
    stream = engine.stream(GenRequest(prompt="Write a long story:", params=SamplingParams(max_new_tokens=200)), cancel)
    next(stream), next(stream)
    cancel.set()
    last = list(stream)[-1]
    assert last.finish_reason == "stop"
    # At most the token being made when the cancel was set.
    assert 0 < cancel.looks_when_set <= last.completion_tokens <= cancel.looks_when_set + 1


# ---- continuous batching ----------------------------------------------------------------------------
ADAPTER_DIRS: dict = {}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A continuous-batching engine with two different random adapters, "a" and "b"."""
    from kinject.core.engines.transformers_engine import TransformersEngine
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings

    # Bulk generate calls join the shared batch too (by default they keep generate's own batches).
    engine = {"batching": "continuous", "bulk_batching": "continuous"}
    settings = load_settings({"kb_root": str(tmp_path_factory.mktemp("mixed")), "engine": engine})
    eng = TransformersEngine(settings)
    for name, seed in (("a", 0), ("b", 1)):
        kb = KB.create(settings, name)
        attach_untrained_lora(kb, settings, seed=seed)
        eng.add_adapter(name, kb.dir("train"))
        ADAPTER_DIRS[name] = kb.dir("train")
    yield eng
    eng.close()


def ask(prompt: str, adapter: str | None = None, **params) -> GenRequest:
    params.setdefault("max_new_tokens", 12)
    return GenRequest(messages=[{"role": "user", "content": prompt}], params=SamplingParams(**params), adapter=adapter)


class BatchSizes:
    """Records the batch size (and the input tokens per row) of every forward pass of an engine's model."""

    def __init__(self, engine):
        self.sizes: list[int] = []
        self.lengths: list[int] = []
        self._handle = engine.model.get_input_embeddings().register_forward_hook(self._record)

    def _record(self, module, inputs, out) -> None:
        self.sizes.append(inputs[0].shape[0])
        self.lengths.append(inputs[0].shape[1])

    def __enter__(self) -> "BatchSizes":
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def streamed(engine, request: GenRequest, out: dict, key, cancel=None) -> threading.Thread:
    def run() -> None:
        chunks = list(engine.stream(request, cancel))
        out[key] = ("".join(c.text for c in chunks), chunks[-1])

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_mixed_adapters_share_forward_passes_and_answer_as_alone(mixed):
    requests = [ask(p, adapter) for p in PROMPTS for adapter in (None, "a", "b")]
    alone = [mixed.generate([r])[0] for r in requests]
    # The adapters are really different models: otherwise a mix-up could not show.
    by_adapter = [{g.text for g in alone[k::3]} for k in range(3)]
    assert by_adapter[0] != by_adapter[1] and by_adapter[1] != by_adapter[2]
    out: dict = {}
    with BatchSizes(mixed) as seen:
        threads = [streamed(mixed, r, out, i) for i, r in enumerate(requests[:6])]
        together = mixed.generate(requests[6:])  # a bulk call joins the streams' batch
        for t in threads:
            t.join()
    assert max(seen.sizes) >= 4  # decode steps ran many rows (of several adapters) at once
    for i, g in enumerate(alone):
        got = together[i - 6] if i >= 6 else None
        if got is not None:
            assert (got.text, got.completion_tokens, got.finish_reason) == (g.text, g.completion_tokens, g.finish_reason), requests[i]
        else:
            text, last = out[i]
            assert (text, last.completion_tokens, last.finish_reason) == (g.text, g.completion_tokens, g.finish_reason), requests[i]


def test_a_request_joins_a_running_batch(mixed):
    """A short request started while a long one runs ends first: it did not wait its turn."""
    made = LookCountingEvent()  # looked at once per token the long request makes
    long = mixed.stream(GenRequest(prompt="1, 2, 3, 4, 5,", params=SamplingParams(max_new_tokens=120)), made)
    next(long)  # it runs
    out: dict = {}
    streamed(mixed, ask("Hi!", "b", max_new_tokens=3), out, "short").join()
    assert out["short"][1].completion_tokens == 3
    assert made.looks < 60, "the short request waited for the long one to end"
    assert list(long)[-1].completion_tokens == 120


def test_a_seeded_sample_is_the_same_alone_and_batched(mixed):
    sampled = [ask(p, adapter, temperature=1.0, top_p=0.9, seed=11 + i) for i, (p, adapter) in enumerate(zip(PROMPTS, (None, "a", "b", None)))]
    alone = [mixed.generate([r])[0].text for r in sampled]
    # Next to greedy rows and each other, each row draws from its own seeded generator.
    together = mixed.generate(sampled + [ask(p) for p in PROMPTS])[: len(sampled)]
    assert [g.text for g in together] == alone
    assert len(set(alone)) == len(alone)


def test_cancelling_one_stream_leaves_the_others_alone(mixed):
    requests = [ask(p, adapter, max_new_tokens=24) for p, adapter in zip(PROMPTS[1:], (None, "a", "b"))]
    alone = [mixed.generate([r])[0].text for r in requests]
    cancel = LookCountingEvent()
    out: dict = {}
    others = [streamed(mixed, r, out, i) for i, r in enumerate(requests[1:], start=1)]
    stream = mixed.stream(requests[0], cancel)
    next(stream), next(stream)
    cancel.set()
    last = list(stream)[-1]
    for t in others:
        t.join()
    assert last.finish_reason == "stop" and last.completion_tokens <= cancel.looks_when_set + 1 < 24
    assert [out[i][0] for i in (1, 2)] == alone[1:]
    assert all(out[i][1].completion_tokens == 24 for i in (1, 2))


def test_a_stop_string_ends_only_its_row(mixed):
    plain = mixed.generate([ask(PROMPTS[1], max_new_tokens=16)])[0]
    word = plain.text.split()[2]
    stopping = ask(PROMPTS[1], max_new_tokens=16, stop=[word])
    out: dict = {}
    thread = streamed(mixed, stopping, out, "stream")
    stopped, full = mixed.generate([stopping, ask(PROMPTS[1], max_new_tokens=16)])
    thread.join()
    assert word not in stopped.text and plain.text.startswith(stopped.text) and stopped.finish_reason == "stop"
    assert stopped.completion_tokens < 16
    assert out["stream"][0] == stopped.text and out["stream"][1].completion_tokens == stopped.completion_tokens
    assert (full.text, full.completion_tokens, full.finish_reason) == (plain.text, 16, "length")


def test_continuous_reports_what_one_call_at_a_time_reports(mixed):
    """Texts, token counts and finish reasons as `model.generate` gives them (engine.batching =
    "per_call"): greedy answers ending on EOS, on length and on a stop string, streamed and not."""
    from kinject.core.engines.transformers_engine import TransformersEngine
    from kinject.core.settings import load_settings

    per_call = TransformersEngine(load_settings({"engine": {"batching": "per_call"}}))
    requests = [ask(p, max_new_tokens=n) for p, n in zip(PROMPTS, (60, 8, 20, 60))] + [ask(PROMPTS[2], max_new_tokens=20, stop=["4,"])]
    fields = lambda g: (g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason)  # noqa: E731
    expected = [fields(per_call.generate([r])[0]) for r in requests]
    assert {e[3] for e in expected} == {"stop", "length"}
    for r, e in zip(requests, expected):  # per_call's own streams report what its generate does
        chunks = list(per_call.stream(r))
        assert ("".join(c.text for c in chunks), *fields(chunks[-1])[1:]) == e
    assert [fields(g) for g in mixed.generate(requests)] == expected
    out: dict = {}
    for thread in [streamed(mixed, r, out, i) for i, r in enumerate(requests)]:  # streamed side by side
        thread.join()
    for i, e in enumerate(expected):
        text, last = out[i]
        assert (text, last.prompt_tokens, last.completion_tokens, last.finish_reason) == e


def test_a_prompt_seen_before_prefills_only_what_is_new(mixed):
    """The kept KV of a prompt serves the same prompt again (only its last token runs) and a longer
    one that opens with it (a conversation's next turn), per adapter, with the same answers."""
    from kinject.core.engines.transformers_engine import TransformersEngine
    from kinject.core.settings import load_settings

    first = ask("Question: which gas do plants take in from the air to make sugar?\nAnswer:", "a", max_new_tokens=10)
    with BatchSizes(mixed) as seen:
        alone = mixed.generate([first])[0]
    # At most the chat template's opening is kept from earlier prompts: the question is prefilled.
    assert 1 < max(seen.lengths) <= mixed.prompt_tokens(first)
    with BatchSizes(mixed) as seen:
        again = mixed.generate([first])[0]
    assert max(seen.lengths) == 1 and again.text == alone.text
    with BatchSizes(mixed) as seen:
        mixed.generate([GenRequest(messages=first.messages, params=first.params)])  # base weights: their own KV
    assert max(seen.lengths) > 1
    turn = [*first.messages, {"role": "assistant", "content": alone.text}, {"role": "user", "content": "Why?"}]
    follow_up = GenRequest(messages=turn, params=first.params, adapter="a")
    with BatchSizes(mixed) as seen:
        answer = mixed.generate([follow_up])[0]
    assert 1 < max(seen.lengths) < mixed.prompt_tokens(follow_up) - mixed.prompt_tokens(first) + 16
    fresh = TransformersEngine(load_settings({"engine": {"batching": "per_call"}}))
    fresh.add_adapter("a", ADAPTER_DIRS["a"])
    assert answer.text == fresh.generate([follow_up])[0].text


def test_reloading_an_adapter_forgets_the_prompts_it_computed(mixed):
    request = ask("Describe a lighthouse at night in one sentence.", "a", max_new_tokens=10)
    as_a = mixed.generate([request])[0].text  # its prompt's KV is now kept for "a"
    as_b = mixed.generate([ask(request.messages[0]["content"], "b", max_new_tokens=10)])[0].text
    assert as_a != as_b
    try:
        mixed.add_adapter("a", ADAPTER_DIRS["b"])
        assert mixed.generate([request])[0].text == as_b
    finally:
        mixed.add_adapter("a", ADAPTER_DIRS["a"])
    assert mixed.generate([request])[0].text == as_a
