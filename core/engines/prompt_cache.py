"""The KV of recent prompts, kept so a prompt that opens like one seen before prefills only the
rest (vLLM's automatic prefix caching, for the continuous batcher).

On a 2-core CPU a rag prompt of ~800 tokens takes longer to prefill than its answer takes to
decode, and prefill is compute-bound: sixteen concurrent prompts cost sixteen times one however
they are batched. What repeats is reused instead: the same question asked again, the UI's compare
tab asking `rag` and `ft-rag` the same retrieved context (per adapter: a LoRA changes the keys and
values), a conversation's earlier turns.

Entries are per adapter name (the KV depends on the weights; reloading an adapter forgets its
entries) and evicted least recently used once their tensors pass `max_bytes`. Stored tensors are
never written to: a cache built from them copies them (DynamicLayer.update concatenates).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from kinject.core.engines.base import common_prefix_length

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, tokens, dim]


class PromptCache:
    def __init__(self, max_bytes: int, min_tokens: int = 16):
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens  # a shorter match costs more to look up and copy than it saves
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], tuple[Layers, int]] = OrderedDict()
        self._bytes = 0

    def longest(self, adapter: str, prompt: list[int]) -> tuple[int, Layers] | None:
        """The longest stored prefix of `prompt` for this adapter, as (its length, its layers cut
        to it); never the whole prompt, since its last token must run to give the next token's
        logits. None below min_tokens."""
        best, best_key = 0, None
        for key in self._entries:
            if key[0] == adapter:
                n = min(common_prefix_length(key[1], prompt), len(prompt) - 1)
                if n > best:
                    best, best_key = n, key
        if best < self.min_tokens:
            return None
        self._entries.move_to_end(best_key)
        layers, _ = self._entries[best_key]
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in layers]

    def add(self, adapter: str, prompt: list[int], layers: Layers) -> None:
        key = (adapter, tuple(prompt))
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if size > self.max_bytes:
            return
        self._drop(key)
        self._entries[key] = (layers, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def forget(self, adapter: str) -> None:
        for key in [k for k in self._entries if k[0] == adapter]:
            self._drop(key)

    def _drop(self, key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes
