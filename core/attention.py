"""The attention kernel causal LMs run with on CPU.

transformers' `sdpa` hands grouped-query attention to torch's kernel (`enable_gqa`) only when no
attention mask is given; with one (any left-padded batch) it first copies every key and value
head once per query head (`repeat_kv`). For SmolLM2 (9 query heads over 3 key/value heads) that
copy of the whole KV cache, in every layer at every decode step, cost more than the rest of the
step: a 42-row padded batch decoded at 81 tok/s, and at 142 tok/s with the mask passed to torch's
kernel alongside `enable_gqa`, with bit-identical logits. On CUDA, torch's masked GQA can fall
back to the math kernel, so there the stock `sdpa` stays.
"""
from __future__ import annotations

NAME = "kinject_sdpa"


def _sdpa_gqa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("position_bias") is not None or kwargs.get("cache") is not None or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    # transformers' rule for is_causal: a prefill without a mask (a decode step attends to all)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=getattr(module, "num_key_value_groups", 1) > 1,
    )
    return out.transpose(1, 2).contiguous(), None


def attention_for(device: str) -> str | None:
    """The `attn_implementation` to load a causal LM with on `device` (None: transformers' choice)."""
    if device.startswith("cuda"):
        return None
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, _sdpa_gqa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks sdpa gets, sliding windows included
    return NAME
