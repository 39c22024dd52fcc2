"""Scoring: one answer into a row of scores, and a mode's rows into means, costs and paired tests.

Short answers get SQuAD exact match / token F1, contains-gold and, on yes/no questions, yes/no
accuracy; multiple choice gets acc and acc_norm; rag modes also get recall@k and MRR of the gold
documents.
"""
from __future__ import annotations

from itertools import combinations

from kinject.core.answer import MODES
from kinject.core.settings import Settings
from kinject.eval import metrics as M
from kinject.eval.backends import Reply
from kinject.eval.questions import MC, SHORT, Question

PRIMARY = {SHORT: "f1", MC: "acc_norm"}  # the per-question score the router and best_mode use
PAIRED_METRICS = ["em", "f1", "yes_no", "judge", "acc", "acc_norm", "recall"]


def _retrieval_scores(mode: str, q: Question, sources: list[dict], k: int) -> dict:
    if not MODES.get(mode, MODES["base"]).retrieval or not q.doc_ids:
        return {}
    ranked = M.ranked_doc_ids(sources)
    return {"recall": M.recall_at_k(ranked, q.doc_ids, k), "mrr": M.reciprocal_rank(ranked, q.doc_ids)}


def _slim(sources: list[dict]) -> list[dict]:
    return [{"doc_id": s["doc_id"], "score": s.get("score"), "chunk_id": s.get("chunk_id")} for s in sources]


def short_row(mode: str, q: Question, r: Reply, k: int) -> dict:
    gold = q.answer or ""
    scores = {"em": M.exact_match(r.text, gold), "f1": M.token_f1(r.text, gold), "contains": M.contains_gold(r.text, gold)}
    if M.is_yes_no(gold):
        scores["yes_no"] = M.yes_no_correct(r.text, gold)
    scores |= _retrieval_scores(mode, q, r.sources, k)
    return {
        "qid": q.qid, "mode": mode, "answered_by": r.mode, "kind": SHORT, "question": q.question, "gold": gold,
        "prediction": r.text, "correct": bool(scores["em"]), "scores": scores, "primary": scores[PRIMARY[SHORT]],
        "sources": _slim(r.sources), "latency_s": round(r.latency_s, 4), "completion_tokens": r.completion_tokens,
        "route_reason": r.route_reason,
    }


def mc_row(mode: str, res, k: int) -> dict:
    q = res.question
    scores = {"acc": res.acc, "acc_norm": res.acc_norm} | _retrieval_scores(mode, q, res.sources, k)
    return {
        "qid": q.qid, "mode": mode, "answered_by": res.mode, "kind": MC, "question": q.question,
        "gold": q.choices[q.answer_index], "gold_index": q.answer_index,
        "prediction": q.choices[res.scores.pred], "pred_index": res.scores.pred, "pred_norm_index": res.scores.pred_norm,
        "logprobs": [round(x, 4) for x in res.scores.logprobs], "correct": bool(res.acc), "scores": scores,
        "primary": scores[PRIMARY[MC]], "sources": _slim(res.sources), "latency_s": round(res.latency_s, 4),
        "completion_tokens": 0, "route_reason": res.route_reason,
    }


# ---- statistics over rows ----------------------------------------------------------------------
def summarize_modes(rows: dict[str, list[dict]], settings: Settings) -> dict:
    out = {}
    for mode, mode_rows in rows.items():
        metrics: dict[str, list[float]] = {}
        for r in mode_rows:
            for name, v in r["scores"].items():
                metrics.setdefault(name, []).append(v)
        out[mode] = {name: M.summarize(v, settings.eval.bootstrap_samples, settings.seed) for name, v in metrics.items()}
    return out


def cost_of(rows: list[dict]) -> dict:
    """A row's `latency_s` is the wall time of the batch it was answered in (in-process: up to
    engine.max_batch_size questions together; an endpoint: its own request), so the percentiles
    are of batch times, not of one question's latency; `questions_per_s` is the throughput."""
    lat = [r["latency_s"] for r in rows]
    toks = [r["completion_tokens"] for r in rows]
    answered_by: dict[str, int] = {}
    for r in rows:
        answered_by[r["answered_by"]] = answered_by.get(r["answered_by"], 0) + 1
    wall = sum(r["wall_share_s"] for r in rows) if all("wall_share_s" in r for r in rows) else 0.0
    return {
        "answered_by": answered_by,
        "batch_p50_s": round(M.percentile(lat, 50), 4),
        "batch_p95_s": round(M.percentile(lat, 95), 4),
        "questions_per_s": round(len(rows) / wall, 4) if wall > 0 else None,
        "completion_tokens_mean": round(sum(toks) / len(toks), 2) if toks else 0.0,
        "completion_tokens_total": sum(toks),
    }


def paired_tests(rows: dict[str, list[dict]], settings: Settings) -> list[dict]:
    out = []
    for a, b in combinations(list(rows), 2):
        by_q = {r["qid"]: r["scores"] for r in rows[b]}
        for metric in PAIRED_METRICS:
            pairs = [(r["scores"][metric], by_q[r["qid"]][metric]) for r in rows[a] if metric in r["scores"] and metric in by_q.get(r["qid"], {})]
            if pairs:
                xs, ys = zip(*pairs)
                # diff = B − A: the later mode against the earlier one (rag − base)
                out.append({"metric": metric, "a": a, "b": b, **M.paired_test(ys, xs, settings.eval.bootstrap_samples, settings.seed)})
    return out
