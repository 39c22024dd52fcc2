"""Adding files to the KB from the page: only files Gradio received through this page, each at
most `serve.max_upload_mb`, are indexed; the report says what was added and what was refused."""
from __future__ import annotations

import stat
from pathlib import Path

import gradio as gr

from kinject.core.answer import Answerer
from kinject.core.errors import KinjectError
from kinject.core.settings import Settings
from kinject.ingest.readers import Skipped


def upload_report(report) -> str:
    """What the upload added and, by file name, what was refused and why."""
    done = [f"{len(report.added)} added"]
    if report.changed:
        done.append(f"{len(report.changed)} replaced")
    if report.unchanged:
        done.append(f"{report.unchanged} unchanged")
    lines = [
        f"**Documents: {', '.join(done)}** ({report.chunks_embedded} chunks embedded). "
        f"The index now holds {report.documents} documents, {report.chunks} chunks; rag modes use them from the next question."
    ]
    if report.rebuilt:
        lines.append(f"\nThe whole index was embedded again: {report.rebuilt}.")
    if report.reindexed:
        lines.append(f"\nThe index was rebuilt without embedding: {report.reindexed}.")
    if report.skipped:
        lines.append("\n**Not added:**")
        lines += [f"- `{Path(s.path).name}`: {s.reason}" for s in report.skipped]
    if report.trimmed:
        lines.append("\n**Left out of the added documents:**")
        lines += [f"- `{Path(t.path).name}`: {t.what}" for t in report.trimmed]
    return "\n".join(lines)


def upload_limit(settings: Settings) -> int:
    return int(settings.serve.max_upload_mb * 2**20)


def accepted_upload(path: str | Path, upload_dir: str | Path, max_bytes: int) -> tuple[Path | None, str]:
    """(the file, "") for a regular file, at most max_bytes, that lies inside Gradio's upload
    folder once symlinks are resolved; else (None, why). An event names its files by server
    path, so without this any file the server can read could be pulled into the KB."""
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        return None, "not found"
    if Path(upload_dir).resolve() not in real.parents:
        return None, "not a file uploaded through this page"
    info = real.stat()
    if not stat.S_ISREG(info.st_mode):
        return None, "not a regular file"
    if info.st_size > max_bytes:
        return None, f"too large ({info.st_size / 2**20:.1f} MB > serve.max_upload_mb={max_bytes / 2**20:g})"
    return real, ""


def discard_upload(path: str | Path, upload_dir: str | Path) -> None:
    """Delete an uploaded temp file and the per-upload folder Gradio made for it; a path outside
    the upload folder is left alone."""
    real, root = Path(path).resolve(), Path(upload_dir).resolve()
    if root not in real.parents or not real.is_file():
        return
    real.unlink(missing_ok=True)
    if root in real.parent.parents:
        try:
            real.parent.rmdir()
        except OSError:  # another file is still in it
            pass


def make_upload(answerer: Answerer, settings: Settings, upload_dir: str):
    def upload(files: list[str] | None, progress=gr.Progress(track_tqdm=True)) -> str:
        if not files:
            raise gr.Error("Choose one or more files first.")
        from kinject.ingest.pipeline import add_files

        accepted, refused = [], []
        for f in files:
            real, why = accepted_upload(f, upload_dir, upload_limit(settings))
            if real is None:
                refused.append(Skipped(Path(f).name, why))
            else:
                accepted.append(real)
        try:
            if not accepted:
                raise gr.Error("Nothing was added: " + "; ".join(map(str, refused)))
            progress(0, desc=f"indexing {len(accepted)} file(s)")
            try:
                report = add_files(answerer.kb, accepted, settings, progress=True)
            except KinjectError as e:
                raise gr.Error(str(e)) from None
        finally:
            for f in files:  # the KB keeps its own copy (uploads/) of what it added
                discard_upload(f, upload_dir)
        report.skipped = refused + report.skipped
        return upload_report(report)

    return upload
