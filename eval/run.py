"""`evaluate(kb, questions, modes, settings)`: the same questions through every mode, scored.

Short answers are generated greedily and scored with SQuAD exact match / token F1 (plus
contains-gold, yes/no accuracy on yes/no questions, and the optional judge); multiple choice is
scored by log-likelihood (eval.mc); rag modes also get recall@k and MRR of the gold documents.
Each mode's rows are appended to a partial file as they finish, so a crashed run resumes where
it stopped. The report goes to the KB's eval folder and the manifest's "eval" stage, whose
`router` entry calibrates the service's `auto` mode.

The router is fitted on a run's non-held-out questions and used by later runs: `auto` answers
with the router the KB held when the run started (or the configured default), never one fitted
on the run itself, and a run whose questions that router was fitted on says so in its report.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from kinject.core.answer import ALL_MODES, AUTO, MODES, Answerer, RouterConfig
from kinject.core.engines import Engine, SamplingParams
from kinject.core.errors import KinjectError
from kinject.core.files import append_jsonl, read_jsonl, sha256_file, sha256_text, sha256_tree
from kinject.core.kb import KB, StageTimer, now_iso
from kinject.core.settings import Settings
from kinject.eval import metrics as M
from kinject.eval.backends import LocalBackend, Reply, connect
from kinject.eval.judge import make_judge
from kinject.eval.mc import score_mc
from kinject.eval.questions import MC, SHORT, Question, dataset_name, load_questions
from kinject.eval.report import in_sample

HELDOUT_SPLITS = {"heldout", "test"}  # never tune the router on these
MIN_ROUTER_QUESTIONS = 20
PRIMARY = {SHORT: "f1", MC: "acc_norm"}  # the per-question score the router and best_mode use
PAIRED_METRICS = ["em", "f1", "yes_no", "judge", "acc", "acc_norm", "recall"]


class EvalError(KinjectError):
    pass


@dataclass
class EvalReport:
    dataset: str
    split: str | None
    modes: list[str]
    summary: dict  # mode -> metric -> {mean, lo, hi, n}
    cost: dict  # mode -> latency / token numbers
    paired: list[dict]  # one paired test per metric and pair of modes
    router: dict | None
    per_question: list[dict]
    info: dict  # settings, models and their hashes, backend, questions file...
    dir: Path | None = None
    table: str = ""
    skipped: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "modes": self.modes,
            "summary": self.summary,
            "cost": self.cost,
            "paired": self.paired,
            "router": self.router,
            "skipped": self.skipped,
            **self.info,
        }


# ---- scoring one answer ----------------------------------------------------------------------
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


# ---- fingerprints -------------------------------------------------------------------------------
_MODEL_SHA: dict[tuple, str] = {}


def folder_fingerprint(path: Path, full_limit: int = 2 << 30) -> str:
    """sha256 of every file when the folder is at most 2 GiB; above that, of the names, sizes and
    config.json (hashing tens of GB on every eval would cost minutes)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    key = (str(path), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _MODEL_SHA:
        if sum(p.stat().st_size for p in files) <= full_limit:
            _MODEL_SHA[key] = sha256_tree(path)
        else:
            listing = "\n".join(f"{p.relative_to(path)} {p.stat().st_size}" for p in files)
            cfg = (path / "config.json").read_text() if (path / "config.json").exists() else ""
            _MODEL_SHA[key] = "sizes:" + sha256_text(listing + cfg)
    return _MODEL_SHA[key]


def model_info(kb: KB, settings: Settings, endpoint: str | None) -> dict:
    from kinject.core.models import resolve_model

    train, ingest = kb.stage("train"), kb.stage("ingest")
    info: dict = {
        "index_fingerprint": ingest["fingerprint"] if ingest else None,
        "adapter_fingerprint": train["fingerprint"] if train else None,
    }
    adapter_dir = kb.root / "adapter"
    if train and (adapter_dir / "adapter_config.json").exists():
        info["adapter_sha256"] = sha256_tree(adapter_dir)
    if endpoint is None:
        for role, ref in (("llm", settings.models.llm), ("embedder", settings.models.embedder)):
            info[role] = ref
            info[f"{role}_sha256"] = folder_fingerprint(resolve_model(ref, settings))
    return info


# ---- the one door -------------------------------------------------------------------------------
def parse_modes(modes: list[str] | str | None) -> list[str] | None:
    if modes is None:
        return None
    names = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    unknown = [m for m in names if m not in ALL_MODES]
    if unknown or not names:
        raise EvalError(f"unknown mode(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALL_MODES)}")
    return list(dict.fromkeys(names))


def evaluate(
    kb: KB,
    questions_path: Path | str,
    modes: list[str] | str | None,
    settings: Settings,
    split: str | None = None,
    limit: int | None = None,
    endpoint: str | None = None,
    progress: bool = True,
    engine: Engine | None = None,
) -> EvalReport:
    """Answer the questions in each mode, score them, write the report to the KB's eval folder
    and record the "eval" stage. `modes=None`: every one of base, rag, ft, ft-rag the KB can
    answer. `endpoint`: evaluate a running server instead of an in-process engine (`engine`,
    when given, is used in-process instead of a new one)."""
    timer = StageTimer()
    questions_path = Path(questions_path)
    wanted = parse_modes(modes)
    questions = load_questions(questions_path, split, limit)
    answerer = None
    try:
        if endpoint:
            backend = connect(endpoint, settings)
        else:
            answerer = Answerer(kb, settings, engine=engine)
            backend = LocalBackend(answerer, settings)
        return _evaluate(kb, questions_path, questions, wanted, settings, split, limit, endpoint, backend, answerer, progress, timer)
    finally:
        if answerer is not None and engine is None:  # an engine made here is closed here
            answerer.engine.close()


def _evaluate(kb, questions_path, questions, wanted, settings, split, limit, endpoint, backend, answerer, progress, timer) -> EvalReport:
    from tqdm import tqdm

    from kinject.eval.report import write_report

    if wanted is None:
        wanted = [m for m in MODES if _can(backend, m)]
        if not wanted:
            raise EvalError(f"KB {kb.name!r} can answer in no mode")
    for m in wanted:
        backend.check(m)

    skipped: dict = {}
    mc_qs = [q for q in questions if q.kind == MC]
    if mc_qs and answerer is None:
        skipped["mc"] = {
            "questions": len(mc_qs),
            "reason": "multiple choice is scored by log-likelihood on the in-process engine; an endpoint returns text only",
        }
        questions = [q for q in questions if q.kind != MC]
        if not questions:
            raise EvalError("every question is multiple choice, which needs log-likelihoods: evaluate without --endpoint")
    judge = make_judge(settings, endpoint)
    # No KB lock for the whole run (the service and other evals keep working); instead a run
    # during which ingest or train replaced the index or adapter is refused at the end.
    upstream = kb.answer_inputs()
    k = settings.retrieval.top_k
    params = SamplingParams(max_new_tokens=settings.eval.max_new_tokens, temperature=0.0, seed=settings.seed)

    info = {
        "created_at": now_iso(),
        "kb": kb.name,
        "questions_file": str(questions_path),
        "questions_sha256": sha256_file(questions_path),
        "limit": limit,
        "n_questions": len(questions),
        "kinds": {kind: sum(q.kind == kind for q in questions) for kind in (SHORT, MC) if any(q.kind == kind for q in questions)},
        "top_k": k,
        "sampling": {"max_new_tokens": params.max_new_tokens, "temperature": 0.0, "seed": params.seed},
        "backend": backend.describe(),
        "models": model_info(kb, settings, endpoint),
        "settings": settings.public_dict(),
        "judge": judge.describe() if judge else None,
    }
    if AUTO in wanted:
        info["auto_router_used"] = router_in_use(kb, settings, answerer, backend.available(), questions)

    partial = _partial_dir(kb, info, questions)
    rows: dict[str, list[dict]] = {}
    for mode in wanted:
        rows[mode] = _run_mode(mode, questions, backend, answerer, params, judge, k, partial, settings, progress, tqdm)

    changed = [stage for stage, fp in kb.answer_inputs().items() if fp != upstream[stage]]
    if changed:
        raise EvalError(f"the KB's {' and '.join(changed)} stage changed while evaluating, so the answers mix old and new: run the eval again")
    router = calibrate_router(rows, questions, settings, backend.available())
    report = EvalReport(
        dataset=dataset_name(questions_path),
        split=split,
        modes=wanted,
        summary=summarize_modes(rows, settings),
        cost={m: cost_of(r) for m, r in rows.items()},
        paired=paired_tests(rows, settings),
        router=router,
        per_question=[r for m in wanted for r in rows[m]],
        info=info,
        skipped=skipped,
    )
    write_report(kb, report)
    _record(kb, report, timer, upstream)
    _clear_partial(partial)
    return report


def _can(backend, mode: str) -> bool:
    try:
        backend.check(mode)
        return True
    except KinjectError:
        return False


def _run_mode(mode, questions, backend, answerer, params, judge, k, partial: Path, settings, progress: bool, tqdm) -> list[dict]:
    path = partial / f"{mode}.jsonl"
    done = {r["qid"]: r for r in read_jsonl(path)}
    todo = [q for q in questions if q.qid not in done]
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc=f"eval {mode}", unit="q") if progress else None
    update = bar.update if bar else None
    step = settings.engine.max_batch_size
    try:
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            new = []
            answering = 0.0  # wall seconds spent answering this chunk (the judge's grading excluded)
            short = [q for q in chunk if q.kind == SHORT]
            if short:
                t0 = time.perf_counter()
                replies = backend.answer(mode, short, params, progress=update)
                answering += time.perf_counter() - t0
                new += [short_row(mode, q, r, k) for q, r in zip(short, replies)]
                if judge:
                    grades = judge.grade_many([(q.question, q.answer or "", r.text) for q, r in zip(short, replies)])
                    for row, g in zip(new, grades):
                        row["scores"]["judge"] = g
            mc = [q for q in chunk if q.kind == MC]
            if mc:
                t0 = time.perf_counter()
                results = score_mc(answerer, mode, mc, chunk=step, progress=update)
                answering += time.perf_counter() - t0
                new += [mc_row(mode, r, k) for r in results]
            for row in new:  # summed over a mode's rows: its answering wall time, across resumed runs too
                row["wall_share_s"] = round(answering / len(new), 6)
            append_jsonl(path, new)
            done.update((r["qid"], r) for r in new)
    finally:
        if bar:
            bar.close()
    return [done[q.qid] for q in questions]


def _partial_dir(kb: KB, info: dict, questions: list[Question]) -> Path:
    """Rows of an unfinished run live under a key of everything that shapes them, so a rerun of
    the same evaluation resumes and any change starts afresh."""
    eval_rec = kb.stage("eval") or {}
    key = {
        k: info[k] for k in ("questions_sha256", "top_k", "sampling", "backend", "models", "settings", "judge")
    } | {"qids": [q.qid for q in questions], "router_from": eval_rec.get("fingerprint")}
    d = kb.dir("eval") / ".partial" / sha256_text(json.dumps(key, sort_keys=True, default=str))[:16]
    d.mkdir(parents=True, exist_ok=True)
    return d


def _clear_partial(partial: Path) -> None:
    import shutil

    shutil.rmtree(partial, ignore_errors=True)


def headline(report: EvalReport) -> dict:
    """The numbers the manifest keeps: per mode its means, the best mode by the primary score
    (an in-sample auto is no candidate)."""
    per_mode = {m: {k: round(v["mean"], 4) for k, v in s.items()} for m, s in report.summary.items()}
    candidates = [m for m in report.modes if not (m == AUTO and in_sample(report.info))]

    def primary(m: str) -> float:
        rows = [r["primary"] for r in report.per_question if r["mode"] == m]
        return sum(rows) / len(rows) if rows else 0.0

    return {
        "dataset": report.dataset,
        "split": report.split or "all",
        "questions": report.info["n_questions"],
        "best_mode": max(candidates, key=primary) if candidates else None,
        "modes": per_mode,
    }


def _record(kb: KB, report: EvalReport, timer: StageTimer, upstream: dict) -> None:
    # The fingerprints the answers were made with, not the current ones: an ingest or train that
    # lands after the end-of-run check then leaves this eval stale instead of passing for it.
    inputs = {s: fp for s, fp in upstream.items() if fp}
    metrics = headline(report)
    router = report.router
    previous = ((kb.stage("eval") or {}).get("metrics") or {}).get("router")
    # A run that cannot calibrate (missing modes, held-out split, too few questions) keeps the
    # router an earlier run calibrated.
    if previous and (router is None or router["basis"].startswith("default")):
        router = previous
    if router is not None:
        metrics["router"] = router
    kb.record_stage(
        "eval",
        fingerprint=sha256_file(report.dir / "report.json"),
        inputs=inputs,
        outputs={"report": str(report.dir.relative_to(kb.root)), "seconds": timer.seconds},
        metrics=metrics,
        started_at=timer.started_at,
    )
