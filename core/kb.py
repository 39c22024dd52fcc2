"""Knowledge-base store: a folder with manifest.json and one sub-folder per stage.

The manifest is the only hand-over between stages. A stage's record is written once the stage
has finished, so the manifest describes finished work only. Each record carries a `fingerprint`
of what the stage produced and the `inputs` it consumed (upstream stage -> fingerprint), which
is how any stage, and `kinject kb show`, tells that something downstream is stale.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from kinject.core.errors import KinjectError
from kinject.core.files import atomic_write_json
from kinject.core.settings import Settings

SCHEMA_VERSION = 1
STAGE_DIRS = {"ingest": "index", "augment": "synthetic", "train": "adapter", "eval": "eval"}
UPLOADS_DIR = "uploads"  # originals of files added through the UI, ingested again with every corpus
# Everything a KB folder holds; `kb delete` removes these and nothing else.
KB_ENTRIES = ("manifest.json", ".lock", UPLOADS_DIR, *STAGE_DIRS.values())
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class KBError(KinjectError):
    """A KB problem a user can act on; the message says what to do."""


class KBLockedError(KBError):
    pass


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise KBError(
            f"invalid KB name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without path separators or '..'"
        )
    return name


# Locks held in this process: KB folder -> (holding thread, depth, lock file). The holding thread
# re-enters (build -> ingest -> record_stage); any other thread is refused like another process.
_held: dict[str, tuple[int, int, Any]] = {}
_held_guard = threading.Lock()


class KB:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.name = self.root.name

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def path_for(cls, settings: Settings, name: str) -> Path:
        return settings.kb_dir / validate_name(name)

    @classmethod
    def create(cls, settings: Settings, name: str, exist_ok: bool = False) -> "KB":
        root = cls.path_for(settings, name)
        if root.exists() and (root / "manifest.json").exists():
            if exist_ok:
                return cls(root)
            raise KBError(f"KB {name!r} already exists at {root}")
        if root.is_dir() and any(p.name != ".lock" for p in root.iterdir()):
            # Adopting it would let `kb delete` remove files that were never the KB's.
            raise KBError(f"{root} already exists and is not a KB; choose another name or move that folder away")
        root.mkdir(parents=True, exist_ok=True)
        kb = cls(root)
        with kb.lock():
            if not kb.manifest_path.exists():
                atomic_write_json(
                    kb.manifest_path,
                    {
                        "schema_version": SCHEMA_VERSION,
                        "name": name,
                        "created_at": now_iso(),
                        "settings": settings.public_dict(),
                        "models": {"llm": settings.models.llm, "embedder": settings.models.embedder},
                        "stages": {},
                    },
                )
        return kb

    @classmethod
    def open(cls, settings: Settings, name: str, create: bool = False) -> "KB":
        root = cls.path_for(settings, name)
        if not (root / "manifest.json").exists():
            if create:
                return cls.create(settings, name, exist_ok=True)
            raise KBError(f"no KB named {name!r} in {settings.kb_dir}; create it with `kinject kb create {name}`")
        return cls(root)

    @classmethod
    def list(cls, settings: Settings) -> list["KB"]:
        root = settings.kb_dir
        if not root.exists():
            return []
        return [cls(p) for p in sorted(root.iterdir()) if (p / "manifest.json").exists()]

    # ---- layout --------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def uploads(self) -> Path:
        return self.root / UPLOADS_DIR

    def dir(self, stage: str) -> Path:
        """The stage's own folder (index/, synthetic/, adapter/, eval/), created on demand."""
        d = self.root / STAGE_DIRS[stage]
        d.mkdir(parents=True, exist_ok=True)
        return d

    def inside(self, relative: str | Path) -> Path:
        """Resolve a user-supplied relative path, refusing anything that escapes the KB folder."""
        p = (self.root / relative).resolve()
        if p != self.root.resolve() and self.root.resolve() not in p.parents:
            raise KBError(f"path {str(relative)!r} escapes the KB folder")
        return p

    # ---- manifest ------------------------------------------------------------------------
    def manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise KBError(f"KB {self.name!r} has no manifest at {self.manifest_path}") from None

    def stage(self, name: str) -> dict | None:
        return self.manifest()["stages"].get(name)

    def answer_inputs(self) -> dict[str, str | None]:
        """The fingerprints of what answers depend on: the index and the adapter (None if absent)."""
        stages = self.manifest()["stages"]
        return {s: (stages.get(s) or {}).get("fingerprint") for s in ("ingest", "train")}

    def record_stage(
        self,
        name: str,
        *,
        fingerprint: str,
        inputs: dict[str, str] | None = None,
        outputs: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        started_at: str | None = None,
        work_seconds: float | None = None,
        **extra: Any,
    ) -> dict:
        """Record a finished stage. Call only when its outputs are complete on disk.

        `work_seconds`: for a run that found nothing to do, the wall time of the run that produced
        the outputs (`work_seconds(previous record)`), so re-recording does not lose it."""
        with self.lock():
            m = self.manifest()
            rec = {
                "status": "done",
                "fingerprint": fingerprint,
                "inputs": inputs or {},
                "outputs": outputs or {},
                "metrics": metrics or {},
                "started_at": started_at,
                "finished_at": now_iso(),
                **({"work_seconds": work_seconds} if work_seconds is not None else {}),
                **extra,
            }
            m["stages"][name] = rec
            atomic_write_json(self.manifest_path, m)
            return rec

    def update(self, **top_level: Any) -> None:
        """Update top-level manifest fields (e.g. corpus fingerprint) atomically."""
        with self.lock():
            m = self.manifest()
            m.update(top_level)
            atomic_write_json(self.manifest_path, m)

    def forget_stage(self, name: str) -> None:
        with self.lock():
            m = self.manifest()
            if m["stages"].pop(name, None) is not None:
                atomic_write_json(self.manifest_path, m)

    def stale(self) -> dict[str, list[str]]:
        """Stage -> upstream stages whose output changed since this stage consumed it."""
        stages = self.manifest()["stages"]
        out: dict[str, list[str]] = {}
        for name, rec in stages.items():
            changed = [
                up
                for up, fp in (rec.get("inputs") or {}).items()
                if up in STAGE_DIRS and (stages.get(up) or {}).get("fingerprint") != fp
            ]
            if changed:
                out[name] = changed
        return out

    def delete(self) -> list[str]:
        """Remove what makes the KB (its manifest, stage folders, uploads, lock) and, when nothing
        else is left, the folder. Returns the names of other entries, which are kept."""
        with self.lock():
            for name in KB_ENTRIES:
                if name == "manifest.json":
                    continue  # last: until it goes, an interrupted delete can be run again
                path = self.root / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            for leftover in self.root.glob(".manifest.json.*.tmp"):  # an interrupted atomic write
                leftover.unlink(missing_ok=True)
            self.manifest_path.unlink(missing_ok=True)
            kept = sorted(p.name for p in self.root.iterdir())
        if not kept:
            self.root.rmdir()
        return kept

    # ---- locking -------------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock on the KB, re-entrant within the thread that holds it; another thread
        or process is refused at once with KBLockedError.

        flock is released by the kernel when its holder dies (even by SIGKILL), so a stale lock
        file never blocks anyone; the pid inside it only names the holder in the error.
        """
        key = str(self.root.resolve())
        me = threading.get_ident()
        with _held_guard:
            holder = _held.get(key)
            if holder is not None:
                if holder[0] != me:
                    raise KBLockedError(f"KB {self.name!r} is locked by another thread of this process (pid {os.getpid()})")
                _held[key] = (me, holder[1] + 1, holder[2])
        if holder is None:
            self.root.mkdir(parents=True, exist_ok=True)
            fh = open(self.root / ".lock", "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder_pid = fh.read().strip() or "unknown"
                fh.close()
                raise KBLockedError(f"KB {self.name!r} is locked by pid {holder_pid}") from None
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            with _held_guard:
                _held[key] = (me, 1, fh)
        try:
            yield
        finally:
            with _held_guard:
                _, depth, fh = _held[key]
                if depth > 1:
                    _held[key] = (me, depth - 1, fh)
                else:
                    del _held[key]
                    fcntl.flock(fh, fcntl.LOCK_UN)
                    fh.close()


def work_seconds(record: dict | None) -> float | None:
    """Wall time of the run that produced a stage record's outputs: the `work_seconds` carried
    over by later runs that found nothing to do, else the record's own start-to-finish time."""
    if not record:
        return None
    if record.get("work_seconds") is not None:
        return record["work_seconds"]
    try:
        start, end = datetime.fromisoformat(record["started_at"]), datetime.fromisoformat(record["finished_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return round((end - start).total_seconds(), 3)

