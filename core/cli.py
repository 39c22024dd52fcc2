"""The `kinject` command. Verbs mirror the stages; each stage registers its own verbs.

Global options come before the verb: `kinject --preset paper --set train.lr=1e-4 train --kb x`.
"""
from __future__ import annotations

import importlib
import json
import sys
from typing import Any, Optional

import typer

from core.errors import KinjectError
from core.settings import Settings, load_settings, parse_overrides

app = typer.Typer(
    help="kinject: one corpus in, a FAISS index and a LoRA out, one OpenAI-compatible service in front.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
kb_app = typer.Typer(help="Create, list, show and delete knowledge bases.", no_args_is_help=True)
app.add_typer(kb_app, name="kb")

# Stage modules that add verbs to `app` through their `register(app)` function.
STAGE_CLIS: list[str] = ["ingest.cli", "ingest.augment.cli", "finetune.cli", "service.cli", "eval.cli", "ui.cli", "core.build", "core.demo", "core.bench", "core.paper"]


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


def settings_from(ctx: typer.Context, **flags: Any) -> Settings:
    """Settings with the global overrides plus a verb's own flags, given as dotted names.

    `settings_from(ctx, **{"augment.budget_tokens": budget})`: flags left at None are not set.
    """
    overrides = json.loads(json.dumps((ctx.find_root().obj or {}).get("overrides", {})))
    for dotted, value in flags.items():
        if value is None:
            continue
        node = overrides
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return load_settings(overrides)


@app.command()
def config(ctx: typer.Context) -> None:
    """Print the effective settings (presets, .env, KINJECT_* variables and flags applied)."""
    s = settings_from(ctx)
    typer.echo(json.dumps(s.public_dict(), indent=2))


@kb_app.command("create")
def kb_create(ctx: typer.Context, name: str) -> None:
    """Create an empty knowledge base."""
    from core.kb import KB

    kb = KB.create(settings_from(ctx), name)
    typer.echo(f"created KB {name!r} at {kb.root}")


@kb_app.command("list")
def kb_list(ctx: typer.Context) -> None:
    """List knowledge bases and which stages each has finished."""
    from core.kb import KB

    s = settings_from(ctx)
    kbs = KB.list(s)
    if not kbs:
        typer.echo(f"no KBs in {s.kb_dir}")
    for kb in kbs:
        stages = kb.manifest()["stages"]
        typer.echo(f"{kb.name:24s} {', '.join(stages) or '(empty)'}")


@kb_app.command("show")
def kb_show(ctx: typer.Context, name: str, as_json: bool = typer.Option(False, "--json", help="Print the raw manifest.")) -> None:
    """Show what a KB holds, per stage, and flag stale stages."""
    from core.kb import KB

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


@kb_app.command("delete")
def kb_delete(ctx: typer.Context, name: str, yes: bool = typer.Option(False, "--yes", help="Do not ask.")) -> None:
    """Delete a knowledge base: its manifest, index, synthetic data, adapter, evals and uploads."""
    from core.kb import KB

    kb = KB.open(settings_from(ctx), name)
    if not yes:
        typer.confirm(f"delete {kb.root}?", abort=True)
    kept = kb.delete()
    typer.echo(f"deleted KB {name!r}")
    if kept:
        typer.echo(f"kept {kb.root}: it also holds {', '.join(kept)}, which were not part of the KB")


def _register_stages() -> None:
    for module in STAGE_CLIS:
        importlib.import_module(module).register(app)


def main(argv: list[str] | None = None) -> None:
    _register_stages()
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
