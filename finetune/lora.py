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
    """The weights a checkpoint must hold to continue: the LoRA matrices, or the whole model.
    The whole model comes through torch.distributed.checkpoint, which gathers what FSDP shards
    over several processes onto rank 0 (there it is a collective: every rank calls it, rank 0
    alone gets the weights)."""
    if settings.train.full_finetune:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _without_shared(model, state)
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def _without_shared(model, state: dict) -> dict:
    """One name per parameter: safetensors refuses two names for one memory, as tied input and
    output embeddings are, and a gathered state holds both as copies. Loading the first name
    restores both (the tie is one parameter)."""
    first = {n for n, _ in model.named_parameters()}
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {k: v.detach().contiguous() for k, v in state.items() if k in first or k not in every}


def load_trainable_state(model, state: dict, settings: Settings) -> None:
    if settings.train.full_finetune:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Every rank passes the whole state; under FSDP each keeps its shard.
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise KinjectError(f"checkpoint does not match the LoRA layout: unexpected keys {unexpected[:3]}")
