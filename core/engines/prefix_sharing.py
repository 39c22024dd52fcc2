"""Prompts of one batch that begin alike are prefilled once (`engine.prefix_sharing`).

augment asks for seven kinds of text about each document with prompts that put the document
first, so seven rows of a batch open with the same few hundred tokens; on CPU their prefill was a
quarter of the batch's time. Here a group's common prefix runs through the model once, its KV
cache is copied to each member, and `generate` prefills only what follows. A row's layout is
`[pad][shared prefix][pad][own suffix]` with the attention mask zero on the pads: `generate`
takes position ids from the mask, so each token keeps the position it has in the plain prompt.
"""
from __future__ import annotations

from kinject.core.engines.base import common_prefix_length

MIN_SHARED = 64  # tokens; below this a shared prefix saves less than building the cache costs


def prefix_groups(prompts: list[list[int]], min_shared: int = MIN_SHARED) -> list[tuple[list[int], int]]:
    """Rows grouped by a common prefix: (row indexes, prefix length). Every row is in one group;
    a group of one, or one whose prefix is under `min_shared`, has length 0. A prefix always
    leaves each member at least one token of its own, for `generate` to start from."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    groups: list[tuple[list[int], int]] = []
    for i in order:
        if groups:
            rows, shared = groups[-1]
            common = min(common_prefix_length(prompts[rows[-1]], prompts[i]), len(prompts[i]) - 1, *(len(prompts[r]) - 1 for r in rows))
            # a row joins only without shortening the group's prefix: sorted order puts the
            # rows that share most next to each other
            if common >= min_shared and (len(rows) == 1 or common >= shared):
                groups[-1] = (rows + [i], common if len(rows) == 1 else shared)
                continue
        groups.append(([i], 0))
    return [(rows, shared if len(rows) > 1 else 0) for rows, shared in groups]


def shared_prefix_inputs(model, prompts: list[list[int]], pad_id: int, max_new_tokens: int, min_shared: int = MIN_SHARED) -> dict | None:
    """`generate` inputs for `prompts` with each group's prefix already in `past_key_values`, or
    None when no two rows share `min_shared` tokens (or the model has sliding-window layers).

    The batch's cache is a StaticCache sized for the whole generation: a DynamicCache copies all
    of itself to append each token, which for a long batch (augment's 42 rows of ~400 prompt and
    256 new tokens) cost more than the attention over the unfilled slots that a static one adds."""
    import torch
    from transformers import DynamicCache, StaticCache
    from transformers.cache_utils import StaticLayer

    groups = [(rows, n) for rows, n in prefix_groups(prompts, min_shared) if n]
    if not groups:
        return None
    shared = [0] * len(prompts)
    for rows, n in groups:
        for r in rows:
            shared[r] = n
    width = max(shared)
    tail = max(len(p) - n for p, n in zip(prompts, shared))
    cache = StaticCache(config=model.config, max_cache_len=width + tail + max_new_tokens)
    if not all(type(layer) is StaticLayer for layer in cache.layers):
        return None  # sliding-window layers keep more state than keys and values
    device = model.device
    prefixes = []  # per group: its rows and, per layer, the prefix's (keys, values)
    for rows, n in groups:
        ids = torch.tensor([prompts[rows[0]][:n]], device=device)
        out = model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
        prefixes.append((rows, [(layer.keys, layer.values) for layer in out.past_key_values.layers]))
    ids, mask = [], []
    for p, n in zip(prompts, shared):
        own = len(p) - n
        ids.append([pad_id] * (width - n) + p[:n] + [pad_id] * (tail - own) + p[n:])
        mask.append([0] * (width - n) + [1] * n + [0] * (tail - own) + [1] * own)
    for index, (k0, v0) in enumerate(prefixes[0][1]):
        # each row's prefix right-aligned in the first `width` slots; zeros where the mask is 0
        keys = k0.new_zeros(len(prompts), k0.shape[1], width, k0.shape[3])
        values = v0.new_zeros(len(prompts), v0.shape[1], width, v0.shape[3])
        for rows, layers in prefixes:
            k, v = layers[index]
            keys[rows, :, width - k.shape[2] :] = k
            values[rows, :, width - v.shape[2] :] = v
        cache.update(keys, values, index)
    return {
        "input_ids": torch.tensor(ids, device=device),
        "attention_mask": torch.tensor(mask, device=device),
        "past_key_values": cache,
    }
