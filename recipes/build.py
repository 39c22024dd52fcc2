"""`kinject build CORPUS --kb NAME`: ingest → augment → train in one go.

Each stage skips or resumes on its own (it compares its inputs with its manifest record) and
says which in the StageResult it returns; build calls them in order and prints what each did.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer

from kinject.core.errors import KinjectError
from kinject.core.kb import KB
from kinject.core.settings import Settings
from kinject.core.stage import StageResult


class BuildError(KinjectError):
    pass


def build(
    kb: KB,
    corpus: Path,
    settings: Settings,
    progress: bool = True,
    echo: Callable[[str], None] = typer.echo,
) -> list[StageResult]:
    """ingest → augment → train on one KB; what each stage did, in that order."""
    from kinject.augment import augment
    from kinject.finetune.train import train
    from kinject.ingest.pipeline import ingest

    corpus = Path(corpus)
    if not corpus.exists():
        raise BuildError(f"corpus not found: {corpus}")
    with kb.lock():
        echo("== [1/3] ingest")
        ingested = ingest(kb, corpus, settings, progress=progress)
        echo(ingested.summary())
        echo(ingested.status_line())

        echo("== [2/3] augment")
        augmented = augment(kb, settings, progress=progress)
        augmented.print()  # the synthetic corpus' quality tables
        echo(augmented.status_line())

        echo("== [3/3] train")
        trained = train(kb, settings, progress=progress)
        echo(trained.summary())
        echo(trained.status_line())
    return [ingested, augmented, trained]


def timing_table(results: list[StageResult], title: str = "stage times") -> str:
    """A markdown table of the stages' status and wall and CPU time, with the totals."""
    lines = [f"{title}:", "", "| stage | status | wall s | cpu s |", "|---|---|---:|---:|"]
    lines += [f"| {r.stage} | {r.status} | {r.seconds:.1f} | {r.cpu_seconds:.1f} |" for r in results]
    lines.append(f"| **total** | | **{sum(r.seconds for r in results):.1f}** | {sum(r.cpu_seconds for r in results):.1f} |")
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
    results = build(kb, corpus, settings)
    typer.echo("")
    typer.echo(timing_table(results, f"build of KB {kb_name!r}"))
