"""The augment stage end to end on the bundled SmolLM2-135M: budget, determinism, resume, reports, errors."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from kinject.core.files import read_jsonl
from kinject.core.kb import KB, work_seconds
from kinject.core.settings import SPA_TYPES, SettingsError, load_settings
from kinject.augment import AugmentError, augment
from kinject.core.synthetic import load_training_texts, training_corpus_hash
from tests.conftest import built_once, small_llm

REPO = Path(__file__).resolve().parent.parent
DEMO_DOCS = ["brightwater-glassworks.md", "university-of-vaskarra.md"]
# Tiny but real: ~13 samples of <= 32 tokens over 2 documents x 7 types, appended 7 at a time.
# The local preset's default types are cut by rule; these tests exercise the generator with SPA's.
SMALL = {"types": SPA_TYPES, "budget_tokens": 400, "max_new_tokens": 32, "samples_per_call": 7}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """A KB root holding KB 'demo2': two demo documents, ingested once for the module."""
    from kinject.ingest.pipeline import ingest

    def build(root: Path) -> None:
        corpus = root / "corpus"
        corpus.mkdir()
        for name in DEMO_DOCS:
            shutil.copy(REPO / "demo" / "corpus" / name, corpus / name)
        settings = load_settings({"kb_root": str(root / "kbs")})
        ingest(KB.create(settings, "demo2"), corpus, settings, progress=False)

    return built_once(tmp_path_factory, "augment-demo2", build) / "kbs"


def _copy_kb(ingested: Path, tmp_path: Path, name: str, llm: str | None = None, **augment_settings) -> tuple[KB, object]:
    """A private copy of the ingested KB (nothing synthetic yet) and settings pointing at it
    (generating with `llm` when given)."""
    root = tmp_path / "kbs"
    shutil.copytree(ingested / "demo2", root / name, ignore=shutil.ignore_patterns(".lock"))
    models = {"models": {"llm": llm}} if llm else {}
    settings = load_settings({"kb_root": str(root), **models, "augment": {**SMALL, **augment_settings}})
    return KB.open(settings, name), settings


def _keys(kb: KB) -> list[tuple]:
    return [(s["doc_id"], s["type"], s["sample_index"]) for s in read_jsonl(kb.dir("augment") / "samples.jsonl")]


@pytest.fixture(scope="module")
def reference(ingested, tmp_path_factory, engine):
    """One uninterrupted run with SMALL settings: (kb, settings, result)."""
    kb, settings = _copy_kb(ingested, tmp_path_factory.mktemp("reference"), "ref")
    return kb, settings, augment(kb, settings, progress=False, engine=engine)


def test_budget_is_met_across_all_seven_types_and_recorded(reference):
    kb, settings, result = reference
    r = result.report
    samples = read_jsonl(kb.dir("augment") / "samples.jsonl")
    assert result.new_samples == len(samples) == r["samples"] and result.status == "ran"
    assert 400 <= r["generated_tokens"] == sum(s["tokens"] for s in samples) < 400 + 7 * 32
    assert all(r["per_type"][t]["samples"] >= 1 for t in settings.augment.types) and len(r["per_type"]) == 7
    assert sum(row["generated_tokens"] for row in r["per_doc"].values()) == r["generated_tokens"]
    assert len(set(_keys(kb))) == len(samples)
    s = samples[0]
    assert {"doc_id", "type", "prompt_id", "seed", "generator", "text", "tokens"} <= set(s)
    assert s["generator"] == "smollm2-135m" and s["prompt_id"].startswith(f"{s['type']}/chat@")

    curated = read_jsonl(kb.dir("augment") / "curated.jsonl")
    dropped = read_jsonl(kb.dir("augment") / "dropped.jsonl")
    assert len(curated) + len(dropped) == len(samples) and len(curated) == r["kept"]
    assert sum(r["drops"].values()) == len(dropped) and all(d["reason"] in r["drops"] for d in dropped)
    for c in curated:
        assert c["train_text"].split("\n", 1)[1] == c["text"] and c["tokens"] > 0
    for field in ("gzip_ratio", "distinct_1", "distinct_2", "distinct_3", "near_dup_rate", "faithfulness", "expansion", "corpus_tokens"):
        assert field in r
    assert r["corpus_tokens"] > 300 and r["expansion_generated"] == pytest.approx(r["generated_tokens"] / r["corpus_tokens"], abs=1e-3)
    assert json.loads((kb.dir("augment") / "report.json").read_text())["samples"] == r["samples"]

    rec = kb.stage("augment")
    assert rec["inputs"] == {"ingest": kb.stage("ingest")["fingerprint"]}
    texts = load_training_texts(kb)
    assert texts == [c["train_text"] for c in curated] and rec["fingerprint"] == training_corpus_hash(texts)
    from kinject.ingest.pipeline import load_documents

    titles = {d.title for d in load_documents(kb)}
    assert len(titles) == 2 and all(t.split("\n", 1)[0] in titles for t in texts)
    assert kb.stale() == {}


def test_same_settings_generate_nothing_and_a_larger_budget_adds(reference, ingested, tmp_path, engine):
    kb, settings, first = reference
    path = kb.dir("augment") / "samples.jsonl"
    before, generated_in = path.read_bytes(), work_seconds(kb.stage("augment"))
    again = augment(kb, settings, progress=False)  # no engine: nothing to generate, none is started
    assert again.new_samples == 0 and path.read_bytes() == before and again.status == "skipped"
    assert again.report["kept"] == first.report["kept"]
    assert work_seconds(kb.stage("augment")) == generated_in > again.seconds  # the record keeps the generating run's time

    bigger = load_settings({"kb_root": str(settings.kb_dir), "augment": {**SMALL, "budget_tokens": first.report["generated_tokens"] + 60}})
    more = augment(kb, bigger, progress=False, engine=engine)
    assert more.new_samples > 0 and more.report["generated_tokens"] >= first.report["generated_tokens"] + 60
    assert more.status == "ran"  # a larger budget continues a finished run, not an interrupted one
    assert path.read_bytes().startswith(before)
    assert len(set(_keys(kb))) == len(_keys(kb))
    assert work_seconds(kb.stage("augment")) == pytest.approx(more.seconds, abs=0.5)
    curated_more = kb.stage("augment")["fingerprint"]
    smaller = augment(kb, settings, progress=False)  # back to the smaller budget: the extra samples stay unused
    # nothing generated: skipped exactly when curation kept the same training text
    assert smaller.status == ("skipped" if kb.stage("augment")["fingerprint"] == curated_more else "ran")
    assert work_seconds(kb.stage("augment")) == pytest.approx(more.seconds, abs=0.5)
    assert json.loads((kb.dir("augment") / "report.json").read_text())["unused_samples"] == more.new_samples


def test_stale_and_torn_samples_are_regenerated_exactly(reference, ingested, tmp_path, engine):
    """Same plan + same seeds -> same samples: the damaged chunk comes back byte for byte."""
    ref_kb = reference[0]
    ref = read_jsonl(ref_kb.dir("augment") / "samples.jsonl")[: reference[2].new_samples]
    kb, settings = _copy_kb(ingested, tmp_path, "damaged")
    folder = kb.dir("augment")
    bad = dict(ref[-1], seed=ref[-1]["seed"] + 1)  # as if made with other settings
    lines = [json.dumps(s) + "\n" for s in ref[:-1]] + [json.dumps(bad) + "\n", json.dumps(ref[0])[:40]]
    (folder / "samples.jsonl").write_text("".join(lines))  # ...and a torn last line from a kill
    result = augment(kb, settings, progress=False, engine=engine)
    assert result.new_samples == 1 and result.status == "resumed"
    assert read_jsonl(folder / "stale.jsonl") == [bad]
    fixed = read_jsonl(folder / "samples.jsonl")
    assert sorted(map(json.dumps, fixed)) == sorted(map(json.dumps, ref))  # same texts, nothing twice
    assert (folder / "samples.jsonl").read_bytes().endswith(b"\n")


# Enough generation for the small model to be still writing when the test's kill lands.
KILLED_BUDGET = 900


@pytest.mark.slow
def test_cli_resumes_after_kill_9_without_loss_or_duplicates(ingested, tmp_path):
    """The CLI in a child process (forked with its libraries loaded: tests/crashpoint.py),
    SIGKILLed once its first samples are written, then rerun: the same samples as one run
    uninterrupted, none twice. On tests.conftest.small_llm, which writes fast."""
    from tests.crashpoint import forked

    llm = str(small_llm())
    whole, whole_settings = _copy_kb(ingested, tmp_path / "whole", "whole", llm, budget_tokens=KILLED_BUDGET)
    augment(whole, whole_settings, progress=False)
    reference = read_jsonl(whole.dir("augment") / "samples.jsonl")

    kb, settings = _copy_kb(ingested, tmp_path, "killed")
    env = {**os.environ, "KINJECT_KB_ROOT": str(settings.kb_dir), "PYTHONPATH": str(REPO)}
    argv = ["--set", f"models.llm={llm}", "--set", "augment.samples_per_call=7", "--set", f"augment.types={json.dumps(SPA_TYPES)}",
            "augment", "--kb", "killed", "--budget", str(KILLED_BUDGET), "--max-new-tokens", "32", "--no-progress"]
    path = kb.dir("augment") / "samples.jsonl"
    proc = forked(argv, env, tmp_path / "killed.log", REPO)
    deadline = time.time() + 300
    while not (path.exists() and path.stat().st_size) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()  # killed mid-run, not finished
    partial = _keys(kb)
    assert 0 < len(partial) < len(reference) and kb.stage("augment") is None

    done = forked(argv, env, tmp_path / "done.log", REPO)
    done.wait(600)
    assert done.returncode == 0, (tmp_path / "done.log").read_text()
    out = (tmp_path / "done.log").read_text()
    assert "faithfulness" in out and "kept" in out  # the printed report
    assert "continuing an interrupted run" in out
    keys = _keys(kb)
    assert keys[: len(partial)] == partial and len(keys) == len(set(keys))
    samples = read_jsonl(path)
    assert sorted(map(json.dumps, samples)) == sorted(map(json.dumps, reference))  # the same texts, seeds and all
    assert kb.stage("augment") is not None


# ---- bad input ----------------------------------------------------------------------------
def test_bad_input_gives_clear_errors(ingested, tmp_path):
    kb, settings = _copy_kb(ingested, tmp_path, "bad")
    with pytest.raises(AugmentError, match="unknown augmentation type 'summary'.*key_concepts"):
        augment(kb, load_settings({"kb_root": str(settings.kb_dir), "augment": {"types": ["summary"]}}))
    with pytest.raises(AugmentError, match="unknown augmentation type 'nope'"):
        augment(kb, load_settings({"kb_root": str(settings.kb_dir), "augment": {"type_weights": {"nope": 2}}}))
    with pytest.raises(SettingsError, match="budget must not be negative"):
        load_settings({"augment": {"budget_tokens": -100}})
    with pytest.raises(AugmentError, match="budget is 0 tokens"):
        augment(kb, load_settings({"kb_root": str(settings.kb_dir), "augment": {"budget_tokens": 0, "budget_multiple": 0}}))
    empty = KB.create(settings, "empty")
    with pytest.raises(AugmentError, match="no ingested documents.*kinject ingest"):
        augment(empty, settings)
    assert not (kb.dir("augment") / "samples.jsonl").exists()


def test_cli_bad_flags_exit_2_with_one_line(ingested, tmp_path, monkeypatch, capsys):
    """The CLI in-process: a bad flag is a one-line error and exit status 2 before any model loads."""
    from kinject.cli import main

    kb, settings = _copy_kb(ingested, tmp_path, "flags")
    monkeypatch.setenv("KINJECT_KB_ROOT", str(settings.kb_dir))
    for flags, message in (
        (["--budget", "-5"], "invalid setting augment.budget_tokens: budget must not be negative"),
        (["--engine", "tgi"], "invalid setting engine.backend"),
        (["--types", "key_concepts,poem"], "unknown augmentation type 'poem'"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["augment", "--kb", "flags", *flags])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err, (flags, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_unreachable_endpoint_fails_clearly_and_keeps_what_was_generated(reference, tmp_path):
    import socket

    ref_kb, _, _ = reference
    shutil.copytree(ref_kb.root, tmp_path / "kbs" / "offline", ignore=shutil.ignore_patterns(".lock"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    settings = load_settings({
        "kb_root": str(tmp_path / "kbs"),
        "augment": {**SMALL, "budget_tokens": 2000},
        "engine": {"backend": "openai", "openai_base_url": f"http://127.0.0.1:{port}/v1", "openai_max_retries": 1, "openai_retry_backoff_s": 0.01},
    })
    kb = KB.open(settings, "offline")
    before = (kb.dir("augment") / "samples.jsonl").read_bytes()
    with pytest.raises(AugmentError, match=r"did not answer .* after 2 attempts.*samples generated so far are kept"):
        augment(kb, settings, progress=False)
    assert (kb.dir("augment") / "samples.jsonl").read_bytes() == before


# ---- the other engines, through the same door ----------------------------------------------
def test_openai_engine_augments_through_the_kinject_service(ingested, tmp_path, engine):
    import importlib.util

    if importlib.util.find_spec("kinject.service.app") is None:
        pytest.skip("the kinject service (service.app) is not part of this build")
    from kinject.service.app import create_app
    from tests.conftest import running

    served, settings = _copy_kb(ingested, tmp_path, "served")
    kb, _ = _copy_kb(ingested, tmp_path, "client")
    with running(create_app(served, settings, engine)) as base:
        remote = load_settings({
            "kb_root": str(settings.kb_dir),
            "augment": {**SMALL, "budget_tokens": 64, "max_new_tokens": 32},
            "engine": {"backend": "openai", "openai_base_url": f"{base}/v1", "openai_model": "kinject-base", "openai_max_concurrency": 4},
        })
        result = augment(kb, remote, progress=False)
        again = augment(kb, remote, progress=False)
    samples = read_jsonl(kb.dir("augment") / "samples.jsonl")
    assert result.report["generated_tokens"] >= 64 and result.report["engine"] == "openai"
    assert {s["engine"] for s in samples} == {"openai"} and {s["generator"] for s in samples} == {"kinject-base"}
    assert len({(s["doc_id"], s["type"]) for s in samples}) == len(samples) >= 2  # one per (document, type) cell
    assert all(s["text"].strip() for s in samples)
    assert again.new_samples == 0 and kb.stage("augment")["fingerprint"] == training_corpus_hash(load_training_texts(kb))


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_engine_augments_two_docs_by_seven_types_reproducibly(ingested, tmp_path, vllm_engine):
    kb, _ = _copy_kb(ingested, tmp_path, "vllm")
    twin, _ = _copy_kb(ingested, tmp_path, "vllm_twin")
    settings = load_settings({
        "kb_root": str(tmp_path / "kbs"),
        "augment": {"types": SPA_TYPES, "budget_tokens": 14 * 16, "max_new_tokens": 16, "samples_per_call": 14},
        "engine": {"backend": "vllm", "vllm_cpu_kvcache_gb": 1},
    })
    result = augment(kb, settings, progress=False, engine=vllm_engine)
    augment(twin, settings, progress=False, engine=vllm_engine)
    samples = read_jsonl(kb.dir("augment") / "samples.jsonl")
    cells = {(s["doc_id"], s["type"]) for s in samples if s["sample_index"] == 0}
    assert len(cells) == 14 and result.report["generated_tokens"] >= 14 * 16
    assert {s["engine"] for s in samples} == {"vllm"}
    assert [s["text"] for s in samples] == [s["text"] for s in read_jsonl(twin.dir("augment") / "samples.jsonl")]
