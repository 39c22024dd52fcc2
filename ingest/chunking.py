"""Documents -> chunks sized in the embedder's own tokens, so no chunk is ever truncated.

llama-index's SentenceSplitter does the splitting with the embedder's tokenizer as its length
function. What the embedder sees is `metadata prefix + chunk text`; the prefix (title, and the
JSONL metadata when `ingest.metadata_in_text` is on) is budgeted inside the embedder's
max_seq_length, and every chunk is measured again after the prefix is added.
"""
from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field

from kinject.ingest.readers import Document

# Metadata worth embedding, in this order, and its label; other scalar fields follow, titled.
METADATA_LABELS = {
    "published_at": "Published",
    "date": "Date",
    "publisher": "Publisher",
    "author": "Author",
    "category": "Category",
}
NOT_EMBEDDED = {"source", "url", "link", "split"}  # provenance, not content
# HF fast tokenizers change state on each call and fail when two threads share one (two KBs
# ingesting in one process share the embedder's counting tokenizer).
_TOKENIZER_LOCK = threading.Lock()
CHUNKER_VERSION = 2  # bump when chunk boundaries or embedded text change


@dataclass
class Chunk:
    chunk_id: str
    doc_id: str
    title: str
    text: str  # the passage as shown to readers and to the LLM
    embed_text: str  # what the embedder sees: metadata prefix + text
    page: int | None = None
    metadata: dict = field(default_factory=dict)


def metadata_line(doc: Document, with_metadata: bool) -> str:
    """'Title: ... | Published: 2023-11-24 | Publisher: The Verge' (the title only, unless with_metadata)."""
    parts = [f"Title: {doc.title}"] if doc.title else []
    if with_metadata:
        meta = {k: v for k, v in doc.metadata.items() if not k.startswith("_") and k not in NOT_EMBEDDED}
        ordered = [k for k in METADATA_LABELS if k in meta] + sorted(k for k in meta if k not in METADATA_LABELS)
        for key in ordered:
            value = meta[key]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                continue
            value = str(value).strip()
            if not value or len(value) > 120:
                continue
            if key in ("published_at", "date") and len(value) >= 10 and value[4] == "-":
                value = value[:10]  # the day is what questions ask about, not the second
            parts.append(f"{METADATA_LABELS.get(key, key.replace('_', ' ').capitalize())}: {value}")
    return " | ".join(parts)


class Chunker:
    """Splits documents for one embedder tokenizer and sequence limit."""

    def __init__(self, tokenizer, max_seq_length: int, chunk_size: int, chunk_overlap: int, metadata_in_text: bool):
        self.tokenizer = tokenizer
        self.special = tokenizer.num_special_tokens_to_add(pair=False)
        self.limit = max_seq_length - self.special  # tokens of embedded text the model reads
        self.chunk_size = min(chunk_size, self.limit)
        self.chunk_overlap = chunk_overlap
        self.metadata_in_text = metadata_in_text

    def token_ids(self, text: str) -> list[int]:
        with _TOKENIZER_LOCK:
            return self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    def count(self, text: str) -> int:
        return len(self.token_ids(text))

    def _prefix(self, doc: Document) -> str:
        prefix = metadata_line(doc, self.metadata_in_text)
        # A prefix may use at most half of the budget; an absurdly long title is cut.
        while prefix and self.count(prefix) > self.chunk_size // 2:
            prefix = prefix[: int(len(prefix) * 0.8)].rstrip()
        return prefix

    def chunk(self, doc: Document) -> list[Chunk]:
        from llama_index.core.node_parser import SentenceSplitter

        prefix = self._prefix(doc)
        joiner = "\n\n" if prefix else ""
        budget = self.chunk_size - (self.count(prefix + joiner) if prefix else 0)
        overlap = min(self.chunk_overlap, budget // 4)
        # Even out the chunks of a document a little over the budget, so it does not end in a
        # few-word tail chunk that matches on its title alone.
        total = self.count(doc.text)
        if total > budget:
            n = math.ceil((total - overlap) / (budget - overlap))
            budget = min(budget, math.ceil((total - overlap) / n * 1.15) + overlap)
        splitter = SentenceSplitter(chunk_size=budget, chunk_overlap=overlap, tokenizer=self.token_ids)
        pieces: list[str] = []
        for piece in splitter.split_text(doc.text):
            pieces.extend(self._fit(piece, prefix + joiner))
        page_starts = doc.metadata.get("_page_starts")
        public = {k: v for k, v in doc.metadata.items() if not k.startswith("_")}
        chunks, cursor = [], 0
        for i, piece in enumerate(pieces):
            page = None
            if page_starts:
                at = doc.text.find(piece[:64], cursor)
                if at >= 0:
                    cursor = at
                page = bisect.bisect_right(page_starts, cursor)  # 1-based page number
            chunks.append(
                Chunk(
                    chunk_id=f"{doc.doc_id}#{i}",
                    doc_id=doc.doc_id,
                    title=doc.title,
                    text=piece,
                    embed_text=prefix + joiner + piece,
                    page=page,
                    metadata=public,
                )
            )
        return chunks

    def _fit(self, piece: str, prefix: str) -> list[str]:
        """Cut a piece that, with its prefix, is longer than the model reads, at token boundaries."""
        if self.count(prefix + piece) <= self.limit:
            return [piece]
        with _TOKENIZER_LOCK:
            enc = self.tokenizer(piece, add_special_tokens=False, truncation=False, verbose=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        room = max(1, self.limit - self.count(prefix) - 2)
        out, start = [], 0
        while start < len(offsets):
            end = min(start + room, len(offsets))
            text = piece[offsets[start][0] : offsets[end - 1][1]].strip()
            if text:
                out.append(text)
            start = end
        return out
