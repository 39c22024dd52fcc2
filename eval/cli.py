"""`kinject eval`: every mode on the same questions, one table and one chart."""
from __future__ import annotations

from typing import Optional

import typer


def eval_cmd(
    ctx: typer.Context,
    kb: Optional[str] = typer.Option(None, "--kb", help="Knowledge base to evaluate (its eval/ folder gets the report)."),
    questions: Optional[str] = typer.Option(None, "--questions", help="Question file (JSONL: short answer or multiple choice)."),
    modes: Optional[str] = typer.Option(None, "--modes", help="Comma-separated: base,rag,ft,ft-rag,auto (default: the four the KB can answer)."),
    split: Optional[str] = typer.Option(None, "--split", help="Only questions of this split (e.g. dev)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N questions (after the split)."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Evaluate a running kinject server or OpenAI-compatible endpoint (base URL)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Tokens per short answer (eval.max_new_tokens)."),
    compare: Optional[list[str]] = typer.Option(None, "--compare", help="Diff two reports: --compare A --compare B, or --compare A B."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Evaluate modes on a question file, or compare two reports (--compare A B)."""
    from kinject.core.settings import settings_from
    from kinject.core.errors import KinjectError

    settings = settings_from(ctx, **{"eval.max_new_tokens": max_new_tokens})
    if compare:
        from kinject.eval.report import compare as compare_reports

        paths = list(compare) + list(ctx.args)
        if len(paths) != 2:
            raise KinjectError(f"--compare takes two report folders, got {len(paths)}")
        typer.echo(compare_reports(*(_report_path(p, kb, settings) for p in paths), settings.eval.bootstrap_samples, settings.seed))
        return
    if not kb or not questions:
        raise KinjectError("eval needs --kb NAME and --questions FILE (or --compare A B)")
    from kinject.core.kb import KB
    from kinject.eval.run import evaluate

    report = evaluate(
        KB.open(settings, kb), questions, modes, settings, split=split, limit=limit, endpoint=endpoint, progress=not quiet
    )
    typer.echo(report.summary())


def _report_path(ref: str, kb: str | None, settings):
    """A report folder by path, or by its name inside the KB's eval/ folder."""
    from pathlib import Path

    p = Path(ref)
    if p.exists() or not kb:
        return p
    from kinject.core.kb import KB

    return KB.open(settings, kb).dir("eval") / ref
