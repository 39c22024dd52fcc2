"""The KB's synthetic corpus on disk: what the augment stage writes and training reads.

`synthetic/curated.jsonl` holds the curated samples (type, train_text, ...); the manifest's
"augment" record holds the fingerprint of their texts, so a half-written file is refused.
"""
from __future__ import annotations

import json

from kinject.core.errors import KinjectError
from kinject.core.files import read_jsonl, sha256_text

# Sample types whose text is a list of Q/A pairs: training renders those pairs as chat turns and
# does not train on the text itself.
PAIRS_ONLY_TYPES = frozenset({"fact_qa"})

# Where the augment stage caches influence scores (core/influence.py) and keeps the user's target
# questions, relative to the KB's folder: training reuses the scores, the eval refuses the questions.
INFLUENCE_CACHE_PATH = "synthetic/influence.jsonl"
TARGET_FILES = ("synthetic/influence_targets.jsonl", "adapter/influence_targets.jsonl")


def influence_target_questions(kb) -> list[str]:
    """The questions the KB's influence scoring was told to aim at (augment's and train's)."""
    out = []
    for rel in TARGET_FILES:
        out += [r["question"] for r in read_jsonl(kb.root / rel) if isinstance(r.get("question"), str)]
    return out


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
