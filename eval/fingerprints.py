"""What an eval's answers were made with: the index and adapter fingerprints and the models' hashes."""
from __future__ import annotations

from pathlib import Path

from kinject.core.files import sha256_text, sha256_tree
from kinject.core.kb import KB
from kinject.core.settings import Settings

_MODEL_SHA: dict[tuple, str] = {}


def folder_fingerprint(path: Path, full_limit: int = 2 << 30) -> str:
    """sha256 of every file when the folder is at most 2 GiB; above that, of the names, sizes and
    config.json (hashing tens of GB on every eval would cost minutes)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    key = (str(path), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _MODEL_SHA:
        if sum(p.stat().st_size for p in files) <= full_limit:
            _MODEL_SHA[key] = sha256_tree(path)
        else:
            listing = "\n".join(f"{p.relative_to(path)} {p.stat().st_size}" for p in files)
            cfg = (path / "config.json").read_text() if (path / "config.json").exists() else ""
            _MODEL_SHA[key] = "sizes:" + sha256_text(listing + cfg)
    return _MODEL_SHA[key]


def model_info(kb: KB, settings: Settings, endpoint: str | None) -> dict:
    from kinject.core.models import resolve_model

    train, ingest = kb.stage("train"), kb.stage("ingest")
    info: dict = {
        "index_fingerprint": ingest["fingerprint"] if ingest else None,
        "adapter_fingerprint": train["fingerprint"] if train else None,
    }
    adapter_dir = kb.root / "adapter"
    if train and (adapter_dir / "adapter_config.json").exists():
        info["adapter_sha256"] = sha256_tree(adapter_dir)
    if endpoint is None:
        for role, ref in (("llm", settings.models.llm), ("embedder", settings.models.embedder)):
            info[role] = ref
            info[f"{role}_sha256"] = folder_fingerprint(resolve_model(ref, settings))
    return info
