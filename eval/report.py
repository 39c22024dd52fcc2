"""The eval report: `EvalReport`, and on disk report.json, per_question.jsonl, table.md and
chart.png in one folder of the KB's eval/ (named dataset-split-time, written atomically), and
`compare`.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

from kinject.core.errors import KinjectError
from kinject.core.files import atomic_dir, read_jsonl
from kinject.core.stage import StageResult
from kinject.eval import metrics as M

LABELS = {
    "em": "EM", "f1": "F1", "contains": "contains", "yes_no": "yes/no acc", "judge": "judge",
    "acc": "acc", "acc_norm": "acc_norm", "recall": "R@{k}", "mrr": "MRR",
}
ORDER = list(LABELS)
IN_SAMPLE_MARK = "†"  # auto scored on the questions its router was fitted on


class ReportError(KinjectError):
    pass


@dataclass(kw_only=True)
class EvalReport(StageResult):
    """Status "skipped" when an earlier report answered the same questions with the same
    settings, index and adapter, and is reused."""

    stage: ClassVar[str] = "eval"
    dataset: str
    split: str | None
    modes: list[str]
    stats: dict  # mode -> metric -> {mean, lo, hi, n}; report.json's "summary"
    cost: dict  # mode -> latency / token numbers
    paired: list[dict]  # one paired test per metric and pair of modes
    router: dict | None
    per_question: list[dict]
    info: dict  # settings, models and their hashes, backend, questions file...
    dir: Path | None = None
    table: str = ""
    skipped: dict = field(default_factory=dict)  # question kinds left out, with the reason

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "modes": self.modes,
            "summary": self.stats,
            "cost": self.cost,
            "paired": self.paired,
            "router": self.router,
            "skipped": self.skipped,
            **self.info,
        }

    @classmethod
    def load(cls, folder: Path, **result) -> "EvalReport":
        """The report written to `folder`; `result`: this call's StageResult fields."""
        data, per_question = load_report(folder)
        own = {"dataset", "split", "modes", "summary", "cost", "paired", "router", "skipped"}
        return cls(
            dataset=data["dataset"],
            split=data["split"],
            modes=data["modes"],
            stats=data["summary"],
            cost=data["cost"],
            paired=data["paired"],
            router=data["router"],
            per_question=per_question,
            info={k: v for k, v in data.items() if k not in own},
            dir=folder,
            table=(folder / "table.md").read_text(),
            skipped=data.get("skipped", {}),
            **result,
        )

    def summary(self) -> str:
        return f"{self.table}\nreport: {self.dir}\nchart:  {self.dir / 'chart.png'}"


def label(metric: str, k: int) -> str:
    return LABELS.get(metric, metric).format(k=k)


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def metric_columns(summary: dict) -> list[str]:
    present = {m for per_mode in summary.values() for m in per_mode}
    return [m for m in ORDER if m in present] + sorted(present - set(ORDER))


def in_sample(report: dict) -> bool:
    """Whether `auto` was scored on questions its router was fitted on."""
    return bool((report.get("auto_router_used") or {}).get("fitted_on_these"))


def _qps(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def router_note(used: dict, n_questions: int) -> str:
    """Which router `auto` answered with, and whether it was fitted on these questions."""
    how = f"min_score={used['min_score']}, with_context={used['with_context']}"
    if used["source"] == "defaults":
        return f"auto routed with the configured default, serve.auto_rag_min_score ({how}), fitted on no questions."
    n, splits = used["fitted_n"], "/".join(used["fitted_splits"] or [])
    if used["fitted_on_these"] is None:
        return f"auto routed with the router an earlier eval fitted ({how}); which questions it was fitted on was not recorded."
    if used["fitted_on_these"]:
        return (
            f"{IN_SAMPLE_MARK} auto routed with a router fitted on these questions ({used['fitted_on_these']} of these "
            f"{n_questions} were among the {n} {splits} questions it was fitted on; {how}): its scores are in-sample, "
            "not a measurement of auto."
        )
    return f"auto routed with the router an earlier eval fitted on {n} other {splits} questions ({how}), none of these."


def render_table(report: dict) -> str:
    """Rows = modes, columns = metrics as "mean [95% CI]" in percent, then cost."""
    summary, cost, k = report["summary"], report["cost"], report.get("top_k", 0)
    cols = metric_columns(summary)
    flagged = in_sample(report)

    def name(mode: str) -> str:
        return f"{mode} {IN_SAMPLE_MARK}" if flagged and mode == "auto" else mode

    head = ["mode", *(label(c, k) for c in cols), "batch p50 s", "batch p95 s", "q/s", "tokens/q"]
    lines = [
        f"### {report['dataset']} ({report.get('split') or 'all'}): {report['n_questions']} questions, {report['backend']['backend']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for mode in report["modes"]:
        cells = [name(mode)]
        for c in cols:
            s = summary[mode].get(c)
            cells.append(f"{_pct(s['mean'])} [{_pct(s['lo'])}, {_pct(s['hi'])}]" if s else "")
        c = cost[mode]
        cells += [f"{c['batch_p50_s']:.2f}", f"{c['batch_p95_s']:.2f}", _qps(c["questions_per_s"]), f"{c['completion_tokens_mean']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for mode in report["modes"]:
        routes = cost[mode].get("answered_by", {})
        if mode == "auto" and routes:
            lines.append("")
            lines.append("auto answered with: " + ", ".join(f"{m} {n}" for m, n in sorted(routes.items())) + ".")
    if report.get("auto_router_used"):
        lines.append(router_note(report["auto_router_used"], report["n_questions"]))
    counts = sorted({(c, s[c]["n"]) for s in summary.values() for c in s})
    lines += [
        "",
        "Percent, with 95% bootstrap intervals; n per metric: " + ", ".join(f"{label(c, k)} {n}" for c, n in counts) + ".",
        "batch p50 / p95 s: wall time of the batch each question was answered in (in-process: up to engine.max_batch_size "
        "questions at once; an endpoint: its own request), not one question's latency; q/s: questions per second of the "
        "mode's answering wall time (grading excluded).",
    ]
    if report.get("skipped"):
        skipped = ", ".join(f"{v['questions']} {kind} questions ({v['reason']})" for kind, v in report["skipped"].items())
        lines += [f"Skipped: {skipped}."]
    if report.get("paired"):
        lines += ["", "Paired tests on the same questions (points):", "", "| metric | A | B | B − A | p | test |", "|---|---|---|---|---|---|"]
        for t in report["paired"]:
            lines.append(f"| {label(t['metric'], k)} | {name(t['a'])} | {name(t['b'])} | {100 * t['diff']:+.1f} | {t['p']:.3f} | {t['test']} |")
    r = report.get("router")
    if r:
        lines += [
            "",
            f"Router fitted on these questions, for later runs of auto: with_context={r['with_context']}, min_score={r['min_score']} ({r['basis']}).",
        ]
    return "\n".join(lines) + "\n"


def render_chart(report: dict) -> bytes:
    """Grouped bars: one group per metric, one bar per mode, 95% intervals as whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, modes, k = report["summary"], report["modes"], report.get("top_k", 0)
    cols = metric_columns(summary)
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(cols) + 2), 4.2), dpi=110)
    for i, mode in enumerate(modes):
        xs, ys, lo, hi = [], [], [], []
        for j, c in enumerate(cols):
            s = summary[mode].get(c)
            if not s:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(100 * s["mean"])
            lo.append(100 * (s["mean"] - s["lo"]))
            hi.append(100 * (s["hi"] - s["mean"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=mode)
    ax.set_xticks(range(len(cols)), [label(c, k) for c in cols])
    ax.set_ylabel("percent")
    ax.set_ylim(0, 105)
    ax.set_title(f"{report['dataset']} ({report.get('split') or 'all'}), n={report['n_questions']}, 95% bootstrap CI")
    ax.legend(ncol=len(modes), fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(kb, report) -> Path:
    """Write the four files into a new folder of kb's eval/ in one atomic rename; sets
    report.dir and report.table."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = kb.dir("eval") / f"{report.dataset}-{report.split or 'all'}-{stamp}"
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    data = report.to_json()
    report.table = render_table(data)
    with atomic_dir(target) as tmp:
        (tmp / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        (tmp / "per_question.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in report.per_question))
        (tmp / "table.md").write_text(report.table)
        (tmp / "chart.png").write_bytes(render_chart(data))
    report.dir = target
    return target


# ---- comparing two reports -------------------------------------------------------------------------
def load_report(path: Path | str) -> tuple[dict, list[dict]]:
    path = Path(path)
    folder = path.parent if path.name == "report.json" else path
    if not (folder / "report.json").is_file():
        raise ReportError(f"no eval report at {path} (expected a folder holding report.json)")
    try:
        report = json.loads((folder / "report.json").read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{folder / 'report.json'} is not valid JSON: {e}") from None
    return report, read_jsonl(folder / "per_question.jsonl")


def compare(a_path: Path | str, b_path: Path | str, samples: int = 1000, seed: int = 0) -> str:
    """Each mode's metrics in report A and B, the change, and a paired test on the questions
    both answered (p), so a change inside the noise is visible as such."""
    a, a_rows = load_report(a_path)
    b, b_rows = load_report(b_path)
    k = a.get("top_k", 0)
    lines = [
        f"A: {a['dataset']} ({a.get('split') or 'all'}) {a.get('created_at')}, {a['n_questions']} questions — {a_path}",
        f"B: {b['dataset']} ({b.get('split') or 'all'}) {b.get('created_at')}, {b['n_questions']} questions — {b_path}",
    ]
    if a.get("questions_sha256") != b.get("questions_sha256"):
        lines.append("note: the two reports used different question files")
    lines += ["", "| mode | metric | A | B | B − A | p (paired) | n paired |", "|---|---|---|---|---|---|---|"]
    index_a = {(r["mode"], r["qid"]): r for r in a_rows}
    modes = [m for m in a["modes"] if m in b["modes"]]
    if not modes:
        raise ReportError(f"the reports share no mode (A: {', '.join(a['modes'])}; B: {', '.join(b['modes'])})")
    for mode in modes:
        for metric in metric_columns({mode: a["summary"][mode] | b["summary"][mode]}):
            sa, sb = a["summary"][mode].get(metric), b["summary"][mode].get(metric)
            if not sa or not sb:
                continue
            pairs = [
                (index_a[(mode, r["qid"])]["scores"][metric], r["scores"][metric])
                for r in b_rows
                if r["mode"] == mode and metric in r["scores"] and metric in index_a.get((mode, r["qid"]), {}).get("scores", {})
            ]
            p = M.paired_test(*zip(*pairs), samples=samples, seed=seed)["p"] if pairs else math.nan
            lines.append(
                f"| {mode} | {label(metric, k)} | {_pct(sa['mean'])} | {_pct(sb['mean'])} | {100 * (sb['mean'] - sa['mean']):+.1f} | "
                f"{'–' if math.isnan(p) else f'{p:.3f}'} | {len(pairs)} |"
            )
    only = sorted(set(a["modes"]) ^ set(b["modes"]))
    if only:
        lines.append(f"\nmodes in one report only: {', '.join(only)}")
    return "\n".join(lines) + "\n"
