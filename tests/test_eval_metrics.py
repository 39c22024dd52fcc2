"""eval: metrics, statistics, question files and report rendering (no model needed)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kinject.eval import metrics as M
from kinject.eval.questions import MC, SHORT, QuestionsError, dataset_name, load_questions
from tests.conftest import REPO


def test_squad_normalization_ignores_case_punctuation_articles_and_spaces():
    assert M.normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert M.exact_match("the Amazon", "Amazon.") == 1.0
    assert M.exact_match("Amazon river", "Amazon") == 0.0


def test_token_f1_counts_shared_tokens():
    # pred: "ten times more money" (4 tokens), gold: "ten times more" (3): P=3/4, R=1 -> F1=6/7
    assert M.token_f1("ten times more money", "ten times more") == pytest.approx(6 / 7)
    assert M.token_f1("Iran", "Iran") == 1.0
    assert M.token_f1("Saudi Arabia", "Iran") == 0.0
    assert M.token_f1("the", "a") == 1.0  # both normalize to nothing, as in the SQuAD script


def test_contains_gold_and_yes_no():
    assert M.contains_gold("It was founded in 1412 by settlers.", "1412") == 1.0
    assert M.contains_gold("It was founded in 14120.", "1412") == 0.0  # word boundaries
    assert M.is_yes_no("Yes") and M.is_yes_no("no") and not M.is_yes_no("Google")
    assert M.yes_no_correct("No, it does not.", "no") == 1.0
    assert M.yes_no_correct("Yes.", "no") == 0.0


def test_recall_and_reciprocal_rank_use_distinct_documents():
    ranked = M.ranked_doc_ids([{"doc_id": "a"}, {"doc_id": "a"}, {"doc_id": "b"}, {"doc_id": "c"}])
    assert ranked == ["a", "b", "c"]
    assert M.recall_at_k(ranked, ["c", "d"], k=3) == 0.5
    assert M.recall_at_k(ranked, ["c"], k=2) == 0.0
    assert M.reciprocal_rank(ranked, ["b"]) == 0.5
    assert M.reciprocal_rank(ranked, ["z"]) == 0.0


def test_bootstrap_interval_contains_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 2, 30).astype(float)
    big = rng.integers(0, 2, 3000).astype(float)
    for x in (small, big):
        lo, hi = M.bootstrap_ci(x, samples=2000, seed=0)
        assert lo <= x.mean() <= hi
    assert (np.subtract(*M.bootstrap_ci(big)[::-1])) < (np.subtract(*M.bootstrap_ci(small)[::-1]))
    assert M.bootstrap_ci([1.0] * 10) == (1.0, 1.0)


def test_paired_tests():
    a = [1.0, 0.0, 1.0, 1.0, 0.0] * 6
    same = M.paired_test(a, a)
    assert same["p"] == 1.0 and same["diff"] == 0.0 and same["test"] == "mcnemar_exact"
    f1 = [0.2, 0.5, 0.9, 0.1] * 5
    assert M.paired_test(f1, f1)["p"] == 1.0 and M.paired_test(f1, f1)["test"] == "paired_bootstrap"
    # 12 discordant pairs, all won by b: p = 2 * 0.5**12
    b = [1.0] * 12 + [0.0] * 8
    a2 = [0.0] * 12 + [0.0] * 8
    assert M.mcnemar_exact(a2, b) == pytest.approx(2 * 0.5**12)
    # 1 win out of 2 discordant pairs is no evidence
    assert M.mcnemar_exact([1, 0, 1], [0, 1, 1]) == 1.0
    assert M.paired_bootstrap([x + 0.3 for x in f1], f1) < 0.01


def test_load_questions_kinds_splits_and_limit():
    path = REPO / "demo" / "questions.jsonl"
    qs = load_questions(path)
    assert {q.kind for q in qs} == {SHORT, MC}
    dev = load_questions(path, split="dev", limit=5)
    assert len(dev) == 5 and all(q.split == "dev" for q in dev)
    mc = next(q for q in qs if q.kind == MC)
    assert mc.choices[mc.answer_index] == mc.answer
    assert dataset_name(path) == "demo"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"qid": "a", "question": "q?"}', "needs a non-empty 'answer'"),
        ('{"qid": "a", "question": "q?", "choices": ["x", "y"], "answer_index": 2}', "'answer_index' must be an integer from 0 to 1"),
        ('{"qid": "a", "question": "q?", "choices": ["x"], "answer_index": 0}', "2 or more"),
        ('{"qid": "a", "question": "q?", "answer": "x", "doc_ids": "d1"}', "'doc_ids' must be a list"),
        ('{"question": "q?", "answer": "x"}', "missing or empty 'qid'"),
    ],
)
def test_bad_question_files_name_the_line(tmp_path, line, message):
    p = tmp_path / "q.jsonl"
    p.write_text('{"qid": "ok", "question": "fine?", "answer": "yes"}\n' + line + "\n")
    with pytest.raises(QuestionsError, match="line 2") as e:
        load_questions(p)
    assert message in str(e.value)


def test_duplicate_qids_and_missing_split_are_refused(tmp_path):
    p = tmp_path / "q.jsonl"
    rows = [{"qid": "a", "question": "q?", "answer": "x", "split": "dev"}] * 2
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(QuestionsError, match="duplicate qid 'a'"):
        load_questions(p)
    p.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(QuestionsError, match="no questions in split 'test'; splits present: dev"):
        load_questions(p, split="test")
    with pytest.raises(QuestionsError, match="not found"):
        load_questions(tmp_path / "missing.jsonl")


def _rows(mode: str, primaries: list[float], top1: list[float] | None = None) -> list[dict]:
    return [
        {"qid": f"q{i}", "mode": mode, "primary": p, "scores": {"f1": p}, "sources": [{"doc_id": "d", "score": top1[i]}] if top1 else []}
        for i, p in enumerate(primaries)
    ]


def test_router_calibration_finds_the_threshold_where_retrieval_stops_helping():
    from kinject.core.settings import load_settings
    from kinject.eval.questions import Question
    from kinject.eval.router import calibrate_router, question_keys

    s = load_settings()
    n = 24
    top1 = [round(0.1 + 0.03 * i, 4) for i in range(n)]  # 0.10 .. 0.79
    # With context right only when the top passage scores 0.40 or more; closed book right below.
    rag = [1.0 if i >= 10 else 0.0 for i in range(n)]
    ft = [0.0 if i >= 10 else 1.0 for i in range(n)]
    qs = [Question(f"q{i}", "?", "a", split="dev") for i in range(n)]
    every = ["base", "rag", "ft", "ft-rag", "auto"]
    rows = {"rag": _rows("rag", rag, top1), "ft": _rows("ft", ft), "ft-rag": _rows("ft-rag", [0.0] * n, top1)}
    r = calibrate_router(rows, qs, s, every)
    assert r["with_context"] == "rag" and r["closed_book"] == "ft"
    assert r["min_score"] == pytest.approx((top1[9] + top1[10]) / 2)  # halfway between 0.37 and 0.40
    assert r["routed_score"] == 1.0 and r["all_context_score"] == pytest.approx(sum(rag) / n) and r["all_closed_score"] == pytest.approx(sum(ft) / n)
    # It keeps which questions it was fitted on, so a later eval of auto can tell.
    assert r["fitted_on"] == {"splits": ["dev"], "questions": question_keys(qs)} and len(set(r["fitted_on"]["questions"])) == n
    # Without an adapter the closed-book side is base; the adapter modes are not needed.
    r = calibrate_router({"rag": _rows("rag", rag, top1), "base": _rows("base", ft)}, qs, s, ["base", "rag", "auto"])
    assert r["closed_book"] == "base" and r["min_score"] == pytest.approx(0.385)
    # Too few questions: the default threshold, still the better context mode.
    few = calibrate_router({"rag": _rows("rag", rag[:10], top1), "ft-rag": _rows("ft-rag", [1.0] * 10, top1), "ft": _rows("ft", ft[:10])}, qs[:10], s, every)
    assert few["min_score"] == s.serve.auto_rag_min_score and few["with_context"] == "ft-rag" and "10 < 20" in few["basis"]
    # Ties go to rag.
    tie = calibrate_router({"rag": _rows("rag", [0.5] * n, top1), "ft-rag": _rows("ft-rag", [0.5] * n, top1), "ft": _rows("ft", ft)}, qs, s, every)
    assert tie["with_context"] == "rag"
    # No say: a mode auto chooses from was not evaluated, or the questions are held out.
    assert calibrate_router({"rag": _rows("rag", rag, top1), "ft": _rows("ft", ft)}, qs, s, every) is None
    held = [Question(f"q{i}", "?", "a", split="heldout") for i in range(n)]
    assert calibrate_router(rows, held, s, every) is None


class _KB:
    """Just enough of a KB for router_in_use: its eval stage."""

    def __init__(self, router: dict | None):
        self.router = router

    def stage(self, name: str) -> dict | None:
        return {"metrics": {"router": self.router}} if name == "eval" and self.router else None


def test_auto_knows_whether_its_router_was_fitted_on_the_questions_it_scores():
    """A router fitted on dev: auto scored on dev is in-sample (flagged, and never the best mode),
    on heldout it is not; without a fitted router auto uses the configured default."""
    from kinject.core.settings import load_settings
    from kinject.eval.questions import Question
    from kinject.eval.report import render_table
    from kinject.eval.report import EvalReport
    from kinject.eval.router import calibrate_router, router_in_use
    from kinject.eval.run import headline

    s = load_settings()
    n = 24
    every = ["base", "rag", "ft", "ft-rag", "auto"]
    dev = [Question(f"d{i}", f"dev question {i}?", "a", split="dev") for i in range(n)]
    heldout = [Question(f"h{i}", f"heldout question {i}?", "a", split="heldout") for i in range(n)]
    top1 = [round(0.1 + 0.03 * i, 4) for i in range(n)]
    rows = {m: _rows(m, [float(i % 2) for i in range(n)], top1 if "rag" in m else None) for m in ("rag", "ft", "ft-rag")}
    router = calibrate_router(rows, dev, s, every)
    assert calibrate_router(rows, heldout, s, every) is None  # never fitted on held-out questions

    on_dev = router_in_use(_KB(router), s, None, every, dev[:5])
    assert on_dev["source"] == "eval report" and on_dev["min_score"] == router["min_score"]
    assert (on_dev["fitted_on_these"], on_dev["fitted_n"], on_dev["fitted_splits"]) == (5, n, ["dev"])
    on_heldout = router_in_use(_KB(router), s, None, every, heldout)
    assert on_heldout["fitted_on_these"] == 0 and on_heldout["min_score"] == router["min_score"]
    default = router_in_use(_KB(None), s, None, every, dev)
    assert default == {"min_score": s.serve.auto_rag_min_score, "with_context": "ft-rag", "source": "defaults", "fitted_splits": [], "fitted_n": 0, "fitted_on_these": 0}
    unrecorded = {k: v for k, v in router.items() if k != "fitted_on"}
    assert router_in_use(_KB(unrecorded), s, None, every, dev)["fitted_on_these"] is None

    def report(used: dict, auto_score: float) -> EvalReport:
        scores = {"base": 0.2, "rag": 0.5, "auto": auto_score}
        per_question = [{"mode": m, "qid": "d0", "primary": v, "scores": {"f1": v}} for m, v in scores.items()]
        stat = {m: {"f1": {"mean": v, "lo": v, "hi": v, "n": 1}} for m, v in scores.items()}
        cost = {m: {"answered_by": {"rag": 1} if m == "auto" else {m: 1}, "batch_p50_s": 2.0, "batch_p95_s": 3.0, "questions_per_s": 0.5, "completion_tokens_mean": 4.0} for m in scores}
        info = {"n_questions": 5, "backend": {"backend": "in-process"}, "top_k": 2, "auto_router_used": used}
        return EvalReport(
            status="ran", dataset="set", split="dev", modes=list(scores), stats=stat, cost=cost, paired=[], router=None,
            per_question=per_question, info=info,
        )

    flagged = report(on_dev, 0.9)
    table = render_table(flagged.to_json())
    assert "| auto † |" in table and "fitted on these questions (5 of these 5 were among the 24 dev" in table and "in-sample" in table
    assert headline(flagged)["best_mode"] == "rag"  # an in-sample auto is no candidate
    clean = report(on_heldout, 0.9)
    table = render_table(clean.to_json())
    assert "| auto |" in table and "†" not in table and f"fitted on {n} other dev questions" in table and "none of these" in table
    assert headline(clean)["best_mode"] == "auto"
    assert "configured default, serve.auto_rag_min_score" in render_table(report(default, 0.9).to_json())


def test_cost_is_batch_time_and_throughput():
    """latency_s is the wall time of the batch a question was answered in; q/s is the questions
    over the summed answering wall time (each row carries its share of its chunk's)."""
    from kinject.eval.report import render_table
    from kinject.eval.scoring import cost_of

    # Two batches: 3 questions in 6 s, then 1 in 2 s -> 4 questions in 8 s.
    rows = [{"latency_s": 6.0, "wall_share_s": 2.0, "completion_tokens": 3, "answered_by": "rag"} for _ in range(3)]
    rows.append({"latency_s": 2.0, "wall_share_s": 2.0, "completion_tokens": 5, "answered_by": "rag"})
    c = cost_of(rows)
    assert (c["batch_p50_s"], c["questions_per_s"], c["completion_tokens_mean"]) == (6.0, 0.5, 3.5)
    assert "latency_p50_s" not in c
    assert cost_of([{k: v for k, v in r.items() if k != "wall_share_s"} for r in rows])["questions_per_s"] is None
    report = {
        "dataset": "set", "split": "dev", "n_questions": 4, "backend": {"backend": "in-process"}, "top_k": 2, "modes": ["rag"],
        "summary": {"rag": {"f1": {"mean": 0.5, "lo": 0.4, "hi": 0.6, "n": 4}}}, "cost": {"rag": c},
    }
    table = render_table(report)
    assert "| mode | F1 | batch p50 s | batch p95 s | q/s | tokens/q |" in table and "| 0.50 | 3.5 |" in table
