"""Scores for one answer, and the statistics over many: intervals and paired tests.

Short answers are compared as the official SQuAD v1.1 script does (lower case, no punctuation,
no articles, single spaces) for exact match and token F1.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
YES_NO = ("yes", "no")


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains_gold(prediction: str, gold: str) -> float:
    """The normalized gold answer appears, on word boundaries, in the normalized prediction:
    credit for a right answer inside a longer sentence, which EM refuses."""
    g = normalize_answer(gold)
    return float(bool(g) and f" {g} " in f" {normalize_answer(prediction)} ")


def is_yes_no(gold: str) -> bool:
    return normalize_answer(gold) in YES_NO


def yes_no_correct(prediction: str, gold: str) -> float:
    """The prediction's first word is the gold yes/no (case-insensitive)."""
    words = normalize_answer(prediction).split()
    return float(bool(words) and words[0] == normalize_answer(gold))


def ranked_doc_ids(sources: Sequence[dict]) -> list[str]:
    """Distinct doc ids in the order of their best-ranked passage."""
    return list(dict.fromkeys(s["doc_id"] for s in sources))


def recall_at_k(retrieved: Sequence[str], gold: Sequence[str], k: int) -> float:
    """Share of the gold documents among the first k distinct retrieved documents."""
    gold_set = set(gold)
    if not gold_set:
        raise ValueError("recall needs at least one gold doc id")
    return len(gold_set & set(list(dict.fromkeys(retrieved))[:k])) / len(gold_set)


def reciprocal_rank(retrieved: Sequence[str], gold: Sequence[str]) -> float:
    for rank, doc in enumerate(dict.fromkeys(retrieved), 1):
        if doc in gold:
            return 1.0 / rank
    return 0.0


# ---- statistics over questions -------------------------------------------------------------
def bootstrap_ci(values: Sequence[float], samples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def summarize(values: Sequence[float], samples: int = 1000, seed: int = 0) -> dict:
    lo, hi = bootstrap_ci(values, samples, seed)
    return {"mean": float(np.mean(values)) if len(values) else math.nan, "lo": lo, "hi": hi, "n": len(values)}


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact McNemar test (a binomial test on the discordant pairs) for 0/1 scores of
    two modes on the same questions."""
    if len(a) != len(b):
        raise ValueError("paired scores need the same questions")
    a_only = sum(1 for x, y in zip(a, b) if x > y)
    b_only = sum(1 for x, y in zip(a, b) if y > x)
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], samples: int = 1000, seed: int = 0) -> float:
    """Two-sided p-value of mean(a) - mean(b) = 0, resampling questions (pairs kept together)."""
    if len(a) != len(b):
        raise ValueError("paired scores need the same questions")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size == 0:
        return 1.0
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(samples, d.size))].mean(axis=1)
    p = 2 * min((means <= 0).mean(), (means >= 0).mean())
    return float(min(1.0, p))


def paired_test(a: Sequence[float], b: Sequence[float], samples: int = 1000, seed: int = 0) -> dict:
    """Exact McNemar for 0/1 scores (EM, accuracy), paired bootstrap for graded ones (F1)."""
    binary = all(v in (0.0, 1.0) for v in [*a, *b])
    p = mcnemar_exact(a, b) if binary else paired_bootstrap(a, b, samples, seed)
    diff = float(np.mean(a) - np.mean(b)) if len(a) else 0.0
    return {"diff": diff, "p": p, "test": "mcnemar_exact" if binary else "paired_bootstrap", "n": len(a)}


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan
