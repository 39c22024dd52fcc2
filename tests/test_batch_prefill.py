"""How the transformers engine runs a batch of one call on CPU: grouped-query attention under a
padding mask without copying the KV heads, and prompts that open alike prefilled once."""
from __future__ import annotations

import pytest

from kinject.core.engines import GenRequest, SamplingParams
from kinject.core.engines.prefix_sharing import MIN_SHARED, prefix_groups

DOCS = {
    name: f"Title: The {name}\n\n" + " ".join(f"The {name} record number {i} was kept in the archive of {name}." for i in range(8))
    for name in ("harbour", "lighthouse")
}
ASKS = ["List the key concepts.", "Write three questions a student could answer from it."]


def augment_like(max_new_tokens: int = 4) -> list[GenRequest]:
    """Prompts as augment writes them: the document first, then what to write about it."""
    return [
        GenRequest(messages=[{"role": "user", "content": f"{doc}\n\n{ask}"}], params=SamplingParams(max_new_tokens=max_new_tokens))
        for doc in DOCS.values()
        for ask in ASKS
    ]


def test_prefix_groups_pair_rows_that_open_alike():
    a, b = list(range(100)), list(range(50, 150))
    prompts = [a + [1], b + [1], a + [2, 3], [7] * 70, a + [4], b + [2]]
    groups = sorted(prefix_groups(prompts), key=lambda g: g[0])
    assert groups == [([0, 2, 4], 100), ([1, 5], 100), ([3], 0)]
    # a prefix leaves each member a token of its own, and short common openings are not shared
    assert prefix_groups([a, a + [5]]) == [([0, 1], 99)]
    assert prefix_groups([a[: MIN_SHARED - 1] + [1], a[: MIN_SHARED - 1] + [2]]) == [([0], 0), ([1], 0)]


def test_a_shared_prefix_is_prefilled_once_and_answers_do_not_change(engine, monkeypatch):
    requests = augment_like()
    prompts = [engine.prompt_tokens(r) for r in requests]
    embedded: list[int] = []
    hook = engine.model.get_input_embeddings().register_forward_hook(lambda m, inputs, out: embedded.append(inputs[0].numel()))
    try:
        shared = engine.generate(requests)
        shared_tokens, embedded[:] = sum(embedded), []
        monkeypatch.setattr(engine.settings.engine, "prefix_sharing", False)
        plain = engine.generate(requests)
        plain_tokens = sum(embedded)
    finally:
        hook.remove()
    assert [g.text for g in shared] == [g.text for g in plain]
    assert [g.prompt_tokens for g in shared] == [g.prompt_tokens for g in plain] == prompts
    # Without sharing, the padded batch runs every prompt whole; with it, each document's opening
    # once per document (plus the decode steps, the same in both).
    opening = min(prompts) - 20
    assert plain_tokens - shared_tokens >= len(DOCS) * (len(ASKS) - 1) * opening, (plain_tokens, shared_tokens)


def test_a_shared_prefix_batch_is_never_compiled(engine, monkeypatch):
    """Its StaticCache makes generate compile the model on CUDA (a length per batch, so a compile
    per batch, and CUDA graphs fail from a worker thread). The compile config's all-devices flag
    makes this CPU meet the same condition."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import CompileConfig

    config = CompileConfig(backend="eager")
    config._compile_all_devices = True
    monkeypatch.setattr(engine.model.generation_config, "compile_config", config)
    with ThreadPoolExecutor(1) as worker:
        texts = [g.text for g in worker.submit(engine.generate, augment_like()).result()]
    assert all(texts)
    assert not [m for m in engine.model.modules() if hasattr(m, "_compiled_call")]


def test_a_padded_batch_attends_without_copying_kv_heads(engine, monkeypatch):
    """transformers' sdpa copies each key/value head per query head when given a mask; the
    engine's model hands the mask and `enable_gqa` to torch instead, with the same logits."""
    import torch
    from transformers.integrations import sdpa_attention

    copies: list[int] = []
    real = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *args: copies.append(1) or real(*args))
    requests = [GenRequest(prompt=p, params=SamplingParams(max_new_tokens=3)) for p in ("The sea", "A long way from the harbour, the old keeper said")]
    engine.generate(requests)
    assert engine.model.config.num_attention_heads > engine.model.config.num_key_value_heads  # grouped-query
    assert copies == []

    batch = engine.tokenizer(["The sea", "A long way from the harbour, the old keeper"], return_tensors="pt", padding=True, padding_side="left")
    ours_name = engine.model.config._attn_implementation
    with torch.inference_mode():
        ours = engine.model(**batch).logits
        engine.model.set_attn_implementation("sdpa")
        try:
            stock = engine.model(**batch).logits
        finally:
            engine.model.set_attn_implementation(ours_name)
    assert copies, "stock sdpa copies the heads under a mask"
    assert torch.equal(ours[batch["attention_mask"].bool()], stock[batch["attention_mask"].bool()])


@pytest.mark.parametrize("cores", ["all", "auto"])
def test_vllm_cpu_threads_use_every_core_unless_told(cores, monkeypatch):
    import os

    from kinject.core.engines.vllm_engine import _cpu_core_binding
    from kinject.core.settings import load_settings

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    engine = load_settings({"engine": {"vllm_cpu_cores": cores}}).engine
    every = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    expected = {"VLLM_CPU_OMP_THREADS_BIND": every, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"} if cores == "all" else {}
    assert _cpu_core_binding(engine) == expected
    assert _cpu_core_binding(engine.model_copy(update={"tensor_parallel_size": 2})) == {}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    assert _cpu_core_binding(engine) == {}  # the operator's own binding wins
