"""The trainable model: a peft LoRA on the base model (or, optionally, the full model).

Adapters are kept loadable by vLLM: plain LoRA (no DoRA), no `modules_to_save`, and a rank from
vLLM's supported set (checked with the settings: train.lora_rank, core.settings.VLLM_LORA_RANKS).
"""
from __future__ import annotations

from kinject.core.errors import KinjectError
from kinject.core.models import lora_config
from kinject.core.settings import Settings


def trainable_model(model, settings: Settings):
    """Wrap the base model for training: LoRA by default, every weight with train.full_finetune."""
    if settings.train.full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(settings))


def trainable_state(model, settings: Settings) -> dict:
    """The weights a checkpoint must hold to continue: the LoRA matrices, or the whole model."""
    if settings.train.full_finetune:
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_trainable_state(model, state: dict, settings: Settings) -> None:
    if settings.train.full_finetune:
        model.load_state_dict(state, strict=False)
        return
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise KinjectError(f"checkpoint does not match the LoRA layout: unexpected keys {unexpected[:3]}")
