"""`kinject train`: the fine-tuning stage's verb."""
from __future__ import annotations

from typing import Optional

import typer


def train_cmd(
    ctx: typer.Context,
    kb: str = typer.Option(..., "--kb", help="Knowledge base to train the adapter for."),
    force: bool = typer.Option(False, "--force", help="Retrain even when the inputs are unchanged."),
    merge: bool = typer.Option(False, "--merge", help="Also write adapter/merged/: a full model with the adapter folded in."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (train.max_steps; 0 = from epochs)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the packed corpus (train.epochs)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (train.lr)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank (train.lora_rank): 8, 16, 32, 64, 128, 256, 320 or 512."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Train on N processes of this machine through torchrun: gloo on CPU, NCCL with a GPU each on CUDA (train.nproc)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    influence: Optional[bool] = typer.Option(None, "--influence/--no-influence", help="Score the synthetic samples' influence and train on the top --share of each document's (influence.enabled)."),
    share: Optional[float] = typer.Option(None, "--share", help="Top share of samples to keep by influence, in (0, 1] (influence.share)."),
    target_questions: Optional[str] = typer.Option(None, "--target-questions", help="JSONL of {question, answer}: the influence target; the eval refuses them (influence.target_questions)."),
) -> None:
    """Fine-tune on the KB's curated synthetic corpus: every weight (the local preset) or a LoRA adapter (resumes after a crash)."""
    from kinject.core.settings import settings_from
    from kinject.core.kb import KB
    from kinject.finetune.train import train

    settings = settings_from(
        ctx,
        **{
            "train.max_steps": steps,
            "train.epochs": epochs,
            "train.lr": lr,
            "train.lora_rank": rank,
            "train.nproc": nproc,
            "influence.enabled": influence,
            "influence.share": share,
            "influence.target_questions": target_questions,
        },
    )
    report = train(KB.open(settings, kb), settings, progress=not quiet, force=force, merge=merge)
    for w in report.warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(report.summary())
    if report.merged_dir:
        typer.echo(f"merged model in {report.merged_dir}")
