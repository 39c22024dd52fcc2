"""`kinject bench`: run every benchmark in bench/ and write one dated summary.

Each bench/<name>.py exposes `run(quick: bool) -> dict` and measures kinject against a baseline in
the same run. Each runs in its own process (a crash or a vLLM worker stays contained), and the
collected dicts go to bench/results/<date>.json; bench/results/<date>.md (copied to latest.md)
lists every ratio it found with its target.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from kinject.core.errors import KinjectError
from kinject.core.files import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
BENCHES = ("ingest", "augment", "train", "serve")
# Keys that hold a speed-up or ratio against a baseline; any other number with a `<name>_target`
# beside it is reported too.
RATIO_WORDS = ("ratio", "speedup")


class BenchError(KinjectError):
    pass


def run_one(path: Path, quick: bool, timeout_s: float | None = None) -> dict:
    """Run a bench file's run(quick) in a child process; its dict, or {"error": ...}."""
    path = Path(path)
    if not path.exists():
        return {"error": f"{path} does not exist"}
    with tempfile.TemporaryDirectory(prefix="kinject-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "kinject.recipes.bench", str(path), "1" if quick else "0", str(out)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
        seconds = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0 or not out.exists():
            return {"error": f"exited with status {proc.returncode}", "seconds": seconds}
        result = json.loads(out.read_text())
    if not isinstance(result, dict):
        return {"error": f"run() returned {type(result).__name__}, not a dict", "seconds": seconds}
    result.setdefault("seconds", seconds)
    return result


def _flatten(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, d


def ratios(result: dict) -> list[tuple[str, float, Any]]:
    """(key, value, target or None) for every ratio-like or targeted number in a bench result."""
    flat = dict(_flatten(result))
    numeric = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    rows: dict[str, Any] = {}
    for key in numeric:
        leaf = key.rsplit(".", 1)[-1].lower()
        if any(w in leaf for w in RATIO_WORDS) and "target" not in leaf:
            rows[key] = _target_of(key, flat)
    for key, target in flat.items():  # "<parent>.<name>_target" -> the number it targets
        parent, _, leaf = key.rpartition(".")
        if "_target" not in leaf:
            continue
        name = leaf.replace("_target", "")
        prefix = f"{parent}." if parent else ""
        for cand in (f"{prefix}{name}", f"{prefix}kinject_{name}"):
            if cand in numeric:
                rows[cand] = target
                break
    return [(k, float(numeric[k]), t) for k, t in rows.items()]


def _target_of(key: str, flat: dict) -> Any:
    parent, _, leaf = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    for cand in (f"{key}_target", f"{prefix}target_{leaf}", f"{prefix}target", f"{prefix}target_ratio"):
        if cand in flat and not isinstance(flat[cand], (dict, list)):
            return flat[cand]
    return None


def _meets(value: float, target: Any, key: str) -> str:
    if target is None:
        return ""
    try:
        t = float(str(target).lstrip("<>= ").rstrip("x%×"))
    except ValueError:
        return ""
    text = str(target).strip()
    if text.startswith("<"):
        return "yes" if value <= t else "no"
    if text.startswith(">") or any(w in key.rsplit(".", 1)[-1] for w in RATIO_WORDS):
        return "yes" if value >= t else "no"
    return "yes" if value == t else "no"  # an exact target, e.g. 0 errors


def summary_markdown(results: dict[str, dict], when: str, quick: bool, load: str) -> str:
    lines = [
        f"# kinject benchmarks, {when}",
        "",
        f"Each ratio compares kinject with a baseline measured in the same run on the same machine "
        f"({'quick' if quick else 'full'} mode; load average at start {load}). Raw numbers: the JSON file beside this one.",
        "",
        "| benchmark | measure | value | target | met |",
        "|---|---|---:|---:|:-:|",
    ]
    for name, result in results.items():
        if "error" in result:
            lines.append(f"| {name} | error: {result['error']} | | | |")
            continue
        rows = ratios(result)
        if not rows:
            lines.append(f"| {name} | (no ratio reported) | | | |")
        for key, value, target in rows:
            lines.append(f"| {name} | {key} | {value:.3g} | {'' if target is None else target} | {_meets(value, target, key)} |")
    lines += ["", "Seconds per benchmark: " + ", ".join(f"{n} {r.get('seconds', '?')}" for n, r in results.items()), ""]
    return "\n".join(lines)


def run_all(names: list[str], quick: bool, out_dir: Path = BENCH_DIR / "results") -> tuple[Path, Path, dict]:
    when = datetime.now().strftime("%Y-%m-%d")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results: dict[str, dict] = {}
    for name in names:
        typer.echo(f"== bench {name}{' (quick)' if quick else ''}")
        results[name] = run_one(BENCH_DIR / f"{name}.py", quick)
        if "error" in results[name]:
            typer.echo(f"bench {name}: {results[name]['error']}", err=True)
    payload = {"date": when, "quick": quick, "loadavg_at_start": load, "python": sys.version.split()[0], "results": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{when}.json", out_dir / f"{when}.md"
    atomic_write_json(json_path, payload)
    md = summary_markdown(results, when, quick, load)
    atomic_write_text(md_path, md)
    shutil.copyfile(md_path, out_dir / "latest.md")
    return json_path, md_path, results


def bench_cmd(
    only: Optional[str] = typer.Option(None, "--only", help=f"Comma-separated subset of: {', '.join(BENCHES)}."),
    quick: bool = typer.Option(False, "--quick", help="Smaller sizes (each benchmark decides what that means)."),
) -> None:
    """Run the benchmarks in bench/ and write bench/results/<date>.json and .md (ratios vs baselines)."""
    names = [n.strip() for n in only.split(",")] if only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise BenchError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    json_path, md_path, results = run_all(names, quick)
    typer.echo("")
    typer.echo(md_path.read_text())
    typer.echo(f"wrote {json_path} and {md_path} (also bench/results/latest.md)")
    failed = [n for n, r in results.items() if "error" in r]
    if failed:
        raise BenchError(f"benchmark(s) failed: {', '.join(failed)}")


def _child(path: str, quick: str, out: str) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"kinject_bench_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.run(quick=quick == "1")
    # numpy scalars become plain numbers, anything else unknown its text
    text = json.dumps(result, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    atomic_write_text(Path(out), text)


if __name__ == "__main__":
    _child(*sys.argv[1:4])
