"""`kinject augment --kb NAME`: the KB's documents -> curated synthetic corpus + quality report."""
from __future__ import annotations

from typing import Optional

import typer


def _weights(spec: Optional[str]) -> Optional[dict]:
    if spec is None:
        return None
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise typer.BadParameter(f"expected type=weight, got {part!r}", param_hint="--weights") from None
        if not sep:
            raise typer.BadParameter(f"expected type=weight, got {part!r}", param_hint="--weights")
    return out


def augment_cmd(
    ctx: typer.Context,
    kb: str = typer.Option(..., "--kb", help="KB name (ingested first with `kinject ingest`)."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Synthetic tokens to generate; 0 = --multiple x corpus tokens (augment.budget_tokens)."),
    multiple: Optional[float] = typer.Option(None, "--multiple", help="Budget as a multiple of the corpus tokens when --budget is 0 (augment.budget_multiple)."),
    types: Optional[str] = typer.Option(None, "--types", help="Comma-separated prompt types (augment.types), e.g. key_concepts,qa."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Per-type weights, e.g. key_concepts=2,mind_map=0.5 (augment.type_weights)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="transformers, vllm or openai (engine.backend)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Tokens per sample at most (augment.max_new_tokens)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the generation progress bar."),
    influence: Optional[bool] = typer.Option(None, "--influence/--no-influence", help="Score each kept sample's influence on the target objective (influence.enabled)."),
    guide: Optional[bool] = typer.Option(None, "--guide/--no-guide", help="Let a bandit shift the budget to the types and rubric variants whose samples score highest (influence.guide)."),
    target_questions: Optional[str] = typer.Option(None, "--target-questions", help="JSONL of {question, answer}: the influence target instead of the corpus' cloze items; the eval refuses them (influence.target_questions)."),
) -> None:
    """Write the KB's synthetic training corpus (SPA prompt types), curate it and print its quality report.

    Resumable: rerun after an interruption and it continues; a higher --budget adds samples.
    """
    from kinject.core.settings import settings_from
    from kinject.core.kb import KB
    from kinject.augment import augment

    type_list = [t.strip() for t in types.split(",") if t.strip()] if types is not None else None
    settings = settings_from(
        ctx,
        **{
            "augment.budget_tokens": budget,
            "augment.budget_multiple": multiple,
            "augment.types": type_list,
            "augment.type_weights": _weights(weights),
            "engine.backend": engine,
            "augment.max_new_tokens": max_new_tokens,
            "influence.enabled": influence,
            "influence.guide": guide,
            "influence.target_questions": target_questions,
        },
    )
    result = augment(KB.open(settings, kb), settings, progress=progress)
    result.print()
    typer.echo(result.summary())
