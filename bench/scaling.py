"""The synthetic-token scaling curve: closed-book (`ft`) and open-book (`ft-rag`) accuracy on the
dev split against the number of synthetic tokens the adapter was trained on.

For each set and each budget (a multiple of the corpus' tokens), a copy of one ingested KB is
augmented at that budget with the settings in force, trained, and evaluated on dev; base and rag
are evaluated once per set as the reference lines. Results go to bench/results/scaling.json (one
row per point, rewritten after each, so a rerun skips the points already measured), the same as
a table in bench/results/scaling.md, and the curve in docs/scaling.png. Each point records the
training recipe it ran (`recipe`: the augment types and the train settings), so a point measured
under another preset or other settings is measured again, not reused, and each recipe is its own
curve. Each point also records the machine it ran on (`hardware`: "cpu", or the GPU's name): on a
GPU the model trains and answers in bf16 and the embedder runs on torch, so a GPU point is its own
curve with its own base and rag lines. Run:

    python -m bench.scaling --sets demo,squad_short --budgets 0.5,2,8 [--set group.field=value ...]
    python -m bench.scaling ... --results /elsewhere/scaling.json   # its .md and .png beside it
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "scaling.json"
TABLE = REPO / "bench" / "results" / "scaling.md"
PNG = REPO / "docs" / "scaling.png"
METRIC = "contains"  # the short-answer metric the targets are stated in


def hardware(settings) -> str:
    """"cpu", or the name of the GPU that trains and answers (the settings' engine.device)."""
    import torch

    from kinject.core.models import pick_device

    device = pick_device(settings.engine.device)
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def sources(name: str) -> tuple[Path, Path]:
    """(corpus, questions) of a set: the shipped demo or one of ../shared/data."""
    if name == "demo":
        return REPO / "demo" / "corpus", REPO / "demo" / "questions.jsonl"
    folder = REPO.parent / "shared" / "data" / name
    if not (folder / "corpus.jsonl").exists():
        raise SystemExit(f"{folder} is missing: the scaling curve on {name} needs ../shared/data beside the clone")
    return folder / "corpus.jsonl", folder / "questions.jsonl"


def point(settings, base_kb, name: str, questions: Path, modes: list[str]) -> dict:
    """Copy the ingested KB to `name`, then augment, train and evaluate it."""
    from kinject.core.kb import KB
    from kinject.eval.run import evaluate
    from kinject.finetune.train import train
    from kinject.augment import augment

    target = settings.kb_dir / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(base_kb.root, target, ignore=shutil.ignore_patterns(".lock", "synthetic", "adapter", "eval"))
    kb = KB.open(settings, name)
    for stage in ("augment", "train", "eval"):
        kb.forget_stage(stage)
    t0 = time.perf_counter()
    report = augment(kb, settings, progress=False).report
    t1 = time.perf_counter()
    trained = train(kb, settings, progress=False) if any(m.startswith("ft") for m in modes) else None
    t2 = time.perf_counter()
    ev = evaluate(kb, questions, modes, settings, split="dev", progress=False)
    t3 = time.perf_counter()
    summary = json.loads((ev.dir / "report.json").read_text())["summary"]
    return {
        "synthetic_tokens": report["kept_tokens"],
        "corpus_tokens": report["corpus_tokens"],
        "train_tokens": trained.tokens_seen if trained else 0,
        "seconds": {"augment": round(t1 - t0, 1), "train": round(t2 - t1, 1), "eval": round(t3 - t2, 1)},
        "train_tokens_per_s": trained.tokens_per_second if trained else None,
        "scores": {m: {k: v for k, v in s.items()} for m, s in summary.items()},
    }


# The settings that decide what a point's model learns, besides the budget.
RECIPE_FIELDS = ("full_finetune", "lora_rank", "lora_alpha", "target_modules", "lr", "epochs", "open_book_fraction", "loss_on", "include_documents", "qa_chat", "replay_fraction")


def recipe(settings) -> dict:
    # "open_book": how the open-book Q/A samples are drawn; points before per-epoch rendering
    # (finetune/data.py `renderings`) drew them once per pair and say "fixed".
    return {"augment_types": list(settings.augment.types), **settings.train.model_dump(mode="json", include=set(RECIPE_FIELDS)), "open_book": "per epoch"}


def label(r: dict) -> str:
    """A curve's name in the table and the legend: how the point trained, and where if not on a CPU."""
    from kinject.core.settings import RULE_RECIPE

    t = r["recipe"]
    kind = "full" if t["full_finetune"] else f"LoRA r{t['lora_rank']}"
    drawn = " per epoch" if t.get("open_book") == "per epoch" else ""
    extra = "".join(f", + {x}" for x in t.get("augment_types") or [] if x not in RULE_RECIPE)  # beside the local preset's
    where = "" if r["hardware"] == "cpu" else f" ({r['hardware']})"
    return f"{kind}, lr {t['lr']:g}, {t['epochs']:g} epochs, open-book {t['open_book_fraction']:g}{drawn}{extra}{where}"


def run(sets: list[str], budgets: list[float], overrides: dict, results: Path = RESULTS) -> list[dict]:
    from kinject.core.kb import KB
    from kinject.core.settings import _deep_merge, load_settings
    from kinject.ingest.pipeline import ingest

    rows = json.loads(results.read_text()) if results.exists() else []
    done = {key(r["set"], r["budget_multiple"], r.get("recipe"), r["hardware"]) for r in rows}
    machine = hardware(load_settings(overrides))  # the budget overrides below do not move the device
    for name in sets:
        corpus, questions = sources(name)
        settings = load_settings(_deep_merge({"retrieval": {"top_k": 2}}, overrides))
        base_kb = KB.open(settings, f"scaling-{name}", create=True)
        ingest(base_kb, corpus, settings, progress=False)
        plan = [(None, ["base", "rag"])] + [(b, ["ft", "ft-rag"]) for b in budgets]
        for budget, modes in plan:
            over = _deep_merge(overrides, {"augment": {"budget_tokens": 0, "budget_multiple": budget or 0.5}})
            s = load_settings(_deep_merge({"retrieval": {"top_k": 2}}, over))
            if key(name, budget, recipe(s), machine) in done:
                continue
            print(f"[scaling] {name} budget {budget or 'reference'}x ...", flush=True)
            row = {"set": name, "budget_multiple": budget, "overrides": overrides, "recipe": recipe(s) if budget else None,
                   "hardware": machine, **point(s, base_kb, f"scaling-{name}-{budget}", questions, modes)}
            rows.append(row)
            results.parent.mkdir(parents=True, exist_ok=True)
            tmp = results.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows, indent=1))
            os.replace(tmp, results)
            print(f"[scaling] {name} {budget}x: {json.dumps(row['scores'])}", flush=True)
    beside = results != RESULTS
    draw(rows, results.with_suffix(".png") if beside else PNG)
    (results.with_suffix(".md") if beside else TABLE).write_text(table(rows))
    return rows


def key(name: str, budget: float | None, rec: dict | None, machine: str) -> tuple:
    # base and rag do not depend on the training recipe: one reference per set and machine
    return (name, budget, json.dumps(rec, sort_keys=True) if budget else None, machine)


def table(rows: list[dict]) -> str:
    """One markdown row per point: budget, tokens, stage times and each mode's score with its interval."""

    def cell(scores: dict, mode: str, metric: str) -> str:
        m = scores.get(mode, {}).get(metric)
        return f"{100 * m['mean']:.1f} [{100 * m['lo']:.1f}, {100 * m['hi']:.1f}]" if m else ""

    lines = [
        "# Synthetic-token scaling curve (dev split)",
        "",
        "Written by `python -m bench.scaling`; drawn in [docs/scaling.png](../../docs/scaling.png). "
        f"Scores are percent {METRIC}-gold with 95 % bootstrap intervals; MC is multiple-choice accuracy.",
        "",
        "| set | machine | recipe | budget × corpus | synthetic tokens | train tokens | train s | tokens/s | mode | contains | MC acc |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["set"], r["hardware"] != "cpu", label(r) if r["budget_multiple"] else "", r["budget_multiple"] or 0)):
        budget = "reference" if r["budget_multiple"] is None else f"{r['budget_multiple']:g}"
        for mode in r["scores"]:
            lines.append(
                f"| {r['set']} | {r['hardware']} | {label(r) if r['budget_multiple'] else ''} | {budget} | {r['synthetic_tokens'] if r['budget_multiple'] else ''} | {r['train_tokens'] or ''} | "
                f"{r['seconds']['train'] or ''} | {r['train_tokens_per_s'] or ''} | {mode} | {cell(r['scores'], mode, METRIC)} | {cell(r['scores'], mode, 'acc')} |"
            )
    return "\n".join(lines) + "\n"


def draw(rows: list[dict], png: Path = PNG) -> None:
    """One panel per set; one colour per recipe (the same in every panel), ft solid with circles,
    ft-rag dashed with squares, base and rag dotted (dash-dotted for a GPU's); one legend below all
    panels. Points of one budget are spread a little sideways so that their intervals stay apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    sets = sorted({r["set"] for r in rows})
    recipes = sorted({label(r) for r in rows if r["budget_multiple"] is not None})
    colour = {name: plt.cm.tab10(i % 10) for i, name in enumerate(recipes)}
    styles = {"ft": ("o", "-"), "ft-rag": ("s", "--")}
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4.6), squeeze=False)
    for ax, name in zip(axes[0], sets):
        mine = [r for r in rows if r["set"] == name]
        refs = [r for r in mine if r["budget_multiple"] is None]
        points = sorted((r for r in mine if r["budget_multiple"] is not None), key=lambda r: r["synthetic_tokens"])
        for i, recipe_name in enumerate(recipes):
            curve = [r for r in points if label(r) == recipe_name]
            shift = 1 + 0.03 * (i - (len(recipes) - 1) / 2)
            for mode, (marker, line) in styles.items():
                pts = [(r["synthetic_tokens"], r["scores"][mode][METRIC]) for r in curve if METRIC in r["scores"].get(mode, {})]
                if pts:
                    xs = [x * shift for x, _ in pts]
                    means = [100 * m["mean"] for _, m in pts]
                    # The 95 % bootstrap interval of each point, as the tables report it.
                    spread = [[100 * (m["mean"] - m["lo"]) for _, m in pts], [100 * (m["hi"] - m["mean"]) for _, m in pts]]
                    ax.errorbar(xs, means, yerr=spread, marker=marker, linestyle=line, color=colour[recipe_name], capsize=3)
        for ref in refs:
            for mode, shade in (("base", "grey"), ("rag", "black")):
                if METRIC in ref["scores"].get(mode, {}):
                    ax.axhline(100 * ref["scores"][mode][METRIC]["mean"], color=shade, linestyle=ref_style(ref))
        ax.set_xscale("log")
        # 1k, 2k, 5k, 10k...: the default minor labels overlap on an axis of one or two decades.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("synthetic training tokens")
        ax.set_ylabel(f"{METRIC} % (dev)")
        ax.set_title(name)
    handles = [Line2D([], [], color=colour[n], linewidth=6, label=n) for n in recipes]
    handles += [Line2D([], [], color="dimgrey", marker=m, linestyle=ls, label=mode) for mode, (m, ls) in styles.items()]
    for ref in {r["hardware"]: r for r in rows if r["budget_multiple"] is None}.values():
        where = "" if ref_style(ref) == ":" else f" ({ref['hardware']})"
        handles += [Line2D([], [], color=c, linestyle=ref_style(ref), label=mode + where) for mode, c in (("base", "grey"), ("rag", "black"))]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110, bbox_inches="tight")


def ref_style(ref: dict) -> str:
    return ":" if ref["hardware"] == "cpu" else "-."


def main() -> None:
    from kinject.core.settings import parse_overrides

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="demo,squad_short")
    ap.add_argument("--budgets", default="0.5,2,8", help="multiples of the corpus' tokens")
    ap.add_argument("--set", dest="sets_", action="append", default=[], help="group.field=value")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the rows' JSON (its table and plot go beside it, unless it is the default)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run([s.strip() for s in args.sets.split(",")], [float(b) for b in args.budgets.split(",")], parse_overrides(args.sets_), args.results)


if __name__ == "__main__":
    main()
