"""The token-budget planner: which (document, type, sample index) to generate next.

The budget is in tokens and spread over documents x types: each cell's share is its type's
weight (documents weigh the same). The plan is made chunk by chunk: the next chunk takes the
cells furthest below their share, counting the samples already pending in the chunk at the
type's mean length so far, and it is sized to what the remaining budget still needs. Generation
stops once the generated tokens reach the budget, so the overshoot is at most one chunk.

Every step depends only on the samples recorded before it, and a sample's seed only on its key,
so replaying the plan over the samples already stored reproduces the same chunks: that is how a
run resumes, and why the same settings on the same engine give the same samples.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from kinject.core.files import sha256_text


@dataclass(frozen=True)
class PlannedSample:
    doc_id: str
    type: str
    sample_index: int
    seed: int

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.doc_id, self.type, self.sample_index)


def sample_seed(base_seed: int, doc_id: str, type_id: str, index: int) -> int:
    """A seed per sample that depends only on its key, so it survives any re-planning."""
    return int(sha256_text(f"{base_seed}:{doc_id}:{type_id}:{index}")[:8], 16) & 0x7FFFFFFF


def spread_order(doc_ids: list[str], types: list[str]) -> dict[tuple[str, str], int]:
    """Tie-break order of the cells: the i-th is (document i mod D, type (i + i // L) mod T), with
    L = lcm(D, T). The first T cells use every type, the first D every document, and all D x T
    cells come once; a budget too small for every cell still covers as many of both as it can."""
    n_docs, n_types = len(doc_ids), len(types)
    lcm = n_docs * n_types // math.gcd(n_docs, n_types)
    cells = [(doc_ids[i % n_docs], types[(i + i // lcm) % n_types]) for i in range(n_docs * n_types)]
    return {c: pos for pos, c in enumerate(cells)}


class Planner:
    def __init__(
        self,
        doc_ids: list[str],
        weights: dict[str, float],
        budget: int,
        chunk_size: int,
        first_guess_tokens: int,
        seed: int = 0,
    ):
        """weights: type -> weight > 0 (types with weight 0 are left out by the caller);
        first_guess_tokens: expected tokens per sample before any was measured (max_new_tokens)."""
        if budget <= 0:
            raise ValueError("budget must be positive")
        self.doc_ids, self.types = list(doc_ids), list(weights)
        total = sum(weights.values())
        self.share = {t: w / total / len(self.doc_ids) for t, w in weights.items()}
        self.budget, self.chunk_size, self.seed = budget, chunk_size, seed
        self.first_guess = first_guess_tokens
        self.cell_tokens = {(d, t): 0 for d in self.doc_ids for t in self.types}
        self.position = spread_order(self.doc_ids, self.types)
        self.cell_count = dict.fromkeys(self.cell_tokens, 0)
        self.type_tokens = dict.fromkeys(self.types, 0)
        self.type_count = dict.fromkeys(self.types, 0)
        self.total = 0

    @property
    def done(self) -> bool:
        return self.total >= self.budget

    def expected_tokens(self, type_id: str | None = None) -> float:
        if type_id is not None and self.type_count[type_id]:
            return self.type_tokens[type_id] / self.type_count[type_id]
        n = sum(self.type_count.values())
        return self.total / n if n else float(self.first_guess)

    def next_chunk(self) -> list[PlannedSample]:
        """The next samples to generate; empty once the budget is met."""
        if self.done:
            return []
        need = math.ceil((self.budget - self.total) / max(self.expected_tokens(), 1.0))
        size = max(1, min(self.chunk_size, need))
        expected = {t: self.expected_tokens(t) for t in self.types}
        # A heap of (how full the cell is relative to its share, position in the spread order).
        heap = [(self.cell_tokens[c] / self.share[c[1]], self.position[c], c) for c in self.cell_tokens]
        heapq.heapify(heap)
        pending: dict[tuple[str, str], int] = {}
        chunk = []
        for _ in range(size):
            _, pos, cell = heapq.heappop(heap)
            index = self.cell_count[cell] + pending.get(cell, 0)
            pending[cell] = pending.get(cell, 0) + 1
            chunk.append(PlannedSample(cell[0], cell[1], index, sample_seed(self.seed, cell[0], cell[1], index)))
            fill = (self.cell_tokens[cell] + pending[cell] * expected[cell[1]]) / self.share[cell[1]]
            heapq.heappush(heap, (fill, pos, cell))
        return chunk

    def record(self, sample: PlannedSample, tokens: int) -> None:
        """Count a generated sample (call in chunk order, once per sample of the chunk)."""
        cell = (sample.doc_id, sample.type)
        self.cell_tokens[cell] += tokens
        self.cell_count[cell] = max(self.cell_count[cell], sample.sample_index + 1)
        self.type_tokens[sample.type] += tokens
        self.type_count[sample.type] += 1
        self.total += tokens
