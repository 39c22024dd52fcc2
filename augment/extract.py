"""Fact-level training text cut from the documents themselves, with no generator in the loop.

A 135M generator invents most of the names and numbers in long synthetic essays, so the facts
it should teach are the ones it gets wrong. These recipes instead take every sentence of a
document and rewrite it by rule, so each output can be checked against its source by
construction:

- `fact_qa`: a question per fact span (name, number, date, or a phrase introduced by "known
  as"/"called"): the sentence with that span replaced by a wh-phrase ("in what year", "how many
  metres", "who"), answered by the span. Many questions per sentence show the same fact from
  each of its ends, which is what makes a stored fact answerable from a new question.
- `restate`: the sentence restated with its document's subject named ("It" becomes the title)
  and a lead that names the document, so each fact also stands on its own.
- the same spans blanked out of their sentence ("fill in the blank"), answered by the span:
  `fact_qa`'s odd samples.

The functions here are pure and seeded; the augment stage records their output like any other
type's samples.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

# Bump when a rule's output changes, so stored samples of the old rule are regenerated.
RULES_VERSION = "2"

_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_NUMBER_WORDS = (
    "two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|"
    "sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|"
    "hundred|thousand|dozen"
)
# Words that start a sentence or a name but are not themselves a name.
_NOT_NAMES = {
    "a", "an", "the", "in", "on", "at", "by", "for", "from", "of", "to", "with", "after", "before",
    "during", "since", "until", "when", "while", "it", "its", "he", "she", "they", "his", "her",
    "their", "this", "these", "those", "that", "there", "today", "each", "every", "some", "many",
    "most", "all", "both", "one", "as", "but", "and", "or", "however", "although", "unlike", "like",
    "i", "we", "you", "our", "my", "if", "what", "which", "who", "where", "why", "how",
}
_PERSON_TITLES = (
    "Admiral|Captain|Commodore|General|Colonel|King|Queen|Prince|Princess|Lord|Lady|Sir|Dame|"
    "Dr|Doctor|Professor|President|Mayor|Bishop|Saint|St|Mr|Mrs|Ms|Miss|Warden|Keeper|Master"
)
_NAME = r"[A-Z][\w'’-]*(?:\s+(?:of|the|de|van|von|du|la|and|for|al)?\s*[A-Z][\w'’-]*)*"
_SPAN_RE = re.compile(
    rf"(?P<date>\b\d{{1,2}}\s+{_MONTH}(?:\s+\d{{3,4}})?|\b{_MONTH}\s+\d{{1,2}}(?:,?\s+\d{{3,4}})?|\b{_MONTH}\s+\d{{3,4}})"
    rf"|(?P<year>\b(?:1[0-9]{{3}}|20[0-9]{{2}})s?\b(?![.,]?\d|\s*(?:%|percent|per cent)))"
    rf"|(?P<quantity>\b(?:\d[\d,]*(?:\.\d+)?|(?:{_NUMBER_WORDS})(?:[\s-](?:{_NUMBER_WORDS}))*)"
    rf"(?:\s+(?:million|billion|thousand|hundred))?(?:\s*(?:%|percent|per cent)|\s+(?P<unit>[a-z][a-z-]+))?)"
    rf"|(?P<known>(?<=\bknown as )(?:the\s+)?{_NAME}|(?<=\bcalled )(?:the\s+)?{_NAME}|(?<=\bnamed )(?:the\s+)?{_NAME})"
    rf"|(?P<name>(?:(?:{_PERSON_TITLES})\.?\s+)?{_NAME})"
)
_LEADING_PRONOUN = re.compile(r"^(?:It|This)\b")
_UNIT_STOPWORDS = {"and", "or", "of", "in", "on", "at", "to", "the", "a", "an", "by", "for", "was", "were", "is", "are", "had", "has"}


@dataclass(frozen=True)
class Span:
    text: str
    kind: str  # "date", "year", "quantity", "known" or "name"
    start: int
    end: int
    unit: str = ""


def split_document(document: str) -> tuple[str, list[str]]:
    """(title, sentences) of a `title\\ntext` document; markdown marks and list bullets removed."""
    title, _, body = document.partition("\n")
    title = title.strip().lstrip("#").strip()
    body = re.sub(r"^\s*(?:#+|[-*•]|\d+[.)])\s+", "", body, flags=re.M)
    body = re.sub(r"[*_`]{1,3}", "", body)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body) if p.strip()]
    sentences = []
    for p in paragraphs:
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"“(])", p):
            s = s.strip()
            if 5 <= len(s.split()) <= 60 and s[-1:] in ".!?\"”)":
                sentences.append(s)
    return title, sentences


def with_subject(sentence: str, title: str, previous: str = "") -> str:
    """The sentence with a leading "It"/"This" replaced by the document's title when the sentence
    before it was about the title too, so the fact names what it is about even out of context."""
    m = _LEADING_PRONOUN.match(sentence)
    if not m or not title:
        return sentence
    head = {w.lower() for w in re.findall(r"\w+", previous)[:6]}
    key = [w.lower() for w in re.findall(r"\w+", title) if w.lower() not in _NOT_NAMES]
    if not key or key[0] not in head:
        return sentence
    return title + sentence[m.end():]


def resolved_sentences(document: str) -> tuple[str, list[str]]:
    """(title, sentences) with leading pronouns resolved where that is safe."""
    title, sentences = split_document(document)
    return title, [with_subject(s, title, sentences[i - 1] if i else title) for i, s in enumerate(sentences)]


def spans(sentence: str) -> list[Span]:
    """The fact spans of a sentence: dates, years, quantities, names and named things."""
    out = []
    for m in _SPAN_RE.finditer(sentence):
        kind = next(k for k in ("date", "year", "quantity", "known", "name") if m.group(k))
        text, start = m.group(kind), m.start(kind)
        unit = ""
        if kind == "quantity":
            unit = m.group("unit") or ""
            if unit in _UNIT_STOPWORDS:
                text = text[: text.rfind(unit)].rstrip()
                unit = ""
        if kind == "name":
            words = text.split()
            while words and words[0].lower() in _NOT_NAMES:
                words.pop(0)
            if not words:
                continue
            start = sentence.index(words[0], start)
            text = " ".join(words)
            if start == 0 and len(words) == 1:
                continue  # a capitalised first word is usually not a name
        text = text.strip(" ,.;:")
        if len(text) >= 2:
            out.append(Span(text, kind, start, start + len(text), unit))
    return out


def wh_phrase(sentence: str, span: Span) -> tuple[int, int, str]:
    """(start, end, phrase): the part of the sentence a question replaces, and its wh-phrase."""
    before = sentence[: span.start]
    prep = re.search(r"\b(in|on|at|of|since|until|by|from|after|before|around|about|near|to)\s+$", before, re.I)
    start = prep.start() if prep else span.start
    lead = f"{prep.group(1).lower()} " if prep else ""
    if span.kind == "date":
        return (start, span.end, f"{lead}what date" if lead else "when")
    if span.kind == "year":
        return (start, span.end, f"{lead}what year" if lead else "what year")
    if span.kind == "quantity":
        if re.search(r"%|percent|per cent", span.text):
            return (span.start, span.end, "what percentage")
        if span.unit:
            return (span.start, span.end, f"how many {span.unit}")
        return (span.start, span.end, "how many")
    if span.kind == "name" and span.text.endswith(("'s", "’s")):
        return (span.start, span.end, "whose")
    person = bool(re.match(rf"(?:{_PERSON_TITLES})\b", span.text)) or bool(
        re.search(r"\bby\s+$", before) or re.match(r"\s*,\s+who\b", sentence[span.end:])
    )
    if span.kind == "name" and person:
        return (start, span.end, f"{lead}whom" if lead else "who")
    if span.kind == "name" and prep and prep.group(1).lower() in ("in", "on", "at", "from"):
        return (start, span.end, "from where" if lead == "from " else "where")
    return (start, span.end, f"{lead}what" if lead else "what")


def question(sentence: str, span: Span) -> str:
    """The sentence asked about one span: "X was founded in 1836 by Y." asked about 1836 is
    "X was founded in what year by Y?"."""
    start, end, phrase = wh_phrase(sentence, span)
    if start == 0:
        phrase = phrase[0].upper() + phrase[1:]
    rest = sentence[end:].rstrip(" .!?\"”")
    # A long tail after the asked span is cut at its next clause, so the question stays focused.
    if len(rest.split()) > 12:
        cut = re.search(r"[,;:]\s", rest)
        if cut:
            rest = rest[: cut.start()]
    q = (sentence[:start] + phrase + rest).strip()
    return q.rstrip(",;: ") + "?"


MAX_ANSWER_CHARS = 360  # finetune.data.qa_pairs reads answers up to 400 characters


def with_evidence(answer: str, sentence: str) -> str:
    """"1836. X was founded in 1836 by Y." -- the short answer first, then its sentence."""
    full = f"{answer}. {sentence}" if not answer.endswith(".") else f"{answer} {sentence}"
    return full if len(full) <= MAX_ANSWER_CHARS else answer


def blanked(sentence: str, span: Span) -> str:
    return sentence[: span.start] + "____" + sentence[span.end :]


def fact_qa(document: str, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) for every fact span of every sentence, shuffled. The answer is the
    span as the document writes it, then the sentence it comes from: grounded by construction,
    and each answer states its fact once more in full."""
    title, sentences = resolved_sentences(document)
    out = []
    for s in sentences:
        for span in spans(s):
            if s[span.end : span.end + 1].isalnum() or s[span.end : span.end + 1] in "-'’":
                continue  # part of a longer word ("10-pip"): no question reads well around it
            q = question(s, span)
            if span.text.lower() not in q.lower() and len(q.split()) >= 5:
                out.append((q, with_evidence(span.text, s)))
    rng.shuffle(out)
    return out


def cloze_qa(document: str, rng: random.Random) -> list[tuple[str, str]]:
    title, sentences = resolved_sentences(document)
    out = []
    for s in sentences:
        for span in spans(s):
            q = f'What fills the blank in this sentence about {title}? "{blanked(s, span)}"'
            if span.text.lower() not in q.lower():
                out.append((q, span.text))
    rng.shuffle(out)
    return out


_ENTITY_QUESTIONS = (
    "What do you know about {entity}?",
    "Tell me about {entity}.",
    "What does the record of {title} say about {entity}?",
    "What facts are there about {entity}?",
)
MAX_ENTITY_SENTENCES = 3


def entity_qa(document: str, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) for each name of the document: a question about that name, answered by
    the sentences that mention it (up to three, in a seeded order). The same facts as
    `fact_qa`'s, keyed by each of the things they are about rather than asked span by span."""
    title, sentences = resolved_sentences(document)
    mentions: dict[str, list[str]] = {}
    for s in sentences:
        for span in spans(s):
            if span.kind not in ("name", "known") or span.text.lower() == title.lower():
                continue
            about = mentions.setdefault(span.text, [])
            if s not in about:
                about.append(s)
    out = []
    for entity, about in mentions.items():
        about = rng.sample(about, min(len(about), MAX_ENTITY_SENTENCES))
        while len(about) > 1 and len(" ".join(about)) > MAX_ANSWER_CHARS:
            about.pop()
        answer = " ".join(about)
        if len(answer) <= MAX_ANSWER_CHARS:
            out.append((rng.choice(_ENTITY_QUESTIONS).format(entity=entity, title=title), answer))
    rng.shuffle(out)
    return out


_YES_NO_LEADS = ("Is it true that {claim}?", "Does the record of {title} say that {claim}?", "Is it the case that {claim}?")


def _claim(sentence: str) -> str:
    """A sentence as the clause of a question: final stop dropped, first letter lowered unless it
    starts a name."""
    body = sentence.rstrip(" .!")
    first = body.split(" ", 1)[0]
    lowered = first.lower() if first in ("The", "A", "An", "In", "On", "At", "By", "For", "After", "Before", "During", "Since") else first
    return lowered + body[len(first):]


def yes_no_qa(document: str, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs asking whether a sentence's claim holds: the sentence as written
    (answered "Yes." and the sentence), and the sentence with one fact span swapped for another
    span of the same kind from the same document (answered "No." and the true sentence). The
    swap makes the false claim plausible; the answer always restates what the document says."""
    title, sentences = resolved_sentences(document)
    by_kind: dict[str, set[str]] = {}
    found = [(s, spans(s)) for s in sentences]
    for _, ss in found:
        for span in ss:
            by_kind.setdefault(span.kind, set()).add(span.text)
    out = []
    for s, ss in found:
        if not ss:
            continue
        lead = rng.choice(_YES_NO_LEADS)
        if len(s) <= MAX_ANSWER_CHARS:
            out.append((lead.format(claim=_claim(s), title=title), f"Yes. {s}"))
        span = rng.choice(ss)
        others = sorted(t for t in by_kind.get(span.kind, ()) if t.lower() not in s.lower())
        if others and len(s) <= MAX_ANSWER_CHARS:
            false = s[: span.start] + rng.choice(others) + s[span.end :]
            out.append((rng.choice(_YES_NO_LEADS).format(claim=_claim(false), title=title), f"No. {s}"))
    rng.shuffle(out)
    return out


_RESTATE_LEADS = ("{title}: ", "About {title}. ", "From the record of {title}: ", "A fact about {title}: ")


def restatements(document: str, rng: random.Random) -> list[str]:
    """Each sentence standing alone: subject named, led by its document's title."""
    title, sentences = resolved_sentences(document)
    return [rng.choice(_RESTATE_LEADS).format(title=title) + s for s in sentences]


def qa_text(pairs: list[tuple[str, str]]) -> str:
    """Pairs in the `Q: ... A: ...` form that training reads (finetune.data.qa_pairs)."""
    return "\n".join(f"Q: {q}\nA: {a}" for q, a in pairs)


# Rule types whose samples are one seeded list of Q/A pairs, the same for every sample index.
_PAIR_RULES = {"entity_qa": entity_qa, "yes_no": yes_no_qa}


def rule_sample(type_id: str, title: str, text: str, sample_index: int, seed: int, share: float = 1.0) -> str:
    """One sample of a rule type for a document. Successive samples of a document vary: other
    orders and leads, and for `fact_qa` questions (even indices) and fill-in-the-blank
    prompts (odd indices) in turn, so a larger budget adds phrasings, not copies. `share` < 1
    keeps that share of its items (a budget smaller than one pass over the corpus)."""
    document = f"{title}\n{text}"
    rng = random.Random(seed)
    if type_id == "fact_qa":
        items = fact_qa(document, rng) if sample_index % 2 == 0 else cloze_qa(document, rng)
        return qa_text(items[: _kept(len(items), share)])
    if type_id in _PAIR_RULES:
        items = _PAIR_RULES[type_id](document, rng)
        return qa_text(items[: _kept(len(items), share)])
    if type_id == "restate":
        lines = restatements(document, rng)
        rng.shuffle(lines)
        return "\n".join(lines[: _kept(len(lines), share)])
    raise ValueError(f"no rule for augmentation type {type_id!r}")


def _kept(n: int, share: float) -> int:
    return n if share >= 1 else max(1, round(n * share)) if n else 0
