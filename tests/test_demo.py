"""`kinject build`, `kinject demo`, `kinject bench` and the paper report, end to end on small real
things: three documents of the demo corpus, a few hundred synthetic tokens, five training steps."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kinject.core.adapter_copy import FULL_MODEL_DIR
from tests.conftest import REPO, small_llm

DOCS = ["founding-of-vaskarra.md", "great-flood-of-1907.md", "the-tern-currency.md"]
# Small real things: the stages' plumbing is under test here, not what the model learns, so the
# model is tests.conftest.small_llm (the demo itself, `make demo`, runs the bundled one).
TINY = [
    "augment.budget_tokens=300",
    "augment.max_new_tokens=64",
    "train.max_steps=5",
    "train.block_size=128",
    "train.batch_size=2",
    "eval.max_new_tokens=16",
]


def kinject(capsys, *argv: str) -> str:
    """Run the real CLI in-process; its stdout. A failing command fails the test with its output."""
    from kinject.cli import main

    try:
        main(list(argv))
    except SystemExit as e:
        out = capsys.readouterr()
        assert e.code in (0, None), f"kinject {' '.join(argv)} exited {e.code}:\n{out.out}\n{out.err}"
        return out.out
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> tuple[Path, Path]:
    """Three demo documents and the demo questions about them only."""
    root = tmp_path_factory.mktemp("demo-subset")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in DOCS:
        shutil.copy(REPO / "demo" / "corpus" / name, corpus / name)
    lines = [l for l in (REPO / "demo" / "questions.jsonl").read_text().splitlines() if set(json.loads(l)["doc_ids"]) <= set(DOCS)]
    questions = root / "questions.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    return corpus, questions


@pytest.fixture(scope="module")
def kb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kbs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KINJECT_KB_ROOT", str(root))
        yield root


def tiny() -> list[str]:
    return [*TINY, f"models.llm={small_llm()}"]


def tiny_args() -> list[str]:
    return [a for pair in tiny() for a in ("--set", pair)]


@pytest.mark.slow
def test_build_runs_three_stages_then_reuses_them(capsys, subset, kb_root):
    corpus, _ = subset
    out = kinject(capsys, *tiny_args(), "build", str(corpus), "--kb", "sub")
    manifest = json.loads((kb_root / "sub" / "manifest.json").read_text())
    assert set(manifest["stages"]) >= {"ingest", "augment", "train"}
    assert manifest["stages"]["augment"]["inputs"].get("ingest") == manifest["stages"]["ingest"]["fingerprint"]
    assert manifest["stages"]["train"]["inputs"]["augment"] == manifest["stages"]["augment"]["fingerprint"]
    # the local preset trains every weight: a whole model, which the ft modes serve
    assert (kb_root / "sub" / "adapter" / FULL_MODEL_DIR / "config.json").exists()
    assert not (kb_root / "sub" / "adapter" / "adapter_config.json").exists()
    for stage in ("ingest", "augment", "train"):
        assert f"| {stage} | ran |" in out and f"[{stage}] ran in " in out
    assert "| **total** |" in out

    curated = (kb_root / "sub" / "synthetic" / "curated.jsonl").read_bytes()
    again = kinject(capsys, *tiny_args(), "build", str(corpus), "--kb", "sub")
    for stage in ("ingest", "augment", "train"):
        assert f"| {stage} | skipped |" in again and f"[{stage}] skipped: inputs unchanged, reused in " in again, again
    after = json.loads((kb_root / "sub" / "manifest.json").read_text())
    for stage in ("ingest", "augment", "train"):
        assert after["stages"][stage]["fingerprint"] == manifest["stages"][stage]["fingerprint"]
    # the same training text, nothing retrained
    assert (kb_root / "sub" / "synthetic" / "curated.jsonl").read_bytes() == curated
    assert after["stages"]["train"]["finished_at"] == manifest["stages"]["train"]["finished_at"]


@pytest.mark.slow
def test_demo_prints_table_and_reuses_every_stage(capsys, subset, kb_root):
    from kinject.core.answer import MODES
    from kinject.recipes.demo import demo_settings, run_demo
    from kinject.core.settings import parse_overrides

    corpus, questions = subset
    settings = demo_settings(parse_overrides(tiny()))
    first = run_demo(settings, "sub", serve=False, corpus=corpus, questions=questions)
    out = capsys.readouterr().out
    for mode in MODES:
        assert f"| {mode} |" in out
    assert "synthetic data:" in out and "demo stage times" in out
    assert (Path(first["eval_dir"]) / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((Path(first["eval_dir"]) / "report.json").read_text())
    assert report["split"] == "test" and report["modes"] == list(MODES)

    second = run_demo(settings, "sub", serve=False, corpus=corpus, questions=questions)
    assert second["eval_dir"] == first["eval_dir"]
    statuses = {r.stage: r.status for r in second["runs"]}
    assert [statuses[s] for s in ("ingest", "augment", "train", "eval")] == ["skipped"] * 4

    # The paper report's arithmetic on this real report.
    from kinject.recipes.paper import target_check

    t = target_check(report)
    m = t["mean"]
    assert t["ft_gain"] == pytest.approx(m["ft"] - m["base"])
    assert t["ft_target_met"] == (m["ft"] - m["base"] >= (m["rag"] - m["base"]) / 2)
    assert t["ftrag_target_met"] == (m["ft-rag"] >= m["rag"])


def test_a_stage_result_says_what_it_did_and_refuses_other_statuses():
    from kinject.recipes.build import timing_table
    from kinject.recipes.demo import ModelsReady

    ready = ModelsReady(status="skipped", folders=["m"], seconds=2.04, cpu_seconds=1.5)
    assert ready.status_line() == "[models] skipped: inputs unchanged, reused in 2.0 s"
    resumed = ModelsReady(status="resumed", folders=["m"], seconds=3.0, cpu_seconds=0.5)
    assert resumed.status_line() == "[models] resumed in 3.0 s"
    table = timing_table([ready, resumed], "t")
    assert "| models | skipped | 2.0 | 1.5 |" in table and "| **total** | | **5.0** | 2.0 |" in table
    with pytest.raises(ValueError, match="not 'done'"):
        ModelsReady(status="done", folders=[])


def test_demo_settings_yield_to_user_overrides():
    from kinject.recipes.demo import DEMO_SETTINGS, demo_settings

    s = demo_settings({"augment": {"budget_tokens": 123}})
    assert s.augment.budget_tokens == 123
    assert s.retrieval.top_k == DEMO_SETTINGS["retrieval"]["top_k"]
    assert demo_settings({"retrieval": {"top_k": 3}}).retrieval.top_k == 3


def test_build_names_a_missing_corpus(capsys, tmp_path, monkeypatch):
    from kinject.cli import main

    monkeypatch.setenv("KINJECT_KB_ROOT", str(tmp_path / "kbs"))
    with pytest.raises(SystemExit) as e:
        main(["build", str(tmp_path / "nowhere"), "--kb", "x"])
    assert e.value.code == 2
    assert "corpus not found" in capsys.readouterr().err


def test_bench_collects_ratios_and_contains_failures(tmp_path):
    from kinject.recipes.bench import run_one, summary_markdown

    good = tmp_path / "good.py"
    good.write_text(
        "import numpy as np\n"
        "def run(quick):\n"
        "    return {'kinject_per_s': 50.0, 'baseline_per_s': 20.0, 'ratio': np.float64(2.5), 'target': 2.0, 'quick': quick}\n"
    )
    bad = tmp_path / "bad.py"
    bad.write_text("def run(quick):\n    raise RuntimeError('boom')\n")
    results = {"good": run_one(good, quick=True), "bad": run_one(bad, quick=True)}
    assert results["good"]["ratio"] == 2.5 and results["good"]["quick"] is True
    assert "error" in results["bad"]
    md = summary_markdown(results, "2000-01-01", True, "0.00")
    assert "| good | ratio | 2.5 | 2.0 | yes |" in md
    assert "| bad | error:" in md
