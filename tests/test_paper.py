"""recipes/paper.py: rendering docs/results.md from per-set results (no model needed)."""
from __future__ import annotations

import pytest

from kinject.core.settings import load_settings


def _result(preset: str) -> dict:
    s = load_settings({"preset": preset})
    means = {"base": 0.10, "rag": 0.30, "ft": 0.22, "ft-rag": 0.31}
    return {
        "name": "squad_short",
        "report": {
            "kinds": {"short": 4},
            "n_questions": 4,
            "summary": {m: {"f1": {"mean": v, "lo": v, "hi": v, "n": 4}} for m, v in means.items()},
            "paired": [],
        },
        "table": "### squad_short (dev): 4 questions, in-process\n",
        "settings": {"preset": s.preset, "train": s.train.model_dump(mode="json"), "llm": s.models.llm, "embedder": s.models.embedder},
        "budget_tokens": 100,
        "eval_limit": None,
        "top_k": s.retrieval.top_k,
        "synthetic_tokens": 90,
        "generated_tokens": 120,
        "training_tokens": 1000,
        "train_steps": 10,
        "train_epochs": 1.0,
        "stage_seconds": {"ingest": 1.0, "augment": 2.0, "train": 3.0, "eval": 4.0},
        "load_after": "0.1 0.2 0.3",
    }


def test_results_name_the_preset_that_ran():
    from kinject.recipes.paper import render

    text = render([_result("paper")], "0.1 0.2 0.3")
    assert "with the `paper` preset" in text and "`local`" not in text
    assert "with the `local` preset" in render([_result("local")], "0.1 0.2 0.3")


def test_a_run_of_some_sets_keeps_the_others_numbers(tmp_path, monkeypatch):
    from kinject.recipes import paper

    def fake_run_set(name, overrides, echo):  # the building and evaluating is tested in test_demo
        return {**_result("local"), "name": name}

    monkeypatch.setattr(paper, "run_set", fake_run_set)
    out = tmp_path / "results.md"
    paper.run_paper(["multihop_rag"], {}, out, echo=lambda _: None)
    assert "Not in this report yet: squad_short, quality_mc" in out.read_text()
    paper.run_paper(["squad_short"], {}, out, echo=lambda _: None)
    text = out.read_text()
    assert text.index("## squad_short") < text.index("## multihop_rag")  # the report's order, not the runs'
    assert "Not in this report yet: quality_mc" in text and text.count("- Run finished") == 2
    # a hand-written section below the marker survives the next rewrite
    out.write_text(text + "\n" + paper.KEPT_BELOW + "\n## Influence scoring\n| a | b |\n")
    paper.run_paper(["multihop_rag"], {}, out, echo=lambda _: None)
    text = out.read_text()
    assert text.count(paper.KEPT_BELOW) == 1 and text.endswith("## Influence scoring\n| a | b |\n")
    assert text.index("## multihop_rag") < text.index("## Influence scoring")


def test_short_answer_sets_are_checked_on_f1_and_contains_gold():
    from kinject.recipes.paper import render

    r = _result("local")
    contains = {"base": 0.02, "rag": 0.24, "ft": 0.10, "ft-rag": 0.20}
    for mode, v in contains.items():
        r["report"]["summary"][mode]["contains"] = {"mean": v, "lo": v, "hi": v, "n": 4}
    text = render([r], "0.1 0.2 0.3")
    assert "| squad_short | f1 | 10.0 | 30.0 | 22.0 | 31.0 | +12.0 | +10.0 | met | +1.0 | met |" in text
    assert "| squad_short | contains | 2.0 | 24.0 | 10.0 | 20.0 | +8.0 | +11.0 | missed by 3.0 | -4.0 | missed |" in text
    assert "- contains: ft − base = +8.0 points; half of rag − base = +11.0: target missed by 3.0 points." in text


def test_the_store_keeps_no_machine_path_or_question_record(tmp_path, monkeypatch):
    from kinject.recipes import paper

    home, data = tmp_path / "home", tmp_path / "data"  # this machine's paths, as a real run records them

    def fake_run_set(name, overrides, echo):
        report = {**_result("local")["report"], "questions_file": str(data / "q.jsonl"), "settings": {"home": str(home)}}
        return {**_result("local"), "name": name, "kb": "paper-x", "report_dir": str(home / "kbs" / "x" / "eval" / "1"), "report": report}

    monkeypatch.setattr(paper, "run_set", fake_run_set)
    out = tmp_path / "out" / "results.md"
    out.parent.mkdir()
    paper.run_paper(["squad_short"], {}, out, echo=lambda _: None)
    stored = paper.results_store(out).read_text()
    assert str(home) not in stored and str(data) not in stored and "report_dir" not in stored
    assert "| squad_short | f1 | 10.0 |" in out.read_text()


def test_a_corrupt_store_is_an_error_and_is_not_overwritten(tmp_path, monkeypatch):
    """Read as empty, the store would be replaced by this run's sets alone: every other set's
    numbers lost."""
    from kinject.core.errors import KinjectError
    from kinject.recipes import paper

    monkeypatch.setattr(paper, "run_set", lambda name, overrides, echo: {**_result("local"), "name": name})
    out = tmp_path / "results.md"
    store = paper.results_store(out)
    store.write_text('{"squad_short": {"name": "squad_short", ')  # torn by hand or by an editor
    with pytest.raises(KinjectError, match="not valid JSON"):
        paper.run_paper(["multihop_rag"], {}, out, echo=lambda _: None)
    assert store.read_text() == '{"squad_short": {"name": "squad_short", '
