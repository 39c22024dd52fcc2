"""The quality report of a synthetic corpus: synthetic/report.json and the table printed after a run."""
from __future__ import annotations

import gzip
from collections import Counter

from kinject.augment.curate import DROP_REASONS, Curated, words


def gzip_ratio(texts: list[str]) -> float:
    """Raw bytes / gzip bytes of the corpus: higher means more redundant text."""
    raw = "\n".join(texts).encode("utf-8")
    return round(len(raw) / len(gzip.compress(raw, mtime=0)), 3) if raw else 0.0


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams, over the whole corpus."""
    grams: Counter = Counter()
    for t in texts:
        ws = words(t)
        grams.update(zip(*(ws[i:] for i in range(n))))
    total = sum(grams.values())
    return round(len(grams) / total, 4) if total else 0.0


def _share(found: int, mentioned: int) -> float | None:
    return round(found / mentioned, 4) if mentioned else None


def build_report(
    *,
    samples: list[dict],
    curated: Curated,
    doc_ids: list[str],
    types: list[str],
    corpus_tokens: int,
    budget: int,
    extra: dict,
) -> dict:
    """samples: the plan's samples (generated records); curated: what curation made of them."""
    kept_tokens = sum(r["tokens"] for r in curated.kept)
    generated_tokens = sum(s["tokens"] for s in samples)
    per_type = {t: {"samples": 0, "generated_tokens": 0, "kept": 0, "kept_tokens": 0} for t in types}
    per_doc = {d: {"samples": 0, "generated_tokens": 0, "kept": 0, "kept_tokens": 0} for d in doc_ids}
    for s in samples:
        for row in (per_type[s["type"]], per_doc[s["doc_id"]]):
            row["samples"] += 1
            row["generated_tokens"] += s["tokens"]
    for r in curated.kept:
        for row in (per_type[r["type"]], per_doc[r["doc_id"]]):
            row["kept"] += 1
            row["kept_tokens"] += r["tokens"]
    kept_texts = [r["train_text"] for r in curated.kept]
    dedup_pool = len(curated.kept) + curated.counts["duplicate"] + curated.counts["near_duplicate"]
    kept_found = sum(_mention_counts(r)[0] for r in curated.kept)
    kept_mentioned = sum(_mention_counts(r)[1] for r in curated.kept)
    return {
        "budget_tokens": budget,
        "corpus_tokens": corpus_tokens,
        "generated_tokens": generated_tokens,
        "kept_tokens": kept_tokens,
        "expansion": round(kept_tokens / corpus_tokens, 3) if corpus_tokens else None,
        "expansion_generated": round(generated_tokens / corpus_tokens, 3) if corpus_tokens else None,
        "samples": len(samples),
        "kept": len(curated.kept),
        "dropped": len(curated.dropped),
        "drop_rate": round(len(curated.dropped) / len(samples), 4) if samples else 0.0,
        "drops": {r: curated.counts[r] for r in DROP_REASONS},
        "gzip_ratio": gzip_ratio(kept_texts),
        "distinct_1": distinct_n(kept_texts, 1),
        "distinct_2": distinct_n(kept_texts, 2),
        "distinct_3": distinct_n(kept_texts, 3),
        "near_dup_rate": round((curated.counts["duplicate"] + curated.counts["near_duplicate"]) / dedup_pool, 4) if dedup_pool else 0.0,
        "faithfulness": _share(curated.found, curated.mentioned),
        "faithfulness_kept": _share(kept_found, kept_mentioned),
        "per_type": per_type,
        "per_doc": per_doc,
        **extra,
    }


def _mention_counts(rec: dict) -> tuple[int, int]:
    m = rec.get("mentions") or [0, 0]
    return m[0], m[1]


def print_report(report: dict, console=None) -> None:
    """The report as two tables (per type, then the corpus-level numbers), via rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"synthetic corpus: {report['generator']} on {report['engine']}", title_justify="left")
    for col in ("type", "samples", "gen tokens", "kept", "kept tokens"):
        t.add_column(col, justify="left" if col == "type" else "right")
    for name, row in report["per_type"].items():
        t.add_row(name, str(row["samples"]), str(row["generated_tokens"]), str(row["kept"]), str(row["kept_tokens"]))
    t.add_row("total", str(report["samples"]), str(report["generated_tokens"]), str(report["kept"]), str(report["kept_tokens"]), style="bold")
    console.print(t)

    q = Table(show_header=False, title="quality", title_justify="left")
    q.add_column("metric")
    q.add_column("value", justify="right")
    drops = ", ".join(f"{k} {v}" for k, v in report["drops"].items() if v) or "none"
    rows = [
        ("budget / corpus tokens", f"{report['budget_tokens']} / {report['corpus_tokens']}"),
        ("expansion over corpus (kept / generated)", f"{report['expansion']}x / {report['expansion_generated']}x"),
        ("dropped", f"{report['dropped']} of {report['samples']} ({report['drop_rate']:.0%}): {drops}"),
        ("gzip compression ratio", str(report["gzip_ratio"])),
        ("distinct-1 / -2 / -3", f"{report['distinct_1']} / {report['distinct_2']} / {report['distinct_3']}"),
        ("near-duplicate rate", f"{report['near_dup_rate']:.1%}"),
        ("faithfulness (all / kept)", f"{_fmt(report['faithfulness'])} / {_fmt(report['faithfulness_kept'])}"),
    ]
    for k, v in rows:
        q.add_row(k, v)
    console.print(q)
    if report.get("run", {}).get("endpoints"):
        print_endpoints(report["run"]["endpoints"], console)
    if report.get("influence"):
        print_influence(report["influence"], console)


def print_endpoints(endpoints: dict, console) -> None:
    """Which endpoint of the openai engine wrote how many of this run's samples, and which died."""
    from rich.table import Table

    t = Table(title="endpoints (this run)", title_justify="left")
    for col in ("endpoint", "samples", "state"):
        t.add_column(col, justify="right" if col == "samples" else "left")
    for url, row in endpoints.items():
        t.add_row(url, str(row["samples"]), "dead" if row["dead"] else "live", style="red" if row["dead"] else None)
    console.print(t)


def print_influence(inf: dict, console) -> None:
    """Influence per type (mean cosine with the target gradient) and, with the generation
    bandit, how its weights moved round by round."""
    from rich.table import Table

    t = Table(
        title=f"influence on the target ({inf['targets']} {inf['target_source']} items; {inf['scored']} scored in "
        f"{inf['cpu_seconds']:.0f} s CPU, {inf['cached']} cached)",
        title_justify="left",
    )
    for col in ("type", "kept samples", "mean", "median"):
        t.add_column(col, justify="left" if col == "type" else "right")
    for name, row in inf["per_type"].items():
        t.add_row(name, str(row["n"]), _num(row["mean"]), _num(row["median"]))
    t.add_row("all", str(inf["all"]["n"]), _num(inf["all"]["mean"]), _num(inf["all"]["median"]), style="bold")
    console.print(t)
    bandit = inf.get("bandit")
    if bandit:
        b = Table(title="generation plan: weight per arm by round (reward: influence per generated sample)", title_justify="left")
        b.add_column("arm")
        for r in bandit["rounds"]:
            b.add_column(f"round {r['round']} weight", justify="right")
            if "reward" in r:
                b.add_column(f"round {r['round']} reward", justify="right")
        b.add_column("final weight", justify="right")
        for arm in bandit["arms"]:
            cells = []
            for r in bandit["rounds"]:
                cells.append(f"{r['weights'][arm]:.2f}")
                if "reward" in r:
                    cells.append(_num(r["reward"][arm]))
            b.add_row(arm, *cells, f"{bandit['final_weights'][arm]:.2f}")
        console.print(b)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.4f}"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"
