"""`evaluate(kb, questions, modes, settings)`: the same questions through every mode, scored.

Short answers are generated greedily; multiple choice is scored by log-likelihood (eval.mc);
eval.scoring turns both into rows of scores. Each mode's rows are appended to a partial file as
they finish, so a crashed run resumes where it stopped. The report goes to the KB's eval folder
and the manifest's "eval" stage, whose `router` entry calibrates the service's `auto` mode for
later runs (eval.router).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kinject.core.answer import ALL_MODES, AUTO, MODES, Answerer
from kinject.core.engines import Engine, SamplingParams
from kinject.core.errors import KinjectError
from kinject.core.files import append_jsonl, read_jsonl, sha256_file, sha256_text
from kinject.core.kb import KB, now_iso
from kinject.core.settings import Settings
from kinject.core.stage import StageTimer
from kinject.eval.backends import LocalBackend, connect
from kinject.eval.fingerprints import model_info
from kinject.eval.judge import Judge, make_judge
from kinject.eval.mc import score_mc
from kinject.eval.questions import MC, SHORT, Question, dataset_name, load_questions
from kinject.eval.report import EvalReport, in_sample, write_report
from kinject.eval.router import calibrate_router, router_in_use
from kinject.eval.scoring import cost_of, mc_row, paired_tests, short_row, summarize_modes



class EvalError(KinjectError):
    pass


@dataclass
class EvalRun:
    """One evaluation: the questions, the modes, and what answers and grades them."""

    kb: KB
    settings: Settings
    questions_path: Path
    questions: list[Question]  # those this run scores
    skipped: dict  # question kinds left out, with the reason
    modes: list[str]
    split: str | None
    limit: int | None
    endpoint: str | None  # a running server answers, instead of an in-process engine
    backend: Any  # LocalBackend, or an endpoint's (eval.backends.connect)
    answerer: Answerer | None  # the in-process answerer; None against an endpoint
    judge: Judge | None
    progress: bool
    timer: StageTimer

    @property
    def params(self) -> SamplingParams:
        """Greedy decoding: the same answer on every run."""
        return SamplingParams(max_new_tokens=self.settings.eval.max_new_tokens, temperature=0.0, seed=self.settings.seed)


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
        if wanted is None:
            wanted = [m for m in MODES if _can(backend, m)]
            if not wanted:
                raise EvalError(f"KB {kb.name!r} can answer in no mode")
        for m in wanted:
            backend.check(m)
        questions, skipped = _scorable(questions, answerer)
        questions, skipped = _not_influence_targets(kb, questions, skipped)
        run = EvalRun(
            kb=kb,
            settings=settings,
            questions_path=questions_path,
            questions=questions,
            skipped=skipped,
            modes=wanted,
            split=split,
            limit=limit,
            endpoint=endpoint,
            backend=backend,
            answerer=answerer,
            judge=make_judge(settings, endpoint),
            progress=progress,
            timer=timer,
        )
        return _evaluate(run)
    finally:
        if answerer is not None:  # what it opened; a shared engine stays open
            answerer.close()


def _can(backend, mode: str) -> bool:
    try:
        backend.check(mode)
        return True
    except KinjectError:
        return False


def _not_influence_targets(kb: KB, questions: list[Question], skipped: dict) -> tuple[list[Question], dict]:
    """Leave out the questions the KB's influence scoring aimed at (influence.target_questions):
    the synthetic data was chosen to teach exactly those, so their scores would flatter it."""
    from kinject.core.influence import normalize_question
    from kinject.core.synthetic import influence_target_questions

    targets = {normalize_question(q) for q in influence_target_questions(kb)}
    if not targets:
        return questions, skipped
    refused = [q for q in questions if normalize_question(q.question) in targets]
    if not refused:
        return questions, skipped
    kept = [q for q in questions if normalize_question(q.question) not in targets]
    if not kept:
        raise EvalError(f"every question is one of KB {kb.name!r}'s influence target questions, which the eval refuses to score")
    reason = "influence target questions: the KB's synthetic data was selected to teach these"
    return kept, {**skipped, "influence_target": {"questions": len(refused), "qids": [q.qid for q in refused], "reason": reason}}


def _scorable(questions: list[Question], answerer: Answerer | None) -> tuple[list[Question], dict]:
    """The questions this run can score, and the kinds it leaves out: multiple choice needs the
    log-likelihoods of the in-process engine."""
    mc = [q for q in questions if q.kind == MC]
    if not mc or answerer is not None:
        return questions, {}
    short = [q for q in questions if q.kind != MC]
    if not short:
        raise EvalError("every question is multiple choice, which needs log-likelihoods: evaluate without --endpoint")
    reason = "multiple choice is scored by log-likelihood on the in-process engine; an endpoint returns text only"
    return short, {"mc": {"questions": len(mc), "reason": reason}}


def _evaluate(run: EvalRun) -> EvalReport:
    kb = run.kb
    # No KB lock for the whole run (the service and other evals keep working); instead a run
    # during which ingest or train replaced the index or adapter is refused at the end.
    upstream = kb.answer_inputs()
    info = _info(run)
    partial = _partial_dir(kb, info, run.questions)
    resumed = any((partial / f"{mode}.jsonl").exists() for mode in run.modes)
    rows = {mode: _run_mode(run, mode, partial) for mode in run.modes}

    changed = [stage for stage, fp in kb.answer_inputs().items() if fp != upstream[stage]]
    if changed:
        raise EvalError(f"the KB's {' and '.join(changed)} stage changed while evaluating, so the answers mix old and new: run the eval again")
    report = EvalReport(
        status="resumed" if resumed else "ran",
        dataset=dataset_name(run.questions_path),
        split=run.split,
        modes=run.modes,
        stats=summarize_modes(rows, run.settings),
        cost={m: cost_of(r) for m, r in rows.items()},
        paired=paired_tests(rows, run.settings),
        router=calibrate_router(rows, run.questions, run.settings, run.backend.available()),
        per_question=[r for m in run.modes for r in rows[m]],
        info=info,
        skipped=run.skipped,
        **run.timer.elapsed(),
    )
    write_report(kb, report)
    _record(kb, report, run.timer, upstream)
    _clear_partial(partial)
    return report


def _info(run: EvalRun) -> dict:
    """What the report says about how its answers were made."""
    settings, questions, params = run.settings, run.questions, run.params
    info = {
        "created_at": now_iso(),
        "kb": run.kb.name,
        "questions_file": str(run.questions_path),
        "questions_sha256": sha256_file(run.questions_path),
        "limit": run.limit,
        "n_questions": len(questions),
        "kinds": {kind: sum(q.kind == kind for q in questions) for kind in (SHORT, MC) if any(q.kind == kind for q in questions)},
        "top_k": settings.retrieval.top_k,
        "sampling": {"max_new_tokens": params.max_new_tokens, "temperature": 0.0, "seed": params.seed},
        "backend": run.backend.describe(),
        "models": model_info(run.kb, settings, run.endpoint),
        "settings": settings.public_dict(),
        "judge": run.judge.describe() if run.judge else None,
    }
    if AUTO in run.modes:
        info["auto_router_used"] = router_in_use(run.kb, settings, run.answerer, run.backend.available(), questions)
    return info


def _run_mode(run: EvalRun, mode: str, partial: Path) -> list[dict]:
    """One mode's rows for every question: those the partial file holds, then the rest,
    answered a batch at a time and appended to it."""
    from tqdm import tqdm

    questions, settings, judge = run.questions, run.settings, run.judge
    k = settings.retrieval.top_k
    path = partial / f"{mode}.jsonl"
    done = {r["qid"]: r for r in read_jsonl(path)}
    todo = [q for q in questions if q.qid not in done]
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc=f"eval {mode}", unit="q") if run.progress else None
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
                replies = run.backend.answer(mode, short, run.params, progress=update)
                answering += time.perf_counter() - t0
                new += [short_row(mode, q, r, k) for q, r in zip(short, replies)]
                if judge:
                    grades = judge.grade_many([(q.question, q.answer or "", r.text) for q, r in zip(short, replies)])
                    for row, g in zip(new, grades):
                        row["scores"]["judge"] = g
            mc = [q for q in chunk if q.kind == MC]
            if mc:
                t0 = time.perf_counter()
                results = score_mc(run.answerer, mode, mc, chunk=step, progress=update)
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
    per_mode = {m: {k: round(v["mean"], 4) for k, v in s.items()} for m, s in report.stats.items()}
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
        outputs={"report": str(report.dir.relative_to(kb.root)), "seconds": report.seconds},
        metrics=metrics,
        started_at=timer.started_at,
    )
