"""SPA augmentation: a KB's documents -> a curated synthetic corpus for continued pretraining.

`augment(kb, settings)` is the stage's one door; `load_training_texts(kb)` is what training reads.
"""
from __future__ import annotations

import json

from core.errors import KinjectError
from core.files import read_jsonl, sha256_text

__all__ = ["augment", "AugmentReport", "AugmentError", "load_training_texts", "load_training_records", "training_corpus_hash"]


def training_corpus_hash(texts: list[str]) -> str:
    """The fingerprint of a training corpus (the "augment" stage's manifest fingerprint)."""
    return sha256_text(json.dumps(texts, ensure_ascii=False))


def load_training_texts(kb) -> list[str]:
    """The curated training texts (`title\\ncompletion`), checked against the manifest record."""
    return [r["train_text"] for r in load_training_records(kb)]


def load_training_records(kb) -> list[dict]:
    """The curated samples (type, train_text, ...), checked against the manifest record."""
    rec = kb.stage("augment")
    if rec is None:
        raise KinjectError(f"KB {kb.name!r} has no synthetic corpus: run `kinject augment --kb {kb.name}` first")
    rows = read_jsonl(kb.dir("augment") / "curated.jsonl")
    texts = [r["train_text"] for r in rows]
    if training_corpus_hash(texts) != rec["fingerprint"]:
        raise KinjectError(
            f"KB {kb.name!r}: synthetic/curated.jsonl does not match the augment record in the manifest "
            f"(an augment run was interrupted while writing): rerun `kinject augment --kb {kb.name}`"
        )
    return rows


def __getattr__(name: str):
    # The stage itself imports the engines; keep `import ingest.augment` light for readers.
    if name in ("augment", "AugmentReport"):
        from ingest.augment import run

        return getattr(run, name)
    if name == "AugmentError":
        from ingest.augment.generate import AugmentError

        return AugmentError
    raise AttributeError(name)
