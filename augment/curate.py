"""Curation: which generated samples become training text, and why the others do not.

Per-sample checks run first, in this order: empty / too short, truncated, refusal, copy of the
source, unfaithful; then exact and near duplicates among the survivors (datasketch MinHash LSH),
in a fixed order so the result does not depend on when samples were generated. Every drop keeps
its reason; nothing is deleted (run.py writes the dropped ones to a side file).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from kinject.core.files import sha256_text
from kinject.core.settings import AugmentSettings
from kinject.augment.prompts import PROMPT_TYPES, SYSTEM

DROP_REASONS = ("empty", "too_short", "truncated", "refusal", "copy", "ungrounded", "unfaithful", "duplicate", "near_duplicate")

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*")
_CAPITALIZED = re.compile(r"(?<![\w'’-])[A-Z][A-Za-z]*(?:['’-][A-Za-z]+)*")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s|$)|\n")
_ENUMERATOR = re.compile(r"^\s*(?:[-*#>]+\s*)?\(?\d+[.):](?=\s|$)", re.M)
_TRAILING_ENUMERATOR = re.compile(r"(?:\n\s*(?:[-*#>]+\s*)?(?:\(?\d+[.):]|[-*•]))+\s*$")
# Words after which a number only counts items ("Step 2", "Question 3"): not a fact.
_COUNTING_WORDS = {
    "step", "question", "q", "a", "answer", "concept", "point", "part", "section", "example", "implication",
    "idea", "topic", "chapter", "phase", "stage", "fact", "item", "lesson", "no", "number", "case", "person",
}
_REFUSAL = re.compile(
    r"\b(?:I['’]?m sorry|I am sorry|I apologi[sz]e|I can(?:not|['’]t) (?:help|assist|provide|answer|fulfil|comply|do that)"
    r"|I['’]?m (?:unable|not able) to|I am (?:unable|not able) to|as an AI|as a language model"
    r"|I do(?:n['’]t| not) have (?:access|enough information|the ability))",
    re.I,
)
_REFUSAL_WINDOW = 240  # a refusal shows in the opening; later "sorry"s are part of a dialogue

# Capitalized words that our own prompts put in the output (headings, speaker names, labels) or
# that start clauses anyway: not named entities of the document.
_COMMON = {
    "i", "i'm", "i've", "i'd", "i'll", "a", "an", "the", "this", "that", "these", "those", "it", "its",
    "in", "on", "at", "of", "for", "by", "to", "and", "or", "but", "if", "so", "as", "with", "from",
    "what", "why", "how", "when", "where", "who", "which", "yes", "no", "not", "also", "however",
    "overall", "first", "second", "third", "finally", "next", "then", "let's", "let", "we", "you",
    "he", "she", "they", "there", "here", "is", "are", "was", "were", "do", "does", "did", "can",
    "question", "answer", "concept", "concepts", "implication", "implications", "conclusion",
    "summary", "introduction", "teacher", "student", "person", "speaker", "title", "topic",
}


def _prompt_vocabulary() -> set[str]:
    words = set(_COMMON)
    for t in PROMPT_TYPES.values():
        if t.variant_of:
            continue  # their rubric lines add no names: every capitalized word in them starts a sentence
        words.update(w.lower() for w in _WORD.findall(f"{t.instruction} {t.heading} {t.lead} {SYSTEM}"))
    return words


_NOT_ENTITIES = _prompt_vocabulary()


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def trim_to_sentence(text: str) -> str:
    """Cut a length-truncated output after its last complete sentence (or line)."""
    ends = list(_SENTENCE_END.finditer(text))
    if not ends:
        return ""
    return _TRAILING_ENUMERATOR.sub("", text[: ends[-1].end()].rstrip()).strip()


# ---- faithfulness -------------------------------------------------------------------------
def _sentence_initial(text: str, start: int) -> bool:
    before = text[:start].rstrip(" \t*_#>\"'“‘([-•")
    return not before or before[-1] in ".!?:\n"


def mentions(text: str) -> tuple[set[str], set[str]]:
    """(numbers, named entities) a text mentions: numbers normalised, entities lower-cased.

    Entities are capitalized words that do not start a sentence, line or label, minus words our
    own prompts ask for (headings, speaker names). List enumerators ("1.", "Step 2") are not numbers.
    """
    enumerators = {m.end() for m in _ENUMERATOR.finditer(text)}
    numbers = set()
    for m in _NUMBER.finditer(text):
        if any(m.start() < e <= m.end() + 2 for e in enumerators):
            continue
        prev = _WORD.findall(text[max(0, m.start() - 16) : m.start()])
        if prev and prev[-1].lower() in _COUNTING_WORDS and text[m.start() - 1] in " #":
            continue
        numbers.add(m.group().replace(",", "").rstrip("."))
    entities = set()
    for m in _CAPITALIZED.finditer(text):
        word = m.group().lower().removesuffix("'s").removesuffix("’s")
        if word in _NOT_ENTITIES or _sentence_initial(text, m.start()):
            continue
        entities.add(word)
    return numbers, entities


@dataclass
class SourceIndex:
    """What a document contains, for the copy and faithfulness checks."""

    words: set[str]
    numbers: set[str]
    ngrams: set[tuple[str, ...]]
    title: set[str]  # the title's words and numbers: every prompt repeats them

    @classmethod
    def of(cls, title: str, text: str, n: int = 8) -> "SourceIndex":
        full = f"{title}\n{text}"
        ws = words(full)
        numbers = {m.group().replace(",", "").rstrip(".") for m in _NUMBER.finditer(full)}
        return cls(set(ws), numbers, set(zip(*(ws[i:] for i in range(n)))), set(words(title)))


def faithfulness(text: str, source: SourceIndex) -> tuple[int, int, int]:
    """(found, total, beyond_title): of the sample's distinct numbers and entities, how many the
    source has, how many it mentions, and how many found ones are not just the title's words."""
    numbers, entities = mentions(text)
    hits = [n for n in numbers if n in source.numbers]
    hits += [e for e in entities if all(w in source.words for w in words(e))]
    return len(hits), len(numbers) + len(entities), sum(h not in source.title for h in hits)


def copy_overlap(text: str, source: SourceIndex, n: int = 8) -> float:
    """Share of the sample's distinct word n-grams that appear verbatim in the source."""
    ws = words(text)
    grams = set(zip(*(ws[i:] for i in range(n))))
    return len(grams & source.ngrams) / len(grams) if grams else 0.0


# ---- the checks ---------------------------------------------------------------------------
@dataclass
class Verdict:
    text: str  # the text that would be trained on (trimmed when the output was cut off)
    tokens: int
    reason: str | None = None
    detail: dict = field(default_factory=dict)
    found: int = 0  # numbers/entities found in the source
    mentioned: int = 0  # numbers/entities mentioned


def check_sample(sample: dict, source: SourceIndex, cfg: AugmentSettings) -> Verdict:
    """Per-sample checks. `sample` is a samples.jsonl record (text, tokens, finish_reason...)."""
    text, tokens = sample["text"].strip(), sample["tokens"]
    if sample.get("finish_reason") == "length":
        text, tokens = sample.get("trimmed_text", "").strip(), sample.get("trimmed_tokens", 0)
        if not text or tokens < cfg.min_tokens:
            return Verdict(text, tokens, "truncated", {"kept_tokens": tokens})
    if not text:
        return Verdict(text, tokens, "empty")
    if tokens < cfg.min_tokens:
        return Verdict(text, tokens, "too_short", {"tokens": tokens})
    found, total, beyond_title = faithfulness(text, source)
    v = Verdict(text, tokens, found=found, mentioned=total)
    if PROMPT_TYPES.get(sample["type"]) and PROMPT_TYPES[sample["type"]].rule:
        # Cut from the source by rule: it copies the source on purpose and invents nothing.
        return v
    if m := _REFUSAL.search(text[:_REFUSAL_WINDOW]):
        v.reason, v.detail = "refusal", {"match": m.group()}
        return v
    overlap = copy_overlap(text, source)
    if overlap > cfg.copy_overlap_max:
        v.reason, v.detail = "copy", {"overlap": round(overlap, 3)}
        return v
    if beyond_title == 0:
        # Names none of the document's entities or numbers beyond its title: nothing in it is
        # knowledge from the document (echoes of the prompt, generic filler, made-up names).
        v.reason, v.detail = "ungrounded", {"mentioned": total}
        return v
    share = found / total
    if share < cfg.faithfulness_min:
        v.reason, v.detail = "unfaithful", {"faithfulness": round(share, 3), "found": found, "mentioned": total}
    return v


def _shingles(text: str, n: int = 3) -> set[str]:
    ws = words(text)
    return {" ".join(ws[i : i + n]) for i in range(max(1, len(ws) - n + 1))}


def near_duplicates(texts: list[str], threshold: float, num_perm: int = 128, skip: set[int] = frozenset()) -> dict[int, tuple[str, int]]:
    """index -> (reason, index of the earlier text it repeats): exact first, then MinHash LSH.
    Texts at `skip` are neither checked nor matched against."""
    from datasketch import MinHash, MinHashLSH

    out: dict[int, tuple[str, int]] = {}
    seen: dict[str, int] = {}
    lsh = MinHashLSH(threshold=min(max(threshold, 0.01), 0.99), num_perm=num_perm)
    hashes: dict[str, MinHash] = {}
    for i, text in enumerate(texts):
        if i in skip:
            continue
        norm = " ".join(words(text))
        digest = sha256_text(norm)
        if digest in seen:
            out[i] = ("duplicate", seen[digest])
            continue
        seen[digest] = i
        mh = MinHash(num_perm=num_perm, seed=1)
        for s in _shingles(text):
            mh.update(s.encode("utf-8"))
        close = [int(k) for k in lsh.query(mh) if hashes[k].jaccard(mh) >= threshold]
        if close:
            out[i] = ("near_duplicate", min(close))
            continue
        lsh.insert(str(i), mh)
        hashes[str(i)] = mh
    return out


@dataclass
class Curated:
    kept: list[dict]
    dropped: list[dict]
    counts: dict[str, int]  # reason -> number of samples dropped for it
    found: int = 0  # over every non-empty sample: numbers/entities found in the source...
    mentioned: int = 0  # ...of those mentioned (the faithfulness proxy)


def curate(samples: list[dict], docs: dict, cfg: AugmentSettings) -> Curated:
    """samples: samples.jsonl records in plan order; docs: doc_id -> Document."""
    sources = {d.doc_id: SourceIndex.of(d.title, d.text) for d in docs.values()}
    dropped, survivors, counts = [], [], dict.fromkeys(DROP_REASONS, 0)
    found = mentioned = 0
    for s in samples:
        v = check_sample(s, sources[s["doc_id"]], cfg)
        found, mentioned = found + v.found, mentioned + v.mentioned
        rec = _record(s, docs[s["doc_id"]], v)
        if v.reason:
            counts[v.reason] += 1
            dropped.append({**rec, "reason": v.reason, "detail": v.detail})
        else:
            survivors.append(rec)
    # A rule type's samples of one document are variants of the same sentences by design.
    dups = near_duplicates([r["text"] for r in survivors], cfg.near_dup_threshold, skip={i for i, r in enumerate(survivors) if PROMPT_TYPES[r["type"]].rule})
    kept = []
    for i, rec in enumerate(survivors):
        if i in dups:
            reason, of = dups[i]
            counts[reason] += 1
            other = survivors[of]
            dropped.append({**rec, "reason": reason, "detail": {"of": [other["doc_id"], other["type"], other["sample_index"]]}})
        else:
            kept.append(rec)
    return Curated(kept, dropped, counts, found, mentioned)


def _record(sample: dict, doc, v: Verdict) -> dict:
    return {
        "doc_id": sample["doc_id"],
        "type": sample["type"],
        "sample_index": sample["sample_index"],
        "prompt_id": sample["prompt_id"],
        "seed": sample["seed"],
        "generator": sample["generator"],
        "text": v.text,
        "tokens": v.tokens,
        "train_text": f"{doc.title}\n{v.text}",
        "faithfulness": round(v.found / v.mentioned, 3) if v.mentioned else None,
        "mentions": [v.found, v.mentioned],
    }
