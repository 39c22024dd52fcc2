"""Training data: the KB's texts, tokenized with the base tokenizer and packed end to end.

Samples are joined with EOS and cut into fixed blocks of `train.block_size` tokens, so every
position in a batch is a real token (no padding) and the loss covers all of them. The order is a
pure function of the seed: the samples are shuffled once before packing, and each epoch visits
the blocks in its own seeded permutation, so a resumed run sees exactly the data it would have.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from core.errors import KinjectError
from core.files import sha256_text
from core.kb import KB
from core.settings import Settings

log = logging.getLogger(__name__)


class TrainDataError(KinjectError):
    pass


@dataclass
class Sample:
    text: str
    source: str  # "synthetic", "documents", "chat" or "replay"


@dataclass
class Packed:
    blocks: list[list[int]]
    n_tokens: int  # real tokens in the packed stream (each sample once)
    block_size: int
    sources: dict[str, int] = field(default_factory=dict)  # samples per source
    fingerprint: str = ""  # hash of the token stream: which data a checkpoint was trained on
    short: bool = False  # the whole corpus is smaller than one block

    def __len__(self) -> int:
        return len(self.blocks)


def pack(token_lists: list[list[int]], block_size: int, eos_id: int) -> tuple[list[list[int]], int]:
    """Concatenate samples with EOS after each and cut the stream into `block_size` blocks.

    The last, partial block is completed with tokens from the start of the stream rather than
    padding. A stream shorter than one block becomes a single shorter block.
    """
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    n = len(stream)
    if n == 0:
        return [], 0
    if n <= block_size:
        return [stream], n
    blocks = [stream[i : i + block_size] for i in range(0, n, block_size)]
    if len(blocks[-1]) < block_size:
        blocks[-1] = blocks[-1] + stream[: block_size - len(blocks[-1])]
    return blocks, n


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


def chat_text(tokenizer, messages: list[dict]) -> str:
    """A whole conversation (ending with the assistant's turn) as the model reads it."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    # Same transcript the engine uses for models without a chat template.
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def collect_samples(kb: KB, settings: Settings) -> list[Sample]:
    """Every training text of the KB, by source, in a stable order."""
    samples = [Sample(t, "synthetic") for t in synthetic_texts(kb)]
    if settings.train.include_documents:
        samples += [Sample(t, "documents") for t in document_texts(kb)]
    return samples


def synthetic_texts(kb: KB) -> list[str]:
    missing = TrainDataError(f"KB {kb.name!r} has no synthetic corpus yet: run `kinject augment --kb {kb.name}` first")
    if not kb.stage("augment"):
        raise missing
    try:
        from ingest.augment import load_training_texts
    except ImportError as e:  # pragma: no cover - only in a broken install
        raise TrainDataError(f"the augment stage is not installed ({e})") from None
    try:
        texts = [t for t in load_training_texts(kb) if t and t.strip()]
    except FileNotFoundError:
        raise missing from None
    if not texts:
        raise TrainDataError(
            f"KB {kb.name!r} has an empty synthetic corpus: run `kinject augment --kb {kb.name}` with a larger budget"
        )
    return texts


def document_texts(kb: KB) -> list[str]:
    """The KB's original documents as `title\\ntext` (empty when the KB holds none)."""
    if not kb.stage("ingest"):
        return []
    from ingest.pipeline import load_documents

    return [f"{d.title}\n{d.text}".strip() for d in load_documents(kb) if d.text.strip()]


def build(samples: list[Sample], tokenizer, settings: Settings) -> Packed:
    """Shuffle the samples with the seed, tokenize, pack."""
    if not samples:
        raise TrainDataError("nothing to train on: the KB gave no training texts")
    order = list(range(len(samples)))
    random.Random(settings.seed).shuffle(order)
    ordered = [samples[i] for i in order]
    ids = tokenizer([s.text for s in ordered], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    blocks, n_tokens = pack(ids, settings.train.block_size, eos)
    sources: dict[str, int] = {}
    for s in ordered:
        sources[s.source] = sources.get(s.source, 0) + 1
    short = n_tokens < settings.train.block_size
    if short:
        log.warning(
            "the training corpus has %d tokens, less than one block of %d: training on one short block",
            n_tokens,
            settings.train.block_size,
        )
    fingerprint = sha256_text(",".join(map(str, (t for b in blocks for t in b))))
    return Packed(blocks, n_tokens, settings.train.block_size, sources, fingerprint, short)
