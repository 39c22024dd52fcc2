"""The `auto` router: fitted on a run's non-held-out questions, used by later runs.

`auto` answers with the router the KB held when the run started (or the configured default),
never one fitted on the run itself, and a run whose questions that router was fitted on says so
in its report.
"""
from __future__ import annotations

from kinject.core.answer import Answerer, RouterConfig
from kinject.core.files import sha256_text
from kinject.core.kb import KB
from kinject.core.settings import Settings
from kinject.eval.questions import Question

HELDOUT_SPLITS = {"heldout", "test"}  # never tune the router on these
MIN_ROUTER_QUESTIONS = 20


def calibrate_router(rows: dict[str, list[dict]], questions: list[Question], settings: Settings, available: list[str]) -> dict | None:
    """The `auto` router from this run: `with_context` = the better of rag / ft-rag (ties go to
    rag); `min_score` = the top-1 retrieval score below which the closed-book mode answered
    better, by a grid search over the observed top-1 scores (ties go to the lower threshold, i.e.
    to retrieval). The modes compared are those `auto` itself chooses from (`available`: ft-rag
    and ft when the KB has an adapter). None when this run cannot say: one of those modes was not
    evaluated, or the questions include a held-out split, which must not be tuned on. `fitted_on`
    keeps a key per question so a later eval of `auto` knows whether it scores these questions."""
    context_modes = [m for m in ("rag", "ft-rag") if m in available]
    closed = "ft" if "ft" in available else "base"
    if not context_modes or any(m not in rows for m in [*context_modes, closed]):
        return None
    if any(q.split in HELDOUT_SPLITS for q in questions):
        return None

    def mean_primary(mode: str) -> float:
        return sum(r["primary"] for r in rows[mode]) / len(rows[mode])

    with_context = max(context_modes, key=lambda m: (mean_primary(m), m == "rag"))
    n = len(rows[with_context])
    fitted_on = {"splits": sorted({q.split or "(none)" for q in questions}), "questions": question_keys(questions)}
    router = {"with_context": with_context, "closed_book": closed, "n": n, "fitted_on": fitted_on}
    if n < MIN_ROUTER_QUESTIONS:
        return router | {"min_score": settings.serve.auto_rag_min_score, "basis": f"default serve.auto_rag_min_score ({n} < {MIN_ROUTER_QUESTIONS} questions)"}
    ctx = {r["qid"]: r for r in rows[with_context]}
    cb = {r["qid"]: r["primary"] for r in rows[closed]}
    top1 = {qid: max((s["score"] for s in r["sources"] if s.get("score") is not None), default=0.0) for qid, r in ctx.items()}
    qids = [qid for qid in ctx if qid in cb]

    def routed(t: float) -> float:
        return sum(ctx[q]["primary"] if top1[q] >= t else cb[q] for q in qids) / len(qids)

    # Thresholds halfway between neighbouring observed scores (sources carry 4 decimals), one
    # below all (always retrieve) and one above all (never).
    seen = sorted(set(top1.values()))
    candidates = [seen[0] - 0.01] + [(a + b) / 2 for a, b in zip(seen, seen[1:])] + [seen[-1] + 0.01]
    candidates = [round(t, 5) for t in candidates]
    best = max(candidates, key=lambda t: (round(routed(t), 12), -t))
    return router | {
        "min_score": best,
        "basis": f"grid search over {len(candidates)} thresholds on {len(qids)} questions",
        "routed_score": round(routed(best), 6),
        "all_context_score": round(routed(candidates[0]), 6),
        "all_closed_score": round(routed(candidates[-1]), 6),
    }


def question_keys(questions: list[Question]) -> list[str]:
    """A short key per question (its qid and text), enough to recognise it in another run."""
    return [sha256_text(f"{q.qid}\n{q.question}")[:12] for q in questions]


def router_in_use(kb: KB, settings: Settings, answerer: Answerer | None, available: list[str], questions: list[Question]) -> dict:
    """The router `auto` answers this run with: the one an earlier run fitted and the KB's eval
    stage holds, else the configured default. `fitted_on_these`: how many of these questions it
    was fitted on (None: not recorded); more than 0 makes auto's scores in-sample."""
    rec = ((kb.stage("eval") or {}).get("metrics") or {}).get("router")
    if answerer is not None:
        cfg = answerer.router_config()
    elif rec:  # an endpoint: a kinject server serving this KB routes with this record
        cfg = RouterConfig(rec["min_score"], rec["with_context"], "eval report")
    else:
        cfg = RouterConfig(settings.serve.auto_rag_min_score, "ft-rag" if "ft-rag" in available else "rag", "defaults")
    used = {"min_score": cfg.min_score, "with_context": cfg.with_context, "source": cfg.source}
    if cfg.source == "defaults":
        return used | {"fitted_splits": [], "fitted_n": 0, "fitted_on_these": 0}
    fitted = rec.get("fitted_on")
    if fitted is None:  # recorded before routers kept their questions
        return used | {"fitted_splits": None, "fitted_n": rec.get("n"), "fitted_on_these": None}
    keys = set(fitted["questions"])
    return used | {
        "fitted_splits": fitted["splits"],
        "fitted_n": len(fitted["questions"]),
        "fitted_on_these": sum(k in keys for k in question_keys(questions)),
    }
