"""An earlier eval report that answers exactly what a new run would, so a recipe can reuse it."""
from __future__ import annotations

import json
from pathlib import Path

from kinject.core.files import sha256_file
from kinject.core.kb import KB
from kinject.core.settings import Settings
from kinject.core.stage import StageTimer
from kinject.eval.report import EvalReport


def reused_eval(
    kb: KB, questions: Path, split: str | None, modes: list[str], settings: Settings, limit: int | None = None
) -> EvalReport | None:
    """The KB's newest eval report that answered the same questions in the same modes with the
    same settings against the current index and adapter, as a skipped run; None when there is none."""
    timer = StageTimer()
    current = kb.answer_inputs()
    questions_sha = sha256_file(questions)
    wanted = settings.public_dict()
    for path in sorted(kb.dir("eval").glob("*/report.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        models = report.get("models") or {}
        if (
            report.get("split") == split
            and report.get("modes") == modes
            and report.get("questions_sha256") == questions_sha
            and report.get("limit") == limit
            and models.get("index_fingerprint") == current["ingest"]
            and models.get("adapter_fingerprint") == current["train"]
            and report.get("settings") == wanted
            and (path.parent / "table.md").exists()
        ):
            return EvalReport.load(path.parent, status="skipped", **timer.elapsed())
    return None
