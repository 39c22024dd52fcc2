"""Cloze items cut from a document: a sentence with one fact span (a name, number or date)
blanked out, answered by that span. The answer stands in the document by construction, so every
item is grounded; training (`finetune/data.py`) and the influence target (`core/influence.py`)
both cut them, each with its own span pattern and wording."""
from __future__ import annotations

import random
import re

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“])")


def cloze_sentences(text: str) -> list[str]:
    """The text's sentences of 6 to 45 words: long enough to hold a fact, short enough to ask."""
    return [s.strip() for s in _SENTENCE_BREAK.split(text) if 6 <= len(s.split()) <= 45]


def blank_one_span(sentence: str, spans: re.Pattern, rng: random.Random, blank: str) -> tuple[str, str] | None:
    """(the sentence with one of its spans replaced by `blank`, that span), the span picked by
    `rng` among those past the sentence's first character; None when it has none."""
    found = [m for m in spans.finditer(sentence) if m.start() > 0 and len(m.group().strip(" ,.")) >= 2]
    if not found:
        return None
    m = rng.choice(found)
    answer = m.group().strip(" ,.")
    start = sentence.index(answer, m.start())
    return sentence[:start] + blank + sentence[start + len(answer) :], answer
