"""Whether eval questions reached a KB's training data.

Augmentation and training read the corpus only. A question can still share words with the
training data honestly: its 8-grams that stand in the corpus itself, and the question words a
rule-made question shares with it ("how many settlers came ashore at ..."). What cannot come from
the corpus is a question's own wording, so a leak is:
- the whole question (normalised) inside a training text, or
- an 8-gram of the question that has no question word, is not in the corpus, and is in a
  training text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

N = 8
_WORD = re.compile(r"\w+")
_QUESTION_WORDS = {"how", "what", "which", "who", "whom", "whose", "when", "where", "why"}


@dataclass(frozen=True)
class Leak:
    qid: str
    ngram: str  # the whole normalised question, or one of its 8-grams


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(ws: list[str], n: int = N) -> set[str]:
    return {" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1)}


def find_leaks(questions, training_texts: list[str], corpus_texts: list[str]) -> list[Leak]:
    """Leaks of `questions` (eval Question objects) into `training_texts`; see the module doc."""
    train_words = [words(t) for t in training_texts]
    train_grams = set().union(*(ngrams(w) for w in train_words)) if train_words else set()
    train_joined = "\n".join(" ".join(w) for w in train_words)
    corpus_grams = set().union(*(ngrams(words(t)) for t in corpus_texts)) if corpus_texts else set()
    leaks = []
    for q in questions:
        ws = words(q.question)
        whole = " ".join(ws)
        if len(ws) >= 4 and whole in train_joined:
            leaks.append(Leak(q.qid, whole))
            continue
        for g in sorted(ngrams(ws)):
            if g in train_grams and g not in corpus_grams and not _QUESTION_WORDS & set(g.split()):
                leaks.append(Leak(q.qid, g))
                break
    return leaks
