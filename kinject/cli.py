"""The `kinject` command: a plain table from verb to function.

Global options come before the verb: `kinject --preset paper --set train.lr=1e-4 train --kb x`.
Each verb's function lives beside what it runs (a stage's cli.py, or a recipe) and imports its
heavy parts when called, so `kinject --help` stays fast.
"""
from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from kinject.augment.cli import augment_cmd
from kinject.core.errors import KinjectError
from kinject.core.settings import parse_overrides, settings_from
from kinject.eval.cli import eval_cmd
from kinject.finetune.cli import train_cmd
from kinject.ingest.cli import ingest_cmd, search_cmd
from kinject.recipes.bench import bench_cmd
from kinject.recipes.build import build_cmd
from kinject.recipes.demo import demo_cmd
from kinject.recipes.paper import paper_cmd
from kinject.recipes.serve import serve_cmd
from kinject.ui.cli import ui_cmd


def config(ctx: typer.Context) -> None:
    """Print the effective settings (presets, .env, KINJECT_* variables and flags applied)."""
    s = settings_from(ctx)
    typer.echo(json.dumps(s.public_dict(), indent=2))


def kb_create(ctx: typer.Context, name: str) -> None:
    """Create an empty knowledge base."""
    from kinject.core.kb import KB

    kb = KB.create(settings_from(ctx), name)
    typer.echo(f"created KB {name!r} at {kb.root}")


def kb_list(ctx: typer.Context) -> None:
    """List knowledge bases and which stages each has finished."""
    from kinject.core.kb import KB

    s = settings_from(ctx)
    kbs = KB.list(s)
    if not kbs:
        typer.echo(f"no KBs in {s.kb_dir}")
    for kb in kbs:
        stages = kb.manifest()["stages"]
        typer.echo(f"{kb.name:24s} {', '.join(stages) or '(empty)'}")


def kb_show(ctx: typer.Context, name: str, as_json: bool = typer.Option(False, "--json", help="Print the raw manifest.")) -> None:
    """Show what a KB holds, per stage, and flag stale stages."""
    from kinject.core.kb import KB

    kb = KB.open(settings_from(ctx), name)
    m = kb.manifest()
    stale = kb.stale()
    if as_json:
        typer.echo(json.dumps({**m, "stale": stale}, indent=2))
        return
    typer.echo(f"KB {m['name']}  ({kb.root})")
    typer.echo(f"  models: llm={m['models'].get('llm')} embedder={m['models'].get('embedder')}")
    if not m["stages"]:
        typer.echo("  no stage has run yet: start with `kinject ingest CORPUS --kb " + name + "`")
    for stage, rec in m["stages"].items():
        metrics = ", ".join(f"{k}={v}" for k, v in (rec.get("metrics") or {}).items() if not isinstance(v, (dict, list)))
        flag = f"  STALE: {', '.join(stale[stage])} changed since" if stage in stale else ""
        typer.echo(f"  {stage:8s} {rec['status']} at {rec.get('finished_at')}  {metrics}{flag}")


def kb_delete(ctx: typer.Context, name: str, yes: bool = typer.Option(False, "--yes", help="Do not ask.")) -> None:
    """Delete a knowledge base: its manifest, index, synthetic data, adapter, evals and uploads."""
    from kinject.core.kb import KB

    kb = KB.open(settings_from(ctx), name)
    if not yes:
        typer.confirm(f"delete {kb.root}?", abort=True)
    kept = kb.delete()
    typer.echo(f"deleted KB {name!r}")
    if kept:
        typer.echo(f"kept {kb.root}: it also holds {', '.join(kept)}, which were not part of the KB")


# verb -> function; `kb` holds the verbs that manage knowledge bases.
KB_VERBS = {"create": kb_create, "list": kb_list, "show": kb_show, "delete": kb_delete}
VERBS = {
    "config": config,
    "ingest": ingest_cmd,
    "search": search_cmd,
    "augment": augment_cmd,
    "train": train_cmd,
    "build": build_cmd,
    "eval": eval_cmd,
    "serve": serve_cmd,
    "ui": ui_cmd,
    "demo": demo_cmd,
    "paper": paper_cmd,
    "bench": bench_cmd,
}
# Verbs that take extra positional words (`eval --compare A B`).
EXTRA_ARGS = {"eval"}

app = typer.Typer(
    help="kinject: one corpus in, a FAISS index and a fine-tuned model out, one OpenAI-compatible service in front.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
kb_app = typer.Typer(help="Create, list, show and delete knowledge bases.", no_args_is_help=True)
app.add_typer(kb_app, name="kb")
for _verb, _fn in KB_VERBS.items():
    kb_app.command(_verb)(_fn)
for _verb, _fn in VERBS.items():
    app.command(_verb, context_settings={"allow_extra_args": True} if _verb in EXTRA_ARGS else None)(_fn)


@app.callback()
def _global(
    ctx: typer.Context,
    preset: Optional[str] = typer.Option(None, "--preset", help="Settings preset: local (default, offline CPU) or paper."),
    set_: list[str] = typer.Option([], "--set", help="Override any setting: --set group.field=value (repeatable)."),
) -> None:
    overrides = parse_overrides(set_)
    if preset:
        overrides["preset"] = preset
    ctx.obj = {"overrides": overrides}


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="kinject")
    except KinjectError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
