"""finetune.memory: the memory estimate on Qwen2.5-7B's real numbers, the plan it makes for 80 GB
and 141 GB GPUs, its error when nothing fits, its activation count against what autograd keeps
on the bundled 135M model, and real tiny training runs: a batch split into micro-batches, and
gradient checkpointing, each give the loss curve of the plain run (on tests.conftest.small_llm)."""
from __future__ import annotations

import json

import pytest

from kinject.core.kb import KB
from kinject.core.settings import SettingsError, load_settings
from kinject.finetune.memory import (
    GiB,
    MemoryPlanError,
    Shape,
    estimate,
    gib,
    layer_bytes_per_token,
    lora_footprint,
    lora_params,
    plan,
    usable,
)
from test_finetune import kb_settings, make_kb
from tests.conftest import Crash, crash_at, small_llm

GB = 10**9  # GPU sizes are sold in decimal gigabytes: an "80 GB" card holds 80e9 bytes (74.5 GiB)


@pytest.fixture(scope="module")
def qwen7b():
    """Qwen2.5-7B-Instruct as the paper preset trains it: bf16, LoRA rank 64 on every linear."""
    from transformers import Qwen2Config

    config = Qwen2Config(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064
    )
    shape = Shape.of(config, act_bytes=2)
    return shape, lora_footprint(shape, params=7_615_616_512, rank=64)


# ---- the arithmetic ----------------------------------------------------------------------------
def test_qwen7b_shape_and_adapter_size(qwen7b):
    shape, footprint = qwen7b
    assert (shape.hidden, shape.layers, shape.vocab, shape.intermediate, shape.kv_dim) == (3584, 28, 152064, 18944, 512)
    assert lora_params(shape, 64) == footprint.trainable_params == 161_480_704  # what peft reports for this adapter
    assert footprint.weight_bytes == 7_615_616_512 * 2 + 161_480_704 * 4


def test_paper_batch_needs_checkpointing_on_80_and_141_gb(qwen7b):
    shape, footprint = qwen7b
    whole = estimate(shape, footprint, micro_batch=8, block_size=2048, checkpointing=False)
    assert whole.total > 80 * GB
    assert whole.total > 141 * GB  # 8 x 2048 tokens of activations: about 103 GiB on their own
    for size in (80 * GB, 141 * GB):
        p = plan(shape, footprint, batch_size=8, block_size=2048, available=size)
        assert p.checkpointing
        assert 8 % p.micro_batch == 0 and p.micro_batch * p.accumulation == 8
        assert p.estimate.total <= usable(size)
        assert p.estimate == estimate(shape, footprint, p.micro_batch, 2048, checkpointing=True)
    # Pinned off, checkpointing is replaced by a split batch that fits.
    p = plan(shape, footprint, batch_size=8, block_size=2048, available=80 * GB, checkpointing=False)
    assert not p.checkpointing and p.accumulation > 1 and p.estimate.total <= usable(80 * GB)


def test_local_preset_runs_its_batch_whole_without_checkpointing():
    """The bundled 135M model in float32 at the local preset's batch of 4 x 512 needs a few GiB."""
    s = load_settings()
    shape = Shape(hidden=576, layers=30, vocab=49152, intermediate=1536, kv_dim=192, act_bytes=4)
    p = plan(shape, lora_footprint(shape, 134_515_008, s.train.lora_rank), s.train.batch_size, s.train.block_size, 8 * GiB, device="cpu")
    assert (p.micro_batch, p.accumulation, p.checkpointing) == (s.train.batch_size, 1, False)
    assert p.line().startswith("memory plan on cpu: estimate ")
    assert "batch 4 as 1 micro-batch of 4, gradient checkpointing off" in p.line()


def test_too_little_memory_is_an_error_with_the_numbers(qwen7b):
    shape, footprint = qwen7b
    one = estimate(shape, footprint, micro_batch=1, block_size=2048, checkpointing=True)
    with pytest.raises(MemoryPlanError) as e:
        plan(shape, footprint, batch_size=8, block_size=2048, available=20 * GiB)
    msg = str(e.value)
    assert f"needs about {gib(one.total)} GiB" in msg and "with gradient checkpointing" in msg
    assert "20.0 GiB is available" in msg and f"{gib(usable(20 * GiB))} GiB after keeping 10% free" in msg
    assert "train.block_size (now 2048)" in msg
    # With checkpointing pinned off, the error says to allow it.
    with pytest.raises(MemoryPlanError, match=r"needs about \d+\.\d GiB.*set train\.gradient_checkpointing=auto"):
        plan(shape, footprint, batch_size=8, block_size=2048, available=24 * GiB, checkpointing=False)
    with pytest.raises(MemoryPlanError, match=r"weights alone do not fit"):
        plan(shape, footprint, batch_size=8, block_size=2048, available=10 * GiB)
    # A micro-batch set by hand is kept (the estimate can be wrong), and the line says it is over.
    p = plan(shape, footprint, batch_size=8, block_size=2048, available=40 * GiB, checkpointing=False, micro_batch_size=8)
    assert not p.fits and "over the usable memory" in p.line()


def test_settings_take_auto_true_false_and_a_dividing_micro_batch():
    s = load_settings()
    assert (s.train.gradient_checkpointing, s.train.micro_batch_size) == ("auto", 0)
    paper = load_settings({"preset": "paper"})
    assert (paper.train.gradient_checkpointing, paper.train.batch_size, paper.train.block_size) == ("auto", 8, 2048)
    assert load_settings({"train": {"gradient_checkpointing": "true"}}).train.gradient_checkpointing is True
    assert load_settings({"train": {"gradient_checkpointing": "off"}}).train.gradient_checkpointing is False
    with pytest.raises(SettingsError, match=r"invalid setting train\.gradient_checkpointing: expected auto, true or false"):
        load_settings({"train": {"gradient_checkpointing": "sometimes"}})
    with pytest.raises(SettingsError, match=r"micro_batch_size 3 does not divide batch_size 4"):
        load_settings({"train": {"micro_batch_size": 3}})


# ---- the estimate against the real model -------------------------------------------------------
def _saved_bytes_per_token(dtype: str, autocast: bool, checkpointing: bool) -> tuple[float, Shape]:
    """Bytes autograd keeps per token in the bundled model's decoder (LoRA on every linear), from
    two lengths so that per-pass tensors (autocast's weight copies) drop out."""
    import torch

    from kinject.core.models import load_causal_lm
    from kinject.finetune.lora import trainable_model
    from kinject.finetune.loop import set_checkpointing

    settings = load_settings({"engine": {"dtype": dtype, "device": "cpu"}, "train": {"full_finetune": False}})
    base, _ = load_causal_lm(settings.models.llm, settings)
    model = trainable_model(base, settings)
    model.train()
    if checkpointing:
        set_checkpointing(model, True)
    lm = model.get_base_model()
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    totals = []
    for length in (64, 128):
        kept: dict[int, int] = {}

        def keep(t):
            if t.untyped_storage().data_ptr() not in fixed:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, lm.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lm.get_decoder()(input_ids=ids, use_cache=False)
        totals.append(sum(kept.values()))
    shape = Shape.of(lm.config, act_bytes=2 if autocast or dtype == "bfloat16" else 4)
    return (totals[1] - totals[0]) / (2 * 64), shape


def test_activation_count_matches_what_autograd_keeps():
    # bf16 weights under autocast, as on a GPU: the count is within 2 % (it leaves out the LoRA
    # B matrices' inputs and attention's log-sum-exp).
    measured, shape = _saved_bytes_per_token("bfloat16", autocast=True, checkpointing=False)
    final_norm = 4 * shape.hidden
    counted = shape.layers * layer_bytes_per_token(shape) + final_norm
    assert counted == pytest.approx(measured, rel=0.02)
    # float32 on a CPU without bf16: counted high by under 10 % (q/k/v and gate/up share inputs
    # there, but attention keeps less than counted).
    measured, shape = _saved_bytes_per_token("float32", autocast=False, checkpointing=False)
    counted = shape.layers * layer_bytes_per_token(shape) + 4 * shape.hidden
    assert measured <= counted <= 1.1 * measured
    # Checkpointed: each layer keeps its input, and the final norm its float32 copy.
    measured, shape = _saved_bytes_per_token("bfloat16", autocast=True, checkpointing=True)
    assert shape.layers * shape.act_bytes * shape.hidden + final_norm == pytest.approx(measured, rel=0.02)


# ---- real tiny runs ----------------------------------------------------------------------------
QA = [f"Q: Who guided ship {i} past Gull Rock?\nA: Tide pilot number {i}, in the year {1400 + 3 * i}." for i in range(24)]
# In float32 (bf16 off, for the same numbers on every CPU) splitting the batch only reorders sums
# and checkpointing recomputes the same forward; the loop logs losses rounded to 5 decimals, so
# the curves agree to a unit or two in the last place. Without weighting micro-batches by their
# loss tokens they differ by about 0.006 (on the small model: thousandths, not the bundled one's tenths).
TOLERANCE = 1e-4
COMMON = dict(max_steps=4, block_size=48, batch_size=4, lr=2e-3, bf16="off", save_every=100)


def _train(root, name: str, on_step=None, **train):
    from kinject.finetune.train import train as run_training

    kb, settings = make_kb(root / name, name, QA, small_llm(), **{**COMMON, **train})
    return kb, settings, run_training(kb, settings, progress=False, on_step=on_step)


def _losses(report) -> list[float]:
    return [loss for _, loss in report.loss_curve]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The reference: batch 4 in one pass, no checkpointing."""
    kb, _, report = _train(tmp_path_factory.mktemp("whole"), "whole", micro_batch_size=4, gradient_checkpointing=False)
    saved = json.loads((kb.dir("train") / "report.json").read_text())
    assert saved["memory_plan"] == report.memory_plan and saved["memory"] == report.memory
    assert (report.memory["micro_batch"], report.memory["accumulation"], report.memory["checkpointing"]) == (4, 1, False)
    assert report.memory_plan.startswith("memory plan on cpu: estimate ")
    return _losses(report)


def test_micro_batches_and_checkpointing_give_the_same_losses(whole, tmp_path, capsys):
    from kinject.core.models import load_tokenizer, resolve_model
    from kinject.finetune import data
    from kinject.finetune.loop import loss_tokens

    assert len(whole) == 4 and whole[-1] < whole[0]
    kb, settings, split = _train(tmp_path, "split", micro_batch_size=2, gradient_checkpointing=False)
    assert "batch 4 as 2 micro-batches of 2, gradient checkpointing off" in capsys.readouterr().err
    assert (split.memory["micro_batch"], split.memory["accumulation"]) == (2, 2)
    assert _losses(split) == pytest.approx(whole, abs=TOLERANCE)

    _, _, recomputed = _train(tmp_path, "ckpt", micro_batch_size=4, gradient_checkpointing=True)
    assert recomputed.memory["checkpointing"] and recomputed.memory["micro_batch"] == 4
    assert _losses(recomputed) == pytest.approx(whole, abs=TOLERANCE)

    # The micro-batches hold different numbers of loss tokens (answers only), so the curves agree
    # only because each micro-batch's mean counts by its share, as in the whole batch's mean.
    tok = load_tokenizer(resolve_model(settings.models.llm, settings))
    packed = data.build(data.collect_samples(kb, settings, tok), tok, settings)
    halves = [
        (loss_tokens(packed, idx[:2]), loss_tokens(packed, idx[2:]))
        for idx in (data.stream_indices(len(packed), settings.seed, step * 4, 4) for step in range(4))
    ]
    assert any(a != b for a, b in halves), halves


def test_a_split_run_resumes_at_a_step_boundary_under_another_plan(whole, tmp_path):
    """Killed after step 3 of a run in micro-batches of 2 (checkpoint at step 2), resumed with
    the whole batch in one pass: the steps continue from 2 with the reference's losses."""
    from kinject.finetune.train import train as run_training

    with pytest.raises(Crash):
        _train(tmp_path, "cut", crash_at(3), micro_batch_size=2, save_every=2)
    kb = KB.open(kb_settings(tmp_path / "cut", small_llm()), "cut")
    assert [p.name for p in (kb.dir("train") / "checkpoints").iterdir()] == ["step-0000002"]
    settings = kb_settings(tmp_path / "cut", small_llm(), **{**COMMON, "save_every": 2, "micro_batch_size": 4})
    resumed = run_training(kb, settings, progress=False)
    assert resumed.resumed_from_step == 2 and [s for s, _ in resumed.loss_curve] == [1, 2, 3, 4]
    assert resumed.memory["micro_batch"] == 4
    assert _losses(resumed) == pytest.approx(whole, abs=TOLERANCE)


def test_training_that_cannot_fit_stops_before_the_first_step(tmp_path, monkeypatch, capsys):
    import kinject.finetune.memory as memory
    from kinject.cli import main

    kb, _ = make_kb(tmp_path, "small", QA)
    monkeypatch.setattr(memory, "available_ram", lambda: 64 * 2**20)  # a machine with 64 MiB to spare
    with pytest.raises(SystemExit) as exit_:
        main(["--set", f"kb_root={tmp_path}", "--set", "train.bf16=off", "train", "--kb", "small", "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "training does not fit on cpu" in err and "GiB is available" in err
    assert kb.stage("train") is None
