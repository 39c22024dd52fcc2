"""`kinject paper`: the knowledge-injection report on the third-party sets in ../shared/data.

For each set: build a KB from its corpus.jsonl (ingest → augment → train; the local preset unless
`--preset` names another), evaluate base / rag / ft / ft-rag on its dev split, and write one table
per set into docs/results.md with the preset, the 95% intervals, the synthetic-token budget, the
training tokens and the wall time, and how far the run is from the target: ft − base ≥ ½ (rag −
base), and ft-rag ≥ rag.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from kinject.core.errors import KinjectError
from kinject.core.files import read_json
from kinject.core.kb import KB, work_seconds
from kinject.core.settings import _deep_merge, load_settings
from kinject.recipes.build import build

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "docs" / "results.md"
# Sections written by other measurements (the influence comparison) sit below this line, and a
# rewrite keeps them.
KEPT_BELOW = "<!-- kinject paper keeps everything below this line -->"
SPLIT = "dev"

# Per set, on top of the local preset. squad_short and multihop_rag run the preset as `kinject
# build` does (its synthetic budget and epochs). quality_mc's 300 kB of stories would
# take hours at that budget on two CPU cores, so it keeps a small fixed budget and one epoch, and
# its row says what it measures: the preset's data recipe at a fraction of its budget. Anything
# here can be changed with `kinject --set ... paper`.
PAPER_SETS: dict[str, dict[str, Any]] = {
    "squad_short": {},
    "multihop_rag": {},
    "quality_mc": {"augment": {"budget_tokens": 6000}, "train": {"max_steps": 0, "epochs": 1.0}},
}


class PaperError(KinjectError):
    pass


def run_set(name: str, overrides: dict, echo: Callable[[str], None] = typer.echo) -> dict:
    """Build and evaluate one set; the numbers its section of the report needs."""
    from kinject.core.answer import MODES
    from kinject.eval.reuse import reused_eval
    from kinject.eval.run import evaluate

    folder = SHARED_DATA / name
    corpus, questions = folder / "corpus.jsonl", folder / "questions.jsonl"
    if not corpus.exists() or not questions.exists():
        raise PaperError(f"../shared/data/{name} is missing (need corpus.jsonl and questions.jsonl beside the clone)")
    spec = dict(PAPER_SETS[name])
    limit = spec.pop("eval_limit", None)
    settings = load_settings(_deep_merge(_deep_merge({"preset": "local"}, spec), overrides))
    kb = KB.open(settings, f"paper-{name}", create=True)
    echo(f"\n######## {name}: KB {kb.name!r}")
    t0 = time.perf_counter()
    built = build(kb, corpus, settings, echo=echo)
    modes = list(MODES)
    echo(f"== eval {', '.join(modes)} on the {SPLIT} split")
    evaluated = reused_eval(kb, questions, SPLIT, modes, settings, limit)
    if evaluated is None:
        evaluated = evaluate(kb, questions, modes, settings, split=SPLIT, limit=limit, progress=True)
    echo(evaluated.status_line())
    report_dir = evaluated.dir
    this_run = round(time.perf_counter() - t0, 1)

    # A reused stage counts with the wall time of the run that produced it.
    stage_seconds = {r.stage: work_seconds(kb.stage(r.stage)) if r.status == "skipped" else r.seconds for r in built}
    stage_seconds["eval"] = evaluated.seconds
    if evaluated.status == "skipped":  # the eval record keeps its run's time while it names this report
        rec = kb.stage("eval") or {}
        same = rec.get("outputs", {}).get("report") == str(report_dir.relative_to(kb.root))
        stage_seconds["eval"] = rec["outputs"].get("seconds") if same else None
    report = read_json(report_dir / "report.json", {})
    synthetic = read_json(kb.dir("augment") / "report.json", {})
    train_report = read_json(kb.dir("train") / "report.json", {})
    return {
        "name": name,
        "kb": kb.name,
        "report_dir": str(report_dir),
        "report": report,
        "table": (report_dir / "table.md").read_text(),
        "settings": {"preset": settings.preset, "augment": settings.augment.model_dump(mode="json"), "train": settings.train.model_dump(mode="json"), "llm": settings.models.llm, "embedder": settings.models.embedder},
        "budget_tokens": settings.augment.budget_tokens,
        "eval_limit": limit,
        "top_k": settings.retrieval.top_k,
        "synthetic_tokens": synthetic.get("kept_tokens"),
        "generated_tokens": synthetic.get("generated_tokens"),
        "synthetic_report": synthetic,
        "training_tokens": train_report.get("tokens_seen"),
        "train_steps": train_report.get("steps"),
        "train_epochs": train_report.get("epochs"),
        "stage_seconds": stage_seconds,
        "this_run_seconds": this_run,
        "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


# ---- the report -------------------------------------------------------------------------------
def primary_metric(report: dict) -> str:
    from kinject.eval.scoring import PRIMARY

    kinds = report.get("kinds") or {}
    kind = max(kinds, key=kinds.get) if kinds else "short"
    return PRIMARY[kind]


def target_metrics(report: dict) -> list[str]:
    """The primary metric, and contains-gold beside F1 for short answers (the issue's targets
    name both; F1 rewards short answers, contains-gold long ones that hold the answer)."""
    metric = primary_metric(report)
    extra = ["contains"] if metric == "f1" and "contains" in (report.get("summary") or {}).get("rag", {}) else []
    return [metric, *extra]


def target_check(report: dict, metric: str | None = None) -> dict:
    """The two targets on one metric (default: the set's primary one), in points."""
    from kinject.core.answer import MODES

    metric = metric or primary_metric(report)
    mean = {m: 100 * report["summary"][m][metric]["mean"] for m in MODES if m in report.get("summary", {})}
    if len(mean) < len(MODES):
        return {"metric": metric, "mean": mean}
    ft_gain, rag_gain = mean["ft"] - mean["base"], mean["rag"] - mean["base"]
    paired = {(t["a"], t["b"]): t for t in report.get("paired", []) if t["metric"] == metric}
    return {
        "metric": metric,
        "mean": mean,
        "ft_gain": ft_gain,
        "half_rag_gain": rag_gain / 2,
        "ft_target_met": ft_gain >= rag_gain / 2,
        "ft_gap": rag_gain / 2 - ft_gain,
        "ftrag_minus_rag": mean["ft-rag"] - mean["rag"],
        "ftrag_target_met": mean["ft-rag"] >= mean["rag"],
        "p_ft_base": (paired.get(("base", "ft")) or {}).get("p"),
        "p_rag_ftrag": (paired.get(("rag", "ft-rag")) or {}).get("p"),
    }


def _secs(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.0f} s"


def _p(x: Optional[float]) -> str:
    return "" if x is None else f", paired p = {x:.3f}"


def render(results: list[dict], load: str) -> str:
    presets = " / ".join(f"`{p}`" for p in dict.fromkeys(r["settings"]["preset"] for r in results))
    lines = [
        "# Knowledge injection: base vs rag vs ft vs ft-rag",
        "",
        f"Written by `kinject paper` (`make paper`) on {datetime.now().strftime('%Y-%m-%d %H:%M')}; "
        f"load average at start {load} (two CPU cores, shared). Each set: a KB built from its `corpus.jsonl` "
        f"(ingest → augment → train) with the {presets} preset, then the four modes on its `dev` split. "
        "Percent with 95% bootstrap intervals; paired tests compare modes on the same questions.",
        "",
        "Target: **ft − base ≥ ½ (rag − base)** (the adapter recovers at least half of what retrieval adds) "
        "and **ft-rag ≥ rag** (the adapter does not hurt open-book answers), on each set's primary metric "
        "(token F1 for short answers, acc_norm for multiple choice).",
        "",
        "The synthetic-token scaling curve (`python -m bench.scaling`; points and intervals in "
        "[bench/results/scaling.md](../bench/results/scaling.md)):",
        "",
        "![ft and ft-rag contains-gold against synthetic training tokens](scaling.png)",
        "",
        "| set | metric | base | rag | ft | ft-rag | ft − base | ½ (rag − base) | ft target | ft-rag − rag | ft-rag target |",
        "|---|---|---:|---:|---:|---:|---:|---:|:-:|---:|:-:|",
    ]
    missing = [n for n in PAPER_SETS if n not in {r["name"] for r in results}]
    for r in results:
        for metric in target_metrics(r["report"]):
            t = target_check(r["report"], metric)
            if "ft_gain" not in t:
                lines.append(f"| {r['name']} | {t['metric']} | (incomplete) |||||||||")
                continue
            m = t["mean"]
            lines.append(
                f"| {r['name']} | {t['metric']} | {m['base']:.1f} | {m['rag']:.1f} | {m['ft']:.1f} | {m['ft-rag']:.1f} | "
                f"{t['ft_gain']:+.1f} | {t['half_rag_gain']:+.1f} | {'met' if t['ft_target_met'] else 'missed by %.1f' % t['ft_gap']} | "
                f"{t['ftrag_minus_rag']:+.1f} | {'met' if t['ftrag_target_met'] else 'missed'} |"
            )
    if missing:
        lines += ["", f"Not in this report yet: {', '.join(missing)} (`kinject paper --sets {','.join(missing)}` adds them)."]
    for r in results:
        secs = r["stage_seconds"]
        known = [v for v in secs.values() if v is not None]
        tr = r["settings"]["train"]
        lines += [
            "",
            f"## {r['name']}",
            "",
            *([f"- Run finished {r['finished']}."] if r.get("finished") else []),
            f"- Models: `{r['settings']['llm']}` answering, `{r['settings']['embedder']}` retrieving the top {r['top_k']} chunks.",
            f"- Questions: {r['report'].get('n_questions', '–')} of the dev split"
            + (f" (the first {r['eval_limit']}, to keep the set near eight minutes)." if r["eval_limit"] else "."),
            f"- Synthetic-token budget: {r['budget_tokens'] or 'from budget_multiple'} "
            f"(generated {r['generated_tokens'] if r['generated_tokens'] is not None else '–'} tokens, "
            f"kept after curation {r['synthetic_tokens'] if r['synthetic_tokens'] is not None else '–'}).",
            f"- Training: {r['training_tokens'] if r['training_tokens'] is not None else '–'} tokens seen in "
            f"{r['train_steps'] if r['train_steps'] is not None else '–'} steps "
            f"({r['train_epochs'] if r['train_epochs'] is not None else '–'} epochs; {'every weight' if tr.get('full_finetune') else 'LoRA rank ' + str(tr['lora_rank'])}, lr {tr['lr']}, "
            f"block {tr['block_size']}, batch {tr['batch_size']}).",
            f"- Wall time: ingest {_secs(secs.get('ingest'))}, augment {_secs(secs.get('augment'))}, train {_secs(secs.get('train'))}, "
            f"eval {_secs(secs.get('eval'))}; total {_secs(sum(known))} (load average {r['load_after']} when the set finished).",
        ]
        for metric in target_metrics(r["report"]):
            t = target_check(r["report"], metric)
            if "ft_gain" in t:
                lines += [
                    f"- {metric}: ft − base = {t['ft_gain']:+.1f} points{_p(t['p_ft_base'])}; half of rag − base = {t['half_rag_gain']:+.1f}: "
                    + ("target met." if t["ft_target_met"] else f"target missed by {t['ft_gap']:.1f} points."),
                    f"- {metric}: ft-rag − rag = {t['ftrag_minus_rag']:+.1f} points{_p(t['p_rag_ftrag'])}: "
                    + ("target met." if t["ftrag_target_met"] else "target missed."),
                ]
        lines += ["", r["table"].replace("### ", "#### ", 1).rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def results_store(out: Path) -> Path:
    """Each set's last numbers, kept beside the report so a run of some sets keeps the others'."""
    return out.with_suffix(".json")


# What the report needs from a set's result: the store holds no machine paths and none of the
# question file's records (the eval report's settings and file names stay in the KB).
_STORED_REPORT = ("kinds", "n_questions", "summary", "paired")
_UNSTORED = ("kb", "report_dir", "report", "synthetic_report")


def stored(result: dict) -> dict:
    kept = {k: v for k, v in result.items() if k not in _UNSTORED}
    return {**kept, "report": {k: result["report"][k] for k in _STORED_REPORT if k in result["report"]}}


def run_paper(names: list[str], overrides: dict, out: Path = RESULTS, echo: Callable[[str], None] = typer.echo) -> list[dict]:
    from kinject.core.files import atomic_write_json, atomic_write_text

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    store = results_store(out)
    old = out.read_text() if out.exists() else ""
    tail = old[old.index(KEPT_BELOW):] if KEPT_BELOW in old else ""
    kept = {n: r for n, r in read_json(store, {}).items() if n in PAPER_SETS}
    results = []
    for name in names:
        result = run_set(name, overrides, echo)
        result["finished"] = datetime.now().strftime("%Y-%m-%d %H:%M")
        results.append(result)
        kept[name] = stored(result)
        atomic_write_json(store, kept)
        # after each set, so a long run shows progress; sets in the report's order
        atomic_write_text(out, render([kept[n] for n in PAPER_SETS if n in kept], load) + (("\n" + tail) if tail else ""))
        echo(f"wrote {out} ({len(results)}/{len(names)} sets of this run)")
    return results


def paper_cmd(
    ctx: typer.Context,
    sets: Optional[str] = typer.Option(None, "--sets", help=f"Comma-separated subset of: {', '.join(PAPER_SETS)}."),
    out: Path = typer.Option(RESULTS, "--out", help="Markdown file to write."),
) -> None:
    """Build and evaluate a KB per set of ../shared/data (dev split) and write docs/results.md."""
    names = [s.strip() for s in sets.split(",")] if sets else list(PAPER_SETS)
    unknown = [n for n in names if n not in PAPER_SETS]
    if unknown:
        raise PaperError(f"unknown set(s) {', '.join(unknown)}; choose from {', '.join(PAPER_SETS)}")
    overrides = json.loads(json.dumps((ctx.find_root().obj or {}).get("overrides", {})))
    run_paper(names, overrides, out)
    typer.echo(Path(out).read_text())
