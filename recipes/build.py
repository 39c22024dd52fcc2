"""`kinject build CORPUS --kb NAME`: ingest → augment → train in one go.

Each stage's door owns its skip/resume logic (it compares its inputs with its manifest record);
build only calls the doors in order, times them, and tells which ones did work. A stage counts
as reused when its manifest record is untouched by the call, or when its report says so.
"""
from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from kinject.core.errors import KinjectError
from kinject.core.kb import KB
from kinject.core.settings import Settings

BUILD_STAGES = ("ingest", "augment", "train")

# stage -> (module, function): the one public door of each stage.
DOORS: dict[str, tuple[str, str]] = {
    "ingest": ("ingest.pipeline", "ingest"),
    "augment": ("ingest.augment", "augment"),
    "train": ("finetune.train", "train"),
    "eval": ("eval.run", "evaluate"),
}


class BuildError(KinjectError):
    pass


def door(stage: str) -> Callable[..., Any]:
    module, name = DOORS[stage]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise BuildError(f"the {stage} stage is not installed ({module}.{name}: {e})") from None


@dataclass
class StageRun:
    stage: str
    status: str  # "ran", "resumed" or "skipped"
    seconds: float  # wall time
    report: Any = None
    cpu_seconds: float = 0.0  # this process's CPU time, all threads: wall time inflates on a busy machine, this less so


def timed(stage: str, fn: Callable[[], Any], status: str = "ran") -> StageRun:
    """Call fn and return its result in a StageRun with its wall and CPU time."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return StageRun(stage, status, round(time.perf_counter() - t0, 1), result, round(time.process_time() - c0, 1))


@dataclass
class BuildReport:
    kb: str
    runs: list[StageRun] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return round(sum(r.seconds for r in self.runs), 1)

    def run_of(self, stage: str) -> Optional[StageRun]:
        return next((r for r in self.runs if r.stage == stage), None)


def _flag(report: Any, name: str) -> Any:
    return report.get(name) if isinstance(report, dict) else getattr(report, name, None)


def _status(before: dict | None, after: dict | None, report: Any) -> str:
    """What a door did: its report's own flags when it has them, else the manifest's evidence."""
    same_output = before is not None and after is not None and before.get("fingerprint") == after.get("fingerprint")
    skipped = _flag(report, "skipped")
    if isinstance(skipped, bool):  # (ingest's `skipped` is its list of skipped files, not a flag)
        if skipped:
            return "skipped"
    elif _flag(report, "added") is not None:  # an incremental ingest that found nothing to do
        if not any(_flag(report, k) for k in ("added", "changed", "removed", "rebuilt")):
            return "skipped"
    elif _flag(report, "new_samples") == 0 and same_output:  # augment: nothing left to generate
        return "skipped"
    if _flag(report, "resumed") or _flag(report, "resumed_from_step"):
        return "resumed"
    if same_output and before.get("finished_at") == after.get("finished_at"):
        return "skipped"
    return "ran"


def run_stage(kb: KB, stage: str, call: Callable[[], Any], echo: Callable[[str], None] = typer.echo) -> StageRun:
    """Run one stage door, timed, and say whether it did work."""
    before = kb.stage(stage)
    run = timed(stage, call)
    report, seconds = run.report, run.seconds
    run.status = _status(before, kb.stage(stage), report)
    if callable(getattr(report, "summary", None)):
        echo(report.summary())
    elif callable(getattr(report, "print", None)):  # augment prints its quality report itself
        report.print()
    note = "skipped: inputs unchanged, reused" if run.status == "skipped" else run.status
    echo(f"[{stage}] {note} in {seconds:.1f} s")
    return run


def build(
    kb: KB,
    corpus: Path,
    settings: Settings,
    progress: bool = True,
    echo: Callable[[str], None] = typer.echo,
) -> BuildReport:
    """ingest → augment → train on one KB; each door skips or resumes on its own."""
    corpus = Path(corpus)
    if not corpus.exists():
        raise BuildError(f"corpus not found: {corpus}")
    report = BuildReport(kb.name)
    with kb.lock():
        calls = {
            "ingest": lambda: door("ingest")(kb, corpus, settings, progress=progress),
            "augment": lambda: door("augment")(kb, settings, progress=progress),
            "train": lambda: door("train")(kb, settings, progress=progress),
        }
        for i, stage in enumerate(BUILD_STAGES, 1):
            echo(f"== [{i}/{len(BUILD_STAGES)}] {stage}")
            report.runs.append(run_stage(kb, stage, calls[stage], echo))
    return report


def reusable_eval(
    kb: KB, questions: Path, split: str | None, modes: list[str], settings: Settings, limit: int | None = None
) -> Optional[Path]:
    """The newest eval report folder of the KB that answered the same questions in the same modes
    with the same settings against the current index and adapter; None when there is none."""
    from kinject.core.files import sha256_file

    current = kb.answer_inputs()
    questions_sha = sha256_file(questions)
    wanted = settings.public_dict()
    for folder in sorted(kb.dir("eval").glob("*/report.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            report = json.loads(folder.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        models = report.get("models") or {}
        if (
            report.get("split") == split
            and report.get("modes") == modes
            and report.get("questions_sha256") == questions_sha
            and report.get("limit") == limit
            and models.get("index_fingerprint") == current["ingest"]
            and models.get("adapter_fingerprint") == current["train"]
            and report.get("settings") == wanted
            and (folder.parent / "table.md").exists()
        ):
            return folder.parent
    return None


def timing_table(runs: list[StageRun], title: str = "stage times") -> str:
    """A markdown table of the stages' status and wall time, with the total."""
    lines = [f"{title}:", "", "| stage | status | wall s | cpu s |", "|---|---|---:|---:|"]
    lines += [f"| {r.stage} | {r.status} | {r.seconds:.1f} | {r.cpu_seconds:.1f} |" for r in runs]
    lines.append(f"| **total** | | **{sum(r.seconds for r in runs):.1f}** | {sum(r.cpu_seconds for r in runs):.1f} |")
    return "\n".join(lines)


def build_cmd(
    ctx: typer.Context,
    corpus: Path = typer.Argument(..., help="Corpus folder, file or JSONL of {doc_id, title, text}."),
    kb_name: str = typer.Option(..., "--kb", help="Knowledge base to build (created when missing)."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Synthetic tokens to generate (augment.budget_tokens)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Training steps (train.max_steps; 0 = from epochs)."),
) -> None:
    """Build a KB in one go: ingest → augment → train, reusing every stage whose inputs are unchanged."""
    from kinject.core.settings import settings_from

    settings = settings_from(ctx, **{"augment.budget_tokens": budget, "train.max_steps": max_steps})
    kb = KB.open(settings, kb_name, create=True)
    report = build(kb, corpus, settings)
    typer.echo("")
    typer.echo(timing_table(report.runs, f"build of KB {kb_name!r}"))
