"""augment: a KB's documents -> a curated synthetic corpus for training (SPA's seven types plus
rule-cut fact-level types). `augment(kb, settings)` is the stage's one door; what it writes is
read back through `kinject.core.synthetic`.
"""
from __future__ import annotations

__all__ = ["augment", "AugmentReport", "AugmentError"]


def __getattr__(name: str):
    # The stage itself imports the engines; keep `import kinject.augment` light for readers.
    if name in ("augment", "AugmentReport"):
        from kinject.augment import run

        return getattr(run, name)
    if name == "AugmentError":
        from kinject.augment.generate import AugmentError

        return AugmentError
    raise AttributeError(name)
