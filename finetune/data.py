"""Training data: the KB's texts, tokenized with the base tokenizer and packed end to end.

Samples are joined with EOS and cut into fixed blocks of `train.block_size` tokens, so every
position in a batch is a real token (no padding) and the loss covers all of them. The order is a
pure function of the seed: the samples are shuffled once before packing, and each epoch visits
the blocks in its own seeded permutation, so a resumed run sees exactly the data it would have.

The synthetic Q/A pairs are rendered once per epoch (see `renderings`) and the renderings packed
together: each pair is asked closed-book in some epochs and with its passage quoted in others,
rather than always one way.
"""
from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass, field

from kinject.core.cloze import blank_one_span, cloze_sentences
from kinject.core.engines.base import answer_start, chat_text
from kinject.core.errors import KinjectError
from kinject.core.files import sha256_text
from kinject.core.kb import KB
from kinject.core.index import load_documents
from kinject.core.settings import Settings
from kinject.core.synthetic import INFLUENCE_CACHE, PAIRS_ONLY_TYPES, load_training_records

log = logging.getLogger(__name__)


class TrainDataError(KinjectError):
    pass


@dataclass
class Sample:
    text: str
    source: str  # "synthetic", "documents", "chat" or "replay"
    prompt_chars: int = 0  # with train.loss_on="answers": the loss skips text[:prompt_chars]


@dataclass
class Packed:
    blocks: list[list[int]]
    n_tokens: int  # real tokens in the packed stream (each sample once)
    block_size: int
    sources: dict[str, int] = field(default_factory=dict)  # samples per source
    fingerprint: str = ""  # hash of the token stream: which data a checkpoint was trained on
    short: bool = False  # the whole corpus is smaller than one block
    masks: list[list[bool]] | None = None  # per block: which tokens the loss predicts (None: all)
    loss_tokens: int = 0  # tokens the loss predicts in the stream
    renderings: int = 1  # epochs' worth of samples in the stream (see `renderings`)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def blocks_per_epoch(self) -> float:
        return len(self.blocks) / self.renderings

    @property
    def tokens_per_epoch(self) -> int:
        return round(self.n_tokens / self.renderings)


def pack(token_lists: list[list[int]], block_size: int, eos_id: int) -> tuple[list[list[int]], int]:
    """Concatenate samples with EOS after each and cut the stream into `block_size` blocks.

    The last, partial block is completed with tokens from the start of the stream rather than
    padding. A stream shorter than one block becomes a single shorter block.
    """
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    return cut_blocks(stream, block_size), len(stream)


def cut_blocks(stream: list, block_size: int) -> list[list]:
    n = len(stream)
    if n == 0:
        return []
    if n <= block_size:
        return [stream]
    blocks = [stream[i : i + block_size] for i in range(0, n, block_size)]
    if len(blocks[-1]) < block_size:
        blocks[-1] = blocks[-1] + stream[: block_size - len(blocks[-1])]
    return blocks


def loss_mask(sample: Sample, ids: list[int], offsets: list[tuple[int, int]]) -> list[bool]:
    """Which of a sample's tokens (and its closing EOS) the loss predicts: all, or those of the
    answer when the sample has a prompt part."""
    if not sample.prompt_chars:
        return [True] * (len(ids) + 1)
    return [start >= sample.prompt_chars for start, _ in offsets] + [True]


def block_order(n_blocks: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n_blocks))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def stream_indices(n_blocks: int, seed: int, start: int, count: int) -> list[int]:
    """Block indices at positions [start, start+count) of the endless epoch-by-epoch stream."""
    orders: dict[int, list[int]] = {}
    out = []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n_blocks)
        if epoch not in orders:
            orders[epoch] = block_order(n_blocks, seed, epoch)
        out.append(orders[epoch][i])
    return out


def renderings(settings: Settings) -> int:
    """How many epochs' worth of samples the training stream holds: one per (started) epoch when
    some but not all Q/A pairs are open-book, so that the open-book ones differ from epoch to
    epoch; otherwise every epoch would be the same and one copy serves them all."""
    t = settings.train
    if t.qa_chat and 0 < t.open_book_fraction < 1:
        return max(1, math.ceil(t.epochs))
    return 1


def collect_samples(kb: KB, settings: Settings, tokenizer, selection: dict | None = None, progress: bool = False) -> list[Sample]:
    """Every training text of the KB, by source, in a stable order, `renderings(settings)` times,
    the Q/A pairs rendered anew each time. With influence.enabled the synthetic samples are
    scored and, below influence.share 1, only each document's top share is kept; `selection`,
    when given, receives what the selection did (for the train report)."""
    records = synthetic_records(kb)
    if settings.influence.enabled:
        records, info = select_by_influence(kb, records, settings, progress)
        if selection is not None:
            selection.update(info)
    synthetic = [r["train_text"] for r in records]
    documents = document_texts(kb)
    # Types whose text is a list of Q/A pairs teach through those pairs, rendered as chat below.
    samples = [Sample(r["train_text"], "synthetic") for r in records if r["type"] not in PAIRS_ONLY_TYPES]
    if settings.train.include_documents:
        samples += [Sample(t, "documents") for t in documents]
    n = renderings(settings)
    out = samples * n
    if settings.train.qa_chat:
        out += qa_chat_samples(synthetic, documents, settings, tokenizer, renderings=n)
    return out


# ---- question/answer pairs in the service's chat formats ------------------------------------
_Q = r"(?:\*\*)?Q(?:uestion)?\s*\d*\s*[:.)](?:\*\*)?"
_A = r"(?:\*\*)?A(?:nswer)?\s*\d*\s*[:.)](?:\*\*)?"
_QA_RE = re.compile(rf"(?:^|\n)\s*{_Q}\s*(?P<q>[^\n]+?)\s*\n?\s*{_A}\s*(?P<a>.+?)\s*(?=\n\s*{_Q}|\n\s*\n|\Z)", re.S)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def grounded(answer: str, source: str, min_share: float = 0.6) -> bool:
    """Whether most of the answer's words occur in the source text (it is read, not invented)."""
    words = _words(answer)
    have = set(_words(source))
    return bool(words) and sum(w in have for w in words) / len(words) >= min_share


def qa_pairs(text: str) -> list[tuple[str, str]]:
    """The `Q: ... A: ...` pairs in a synthetic sample (the qa and critical_qa types write them)."""
    out = []
    for m in _QA_RE.finditer(text):
        q, a = " ".join(m["q"].split()), " ".join(m["a"].split())
        q = re.sub(r"^(?:Question\s*:\s*)+", "", q).strip(' "')
        if len(q) >= 8 and 0 < len(a) <= 400 and not re.match(_A, a):
            out.append((q, a))
    return out


@dataclass
class Passage:
    """What a retrieval hit looks like to `core.answer.build_messages`."""

    title: str
    text: str


def passages(document: str, words: int = 150) -> list[Passage]:
    title, _, body = document.partition("\n")
    tokens = body.split()
    return [Passage(title, " ".join(tokens[i : i + words])) for i in range(0, max(len(tokens), 1), words)]


_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_SPAN_RE = re.compile(
    rf"{_MONTH}\s+\d{{1,2}},?\s+\d{{3,4}}|\d{{1,2}}\s+{_MONTH}\s+\d{{3,4}}|{_MONTH}\s+\d{{3,4}}"
    r"|\b\d[\d,.]*(?:\s?(?:%|percent|million|billion|thousand|hundred))?"
    r"|(?<![.!?]\s)(?<!^)\b[A-Z][\w'’-]+(?:\s+(?:of|the|de|and|for)?\s*[A-Z][\w'’-]+)*"
)
CLOZE_MIN_PER_DOCUMENT = 2


def cloze_limit(document: str) -> int:
    """Two per document, or one per 150-word passage when there are more: a long document's
    text would otherwise outweigh its question/answer samples many times over, and the adapter
    would learn to continue stories rather than to answer from the quoted passages."""
    return max(CLOZE_MIN_PER_DOCUMENT, len(passages(document)))


def cloze_pairs(document: str, rng: random.Random, limit: int | None = None) -> list[tuple[str, str]]:
    """Fill-in-the-blank questions cut from the document itself: a sentence with one name,
    number or date blanked out, and that span as the answer. Grounded by construction, so they
    teach the short, extractive answers the service wants without any generated text.
    At most `limit` of them (default `cloze_limit(document)`)."""
    limit = cloze_limit(document) if limit is None else limit
    title, _, body = document.partition("\n")
    sentences = cloze_sentences(body)
    rng.shuffle(sentences)
    out = []
    for sentence in sentences:
        cut = blank_one_span(sentence, _SPAN_RE, rng, "____")
        if cut is None:
            continue
        blanked, answer = cut
        out.append((f'What fills the blank in this sentence about {title}? "{blanked}"', answer))
        if len(out) >= limit:
            break
    return out


def qa_chat_samples(synthetic: list[str], documents: list[str], settings: Settings, tokenizer, renderings: int = 1) -> list[Sample]:
    """Synthetic Q/A pairs rendered exactly as the service prompts the model: closed-book (the
    `ft` mode) and, for `train.open_book_fraction` of them, with the source passage quoted among
    other passages (the `ft-rag` mode). Training on these keeps the adapter answering briefly in
    chat, and from the quoted passage, instead of continuing text as plain pretraining teaches.

    The pairs are rendered `renderings` times, one rendering after the other: the same pairs each
    time, and each pair open-book in ⌊f·n⌋ or ⌈f·n⌉ of them (f the fraction, n the renderings),
    so every pair is also asked closed-book unless f is 1."""
    from kinject.core.answer import build_messages

    by_title: dict[str, list[Passage]] = {}
    for doc in documents:
        by_title.setdefault(doc.partition("\n")[0].strip(), []).extend(passages(doc))
    pool = [p for ps in by_title.values() for p in ps]
    others_of = {title: [p for p in pool if p.title != title] for title in by_title}  # distractor passages
    rng = random.Random(f"{settings.seed}:qa")
    k = min(settings.retrieval.top_k, 2)
    pairs: list[tuple[str, str, str]] = []  # (title, question, answer)
    for text in synthetic:
        title = text.partition("\n")[0].strip()
        own = by_title.get(title)
        source = " ".join(p.text for p in own) if own else text
        for question, answer in qa_pairs(text):
            # An answer the generator made up would teach the adapter to make things up.
            if grounded(answer, source):
                pairs.append((title, question, answer))
    for doc in documents:
        title = doc.partition("\n")[0].strip()
        pairs += [(title, q, a) for q, a in cloze_pairs(doc, rng)]
    # One phase per pair: it is open-book in the renderings r where (phase + r / n) mod 1 < f.
    phase_of = random.Random(f"{settings.seed}:open-book")
    phases = [phase_of.random() for _ in pairs]
    out = []
    for rendering in range(renderings):
        pick = random.Random(f"{settings.seed}:passages:{rendering}")
        for (title, question, answer), phase in zip(pairs, phases):
            own = by_title.get(title)
            hits = None
            if own and (phase + rendering / renderings) % 1.0 < settings.train.open_book_fraction:
                gold = next((p for p in own if answer.lower() in p.text.lower()), own[0])
                others = others_of[title]
                hits = [gold] + pick.sample(others, min(k - 1, len(others)))
                pick.shuffle(hits)
            messages = build_messages([{"role": "user", "content": question}], hits)
            prompt = chat_text(tokenizer, messages + [{"role": "assistant", "content": ""}])
            messages.append({"role": "assistant", "content": answer})
            text = chat_text(tokenizer, messages)
            out.append(Sample(text, "chat", answer_start(prompt, text)))
    return out


def select_by_influence(kb: KB, records: list[dict], settings: Settings, progress: bool = False) -> tuple[list[dict], dict]:
    """The records to train on, by influence, and a summary of the choice. Scores the augment
    stage cached for the same estimator are reused; the rest are scored here and cached in
    adapter/influence.jsonl."""
    from kinject.core.influence import score_records, select_top

    cache = kb.dir("train") / INFLUENCE_CACHE
    run, _ = score_records(records, settings, load_documents(kb), cache, progress, also_read=[kb.dir("augment") / INFLUENCE_CACHE])
    share = settings.influence.share
    keep = select_top(records, run.scores, share) if share < 1 else [True] * len(records)
    kept = [r for r, k in zip(records, keep) if k]
    per_type: dict[str, dict] = {}
    for r, k, score in zip(records, keep, run.scores):
        row = per_type.setdefault(r["type"], {"samples": 0, "kept": 0, "score_sum": 0.0, "kept_score_sum": 0.0})
        row["samples"] += 1
        row["score_sum"] += score
        if k:
            row["kept"] += 1
            row["kept_score_sum"] += score
    info = {
        **run.summary(),
        "share": share,
        "samples": len(records),
        "kept": len(kept),
        "kept_tokens": sum(r.get("tokens", 0) for r in kept),
        "tokens": sum(r.get("tokens", 0) for r in records),
        "per_type": {
            t: {
                "samples": v["samples"],
                "kept": v["kept"],
                "mean": round(v["score_sum"] / v["samples"], 5),
                "kept_mean": round(v["kept_score_sum"] / v["kept"], 5) if v["kept"] else None,
            }
            for t, v in per_type.items()
        },
    }
    return kept, info


def synthetic_records(kb: KB) -> list[dict]:
    missing = TrainDataError(f"KB {kb.name!r} has no synthetic corpus yet: run `kinject augment --kb {kb.name}` first")
    if not kb.stage("augment"):
        raise missing
    texts = [r for r in load_training_records(kb) if r["train_text"] and r["train_text"].strip()]
    if not texts:
        raise TrainDataError(
            f"KB {kb.name!r} has an empty synthetic corpus: run `kinject augment --kb {kb.name}` with a larger budget"
        )
    return texts


def document_texts(kb: KB) -> list[str]:
    """The KB's original documents as `title\\ntext` (empty when the KB holds none)."""
    if not kb.stage("ingest"):
        return []
    return [f"{d.title}\n{d.text}".strip() for d in load_documents(kb) if d.text.strip()]


def replay_samples(n_tokens: int, tokenizer, seed: int) -> list[tuple[Sample, list[int]]]:
    """About n_tokens of generic English prose that ships with Python itself (the reference
    manual's topics in `pydoc_data`), so replay needs no download."""
    from pydoc_data.topics import topics

    paragraphs = [
        " ".join(p.split())
        for body in topics.values()
        for p in body.split("\n\n")
        if len(p.split()) >= 20 and not p.startswith((" ", "*", "="))
    ]
    random.Random(f"{seed}:replay").shuffle(paragraphs)
    out, total = [], 0
    for p in paragraphs:
        if total >= n_tokens:
            break
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        out.append((Sample(p, "replay"), ids))
        total += len(ids) + 1
    return out


def build(samples: list[Sample], tokenizer, settings: Settings) -> Packed:
    """Tokenize, add replay text if asked, shuffle with the seed, pack."""
    if not samples:
        raise TrainDataError("nothing to train on: the KB gave no training texts")
    answers_only = settings.train.loss_on == "answers"
    enc = tokenizer([s.text for s in samples], add_special_tokens=False, return_offsets_mapping=answers_only)
    ids = enc["input_ids"]
    masks = [loss_mask(s, i, o) for s, i, o in zip(samples, ids, enc["offset_mapping"])] if answers_only else [None] * len(ids)
    items = list(zip(samples, ids, masks))
    fraction = settings.train.replay_fraction
    if fraction > 0:
        own = sum(len(i) + 1 for i in ids)
        items += [(s, i, [True] * (len(i) + 1)) for s, i in replay_samples(round(own * fraction / (1 - fraction)), tokenizer, settings.seed)]
    random.Random(settings.seed).shuffle(items)
    blocks, n_tokens = pack([i for _, i, _ in items], settings.train.block_size, tokenizer.eos_token_id)
    block_masks = None
    loss_tokens = n_tokens
    if answers_only:
        stream = [b for _, _, m in items for b in m]
        block_masks = cut_blocks(stream, settings.train.block_size)
        loss_tokens = sum(stream)
    n = renderings(settings)
    sources: dict[str, int] = {}
    for s, _, _ in items:
        sources[s.source] = sources.get(s.source, 0) + 1
    sources = {source: round(count / n) for source, count in sources.items()}  # per epoch
    short = n_tokens < settings.train.block_size
    if short:
        log.warning(
            "the training corpus has %d tokens, less than one block of %d: training on one short block",
            n_tokens,
            settings.train.block_size,
        )
    stream_text = ",".join(map(str, (t for b in blocks for t in b)))
    if block_masks is not None:
        stream_text += "|" + "".join("1" if x else "0" for m in block_masks for x in m)
    fingerprint = sha256_text(stream_text)
    return Packed(blocks, n_tokens, settings.train.block_size, sources, fingerprint, short, block_masks, loss_tokens, n)
