"""The KB's adapter as a server loads it: a private copy, whole, of the files the manifest names.

`kinject train` swaps a new adapter in file by file (finetune/train.py `_publish`): it forgets
the `train` record first, replaces the files, and records the new fingerprint last. A server
reading the folder in the middle could load one adapter's config with another's weights, and
vLLM may read an adapter's folder again long after it was added (to reload one it evicted from
its cache). So each server copies the files into a folder of its own and keeps the copy only if
the manifest named the same adapter before and after copying: then no swap began in between.
The engine then reads that copy, which nothing else writes.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path

from kinject.core.kb import KB, STAGE_DIRS

# What `kinject train` writes into the adapter folder (peft's save_pretrained, safetensors).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# ...or, with train.full_finetune, the subfolder holding the whole model (save_pretrained).
FULL_MODEL_DIR = "model"

_root: Path | None = None
_root_guard = threading.Lock()


def _copies_root() -> Path:
    """This process's folder of adapter copies, removed when it exits."""
    global _root
    with _root_guard:
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="kinject-adapters-"))
            atexit.register(shutil.rmtree, _root, True)
        return _root


def fingerprint_of(record: dict | None) -> str | None:
    """The adapter fingerprint a `train` record names, or None when the KB has none recorded."""
    return record.get("fingerprint", "") if record else None


def adapter_files(record: dict) -> tuple[str, ...]:
    """The files of the adapter a `train` record names (records without the list: ADAPTER_FILES)."""
    return tuple(record.get("outputs", {}).get("files", ADAPTER_FILES))


def copy_adapter(kb: KB, record: dict, name: str) -> Path | None:
    """A private copy of the adapter `record` describes, in a folder called `name`; None when the
    manifest stopped naming it while the files were copied (a training run is swapping a new one
    in: ask again once it has recorded it)."""
    source = kb.root / STAGE_DIRS["train"]
    target = _copies_root() / name
    drop_copy(name)
    target.mkdir()
    try:
        for file in adapter_files(record):
            try:
                (target / file).parent.mkdir(parents=True, exist_ok=True)  # a whole model's are under FULL_MODEL_DIR
                shutil.copyfile(source / file, target / file)
            except FileNotFoundError:
                continue
        if fingerprint_of(kb.stage("train")) != fingerprint_of(record):
            shutil.rmtree(target, ignore_errors=True)
            return None
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def drop_copy(name: str) -> None:
    """Delete the copy called `name`, if there is one (a stale one before copying anew, or a whole
    model the engine has loaded and no longer serves)."""
    shutil.rmtree(_copies_root() / name, ignore_errors=True)
