"""The continuous batcher's KV bookkeeping, on plain tensors: the running batch's growing layer
(rows joining, decode steps, rows leaving) holds exactly what concatenating would, and the prompt
cache finds the longest kept prefix per adapter within its byte budget."""
from __future__ import annotations

import torch

from kinject.core.engines.continuous_batch import GrowingLayer
from kinject.core.engines.prompt_cache import PromptCache

HEADS, DIM = 2, 4


def kv(rows: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, HEADS, tokens, DIM, generator=torch.Generator().manual_seed(seed))


def left_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    width = max(r.shape[2] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, 0, width - r.shape[2], 0)) for r in rows])


def test_the_growing_layer_holds_what_concatenation_would():
    keys, values = [kv(1, 5, 0)], [kv(1, 5, 50)]
    layer = GrowingLayer(keys[0], values[0])

    def holds(k: list[torch.Tensor], v: list[torch.Tensor]) -> bool:
        return torch.equal(layer.keys, left_padded(k)) and torch.equal(layer.values, left_padded(v))

    for seed, tokens in ((1, 9), (2, 3), (3, 200)):  # shorter, longer than the batch, past its spare room
        k, v = kv(1, tokens, seed), kv(1, tokens, 50 + seed)
        layer.add_row(k, v)
        keys, values = keys + [k], values + [v]
        assert holds(keys, values)
    keys, values = list(left_padded(keys).split(1)), list(left_padded(values).split(1))
    for step in range(70):  # decode steps, past the spare room on the right
        k, v = kv(len(keys), 1, 100 + step), kv(len(keys), 1, 200 + step)
        layer.update(k, v)
        keys = [torch.cat([r, n[None]], dim=2) for r, n in zip(keys, k)]
        values = [torch.cat([r, n[None]], dim=2) for r, n in zip(values, v)]
        assert holds(keys, values)
    assert layer.get_seq_length() == keys[0].shape[2]
    # Rows 0 and 2 leave: row 3 takes row 0's place; the columns only they needed are cut.
    layer.keep([3, 1], cut=3)
    keys, values = [keys[i][:, :, 3:] for i in (3, 1)], [values[i][:, :, 3:] for i in (3, 1)]
    assert holds(keys, values)
    k, v = kv(1, 2, 9), kv(1, 2, 10)
    layer.add_row(k, v)
    assert holds(keys + [k], values + [v])


def test_the_prompt_cache_gives_the_longest_prefix_of_the_same_adapter_and_never_the_whole_prompt():
    cache = PromptCache(max_bytes=10**9, min_tokens=4)
    prompt = list(range(40))
    layers = [(kv(1, 40, 0), kv(1, 40, 1))]
    cache.add("a", prompt, layers)
    cache.add("a", prompt[:10] + [99] * 30, [(kv(1, 40, 2), kv(1, 40, 3))])
    n, kept = cache.longest("a", prompt)
    assert n == 39 and torch.equal(kept[0][0], layers[0][0][:, :, :39])  # the last token must still run
    assert cache.longest("a", prompt[:20] + [7, 7])[0] == 20
    assert cache.longest("b", prompt) is None  # another adapter's keys and values differ
    assert cache.longest("a", [1, 2, 3]) is None  # shorter than min_tokens
    cache.forget("a")
    assert cache.longest("a", prompt) is None and cache.bytes == 0


def test_the_prompt_cache_drops_the_least_recently_used_past_its_budget():
    one = 2 * kv(1, 40, 0).numel() * 4  # keys and values of one 40-token prompt
    cache = PromptCache(max_bytes=2 * one, min_tokens=4)
    prompts = [[p] * 40 for p in range(3)]
    for p in prompts[:2]:
        cache.add("a", p, [(kv(1, 40, 0), kv(1, 40, 1))])
    assert cache.longest("a", prompts[0]) is not None  # used: the other is now the oldest
    cache.add("a", prompts[2], [(kv(1, 40, 0), kv(1, 40, 1))])
    assert len(cache) == 2 and cache.bytes == 2 * one
    assert cache.longest("a", prompts[1]) is None and cache.longest("a", prompts[0]) is not None
    cache.add("a", list(range(200)), [(kv(1, 200, 0), kv(1, 200, 1))])  # larger than the budget: not kept
    assert len(cache) == 2
