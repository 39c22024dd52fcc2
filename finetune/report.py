"""The training report: numbers in report.json and the loss curve as a PNG."""
from __future__ import annotations

import io
from pathlib import Path

from kinject.core.files import atomic_write_bytes, atomic_write_json


def write_report(folder: Path, report: dict) -> Path:
    path = Path(folder) / "report.json"
    atomic_write_json(path, report)
    return path


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def write_loss_png(folder: Path, curve: list[list[float]], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(s) for s, _ in curve]
    losses = [float(v) for _, v in curve]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, color="#9bb7d4", linewidth=1, label="loss per step")
    if len(losses) >= 10:
        ax.plot(steps, smooth(losses, max(2, len(losses) // 20)), color="#1f4e79", linewidth=2, label="moving average")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(folder) / "loss.png"
    atomic_write_bytes(path, buf.getvalue())
    return path
