"""The KB's synthetic corpus on disk: what the augment stage writes and training reads.

`synthetic/curated.jsonl` holds the curated samples (type, train_text, ...); the manifest's
"augment" record holds the fingerprint of their texts, so a half-written file is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

from kinject.core.errors import KinjectError
from kinject.core.files import atomic_write_text, read_jsonl, sha256_text
from kinject.core.kb import STAGE_DIRS

# Sample types whose text is a list of Q/A pairs: training renders those pairs as chat turns and
# does not train on the text itself.
PAIRS_ONLY_TYPES = frozenset({"fact_qa", "entity_qa", "yes_no"})

# In the augment and train stages' folders: the influence score cache (core/influence.py; training
# also reads augment's) and the user's target questions, which the eval refuses to score.
INFLUENCE_CACHE = "influence.jsonl"
INFLUENCE_TARGETS = "influence_targets.jsonl"
_STAGES_WITH_TARGETS = ("augment", "train")


def keep_target_questions(folder: Path, items: list) -> None:
    """Keep the user's target questions (items with .question and .answer) in a stage's folder,
    where the eval finds them; with none, remove those of an earlier run."""
    path = folder / INFLUENCE_TARGETS
    if items:
        atomic_write_text(path, "".join(json.dumps({"question": t.question, "answer": t.answer}, ensure_ascii=False) + "\n" for t in items))
    elif path.exists():
        path.unlink()


def influence_target_questions(kb) -> list[str]:
    """The questions the KB's influence scoring was told to aim at (augment's and train's)."""
    out = []
    for stage in _STAGES_WITH_TARGETS:
        rows = read_jsonl(kb.root / STAGE_DIRS[stage] / INFLUENCE_TARGETS)
        out += [r["question"] for r in rows if isinstance(r.get("question"), str)]
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
