"""The training loop: AdamW, warmup + cosine/linear decay, gradient accumulation, bf16 autocast
(on CUDA, and on CPUs that multiply bf16 natively), checkpoints every `train.save_every` steps, and resume from the newest checkpoint.

With several processes (`train.nproc`, started by torchrun: distributed.py) each trains an equal
share of every step's blocks, and the gradients are averaged over the processes before the
optimizer step, which makes it the step a single process takes on all of them. A LoRA trains
under DistributedDataParallel (every process holds the whole model; the adapter's gradients are
all-reduced); full fine-tuning under FSDP (`fully_shard`: each process holds a share of the
weights, their gradients and AdamW's moments). Only rank 0 writes checkpoints.

Before the first step, `memory.plan_for` chooses how each optimizer step runs in the free memory:
in micro-batches whose gradients add up to the whole batch's, with gradient checkpointing if that
is needed to fit. Either way a step computes the same mean loss over the same blocks.

A checkpoint is one folder written through `atomic_dir`, so a kill or a full disk at any moment
leaves the previous checkpoint whole. Step s always trains on the same blocks (see
`data.stream_indices`), so a resumed run continues exactly where the killed one stopped.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kinject.core.errors import KinjectError
from kinject.core.files import atomic_dir
from kinject.core.models import pick_device
from kinject.core.settings import Settings
from kinject.finetune import distributed
from kinject.finetune.data import Packed, stream_indices
from kinject.finetune.lora import load_trainable_state, trainable_state
from kinject.finetune.memory import plan_for

STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"

OnStep = Callable[[int, float], None]  # (step just finished, its loss)


class CheckpointError(KinjectError):
    pass


@dataclass
class LoopResult:
    steps: int
    total_steps: int
    tokens_seen: int  # over the whole run, resumed parts included
    curve: list[list[float]] = field(default_factory=list)  # [step, loss] per optimizer step
    train_seconds: float = 0.0  # this process only
    tokens_this_run: int = 0
    resumed_from: int | None = None
    memory_plan: dict = field(default_factory=dict)  # memory.Plan.as_dict() of this process
    processes: int = 1
    full_weights: dict | None = None  # under FSDP, on rank 0: the trained model's whole state dict


def total_steps(n_blocks: float, settings: Settings) -> int:
    """Steps for `train.epochs` passes over `n_blocks` blocks an epoch (or `train.max_steps`)."""
    t = settings.train
    if t.max_steps:
        return t.max_steps
    # Rounded first: a float epoch count times a block count must not gain a step from a last bit.
    return max(1, math.ceil(round(t.epochs * n_blocks / (t.batch_size * t.grad_accum), 6)))


def make_scheduler(optimizer, settings: Settings, steps: int):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    warmup = round(settings.train.warmup_ratio * steps)
    make = get_cosine_schedule_with_warmup if settings.train.schedule == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, num_warmup_steps=warmup, num_training_steps=steps)


# ---- checkpoints ---------------------------------------------------------------------------
def checkpoint_dirs(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first (atomic_dir's half-written temp folders start with '.')."""
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).exists())


def clear_partial(root: Path) -> None:
    """Remove temp folders a killed writer left behind."""
    if root.exists():
        for p in root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)


def write_weights(folder: Path, state: dict) -> None:
    from safetensors.torch import save_file

    save_file(state, str(folder / WEIGHTS_FILE))


def optimizer_state(model, optimizer, settings: Settings) -> dict:
    """AdamW's state as a checkpoint keeps it. For full fine-tuning, keyed by parameter name and
    whole, through torch.distributed.checkpoint (under FSDP a collective gathering the shards onto
    rank 0), so one checkpoint resumes on any number of processes; a LoRA's, as AdamW keeps it."""
    if not settings.train.full_finetune:
        return {"optimizer": optimizer.state_dict()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return {"optimizer_by_name": get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))}


def write_optimizer(folder: Path, optimizer: dict, scheduler) -> None:
    torch.save({**optimizer, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}, folder / OPTIMIZER_FILE)


def save_checkpoint(root: Path, weights: dict, optimizer: dict, scheduler, state: dict) -> Path:
    """Write `weights` (trainable_state) and `optimizer` (optimizer_state) as the checkpoint of
    state["step"], then delete the older ones."""
    target = root / f"step-{state['step']:07d}"
    try:
        with atomic_dir(target) as tmp:
            write_weights(tmp, weights)
            write_optimizer(tmp, optimizer, scheduler)
            (tmp / STATE_FILE).write_text(json.dumps(state))  # last: marks the folder complete
    except OSError as e:
        kept = checkpoint_dirs(root)
        where = f"the checkpoint at {kept[-1].name} is kept" if kept else "no earlier checkpoint exists"
        raise CheckpointError(
            f"could not write the checkpoint for step {state['step']} ({e.strerror or e}); {where}: "
            "free disk space and run `kinject train` again to resume"
        ) from e
    for old in checkpoint_dirs(root):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(folder: Path, model, optimizer, scheduler, settings: Settings) -> dict:
    from safetensors.torch import load_file

    state = json.loads((folder / STATE_FILE).read_text())
    load_trainable_state(model, load_file(str(folder / WEIGHTS_FILE)), settings)
    saved = torch.load(folder / OPTIMIZER_FILE, weights_only=False)
    if "optimizer_by_name" in saved:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved["optimizer_by_name"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    return state


def find_resumable(root: Path, run_key: str) -> Path | None:
    """The newest checkpoint of this exact run (same data, settings and base model), if any."""
    for folder in reversed(checkpoint_dirs(root)):
        try:
            if json.loads((folder / STATE_FILE).read_text()).get("run_key") == run_key:
                return folder
        except (OSError, json.JSONDecodeError):
            continue
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere torch emulates
    it, which is slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(setting: str, device: str) -> bool:
    """bf16 autocast: always on CUDA; on CPU where it is native (about twice float32's speed
    for the matrix products here), unless `train.bf16` says otherwise."""
    if setting != "auto":
        return setting == "on"
    return device.startswith("cuda") or cpu_has_bf16()


def set_checkpointing(model, on: bool) -> None:
    """Gradient checkpointing through transformers: each decoder layer keeps only its input and
    reruns its forward in the backward pass. Non-reentrant checkpointing passes gradients on to
    the LoRA weights although the layers' first input, the frozen embedding's output, needs none."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_disable()
        lm.disable_input_require_grads()  # the hook transformers adds on enabling (for the reentrant kind)


# ---- the loss ------------------------------------------------------------------------------
def causal_lm_loss(model, ids, mask=None):
    """Mean next-token loss over the tokens `mask` marks (all when None). With a mask, only the
    marked positions go through the output layer: with answer-only loss most positions are
    prompt, and the vocabulary projection is a large share of a small model's compute."""
    import torch.nn.functional as F

    # use_cache=False: a training pass has no use for the keys and values a cache would keep.
    if mask is None:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(lm.config, "final_logit_softcapping", None):
        labels = ids.masked_fill(~mask, -100)
        return model(input_ids=ids, labels=labels, use_cache=False).loss
    hidden = lm.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    keep = mask[:, 1:]  # position t predicts token t + 1
    if not keep.any():
        return hidden.sum() * 0.0
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), ids[:, 1:][keep])


def loss_tokens(packed: Packed, rows: list[int]) -> int:
    """Positions `causal_lm_loss` averages over in these blocks: every token after the first, or
    the masked ones among them."""
    if packed.masks is None:
        return sum(len(packed.blocks[i]) - 1 for i in rows)
    return sum(sum(packed.masks[i][1:]) for i in rows)


# ---- the loop ------------------------------------------------------------------------------
class TrainingLoss(torch.nn.Module):
    """`causal_lm_loss` of the model as a module's forward. DistributedDataParallel reduces the
    gradients of a backward that follows its own forward call, and the loss goes past the
    model's forward (it calls the decoder and the output layer apart)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids, mask=None):
        return causal_lm_loss(self.model, ids, mask)


def run(
    model,
    packed: Packed,
    settings: Settings,
    checkpoints: Path,
    run_key: str,
    progress: bool = True,
    on_step: OnStep | None = None,
) -> LoopResult:
    from tqdm.auto import tqdm

    t = settings.train
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    per_step = t.batch_size * t.grad_accum
    if per_step % world:
        raise KinjectError(f"{world} processes cannot share the {per_step} blocks of a step equally: set train.nproc to a divisor of {per_step}")
    per_rank = per_step // world
    device = pick_device(settings.engine.device)
    model.to(device)
    model.train()
    bf16 = use_bf16(settings.train.bf16, device)
    # Planned before a resume loads AdamW's moments, which the estimate counts itself.
    sharded = world > 1 and t.full_finetune  # FSDP; a LoRA is small enough for every process to hold
    plan = plan_for(model, settings, device, bf16, batch=per_rank if world > 1 else None, shards=world if sharded else 1)
    memory_plan = plan.as_dict()
    if world > 1:
        memory_plan["line"] += f"; in each of {world} processes" + (", FSDP sharding the weights, gradients and AdamW state" if sharded else "")
    if main:
        print(memory_plan["line"], file=sys.stderr, flush=True)
    if plan.checkpointing:
        set_checkpointing(model, True)
    torch.manual_seed(settings.seed)
    steps = total_steps(packed.blocks_per_epoch, settings)
    loss_of = TrainingLoss(model)
    if sharded:
        distributed.shard(loss_of, model)  # before the optimizer: it must hold the shards
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=0.0)
    scheduler = make_scheduler(optimizer, settings, steps)

    if main:
        clear_partial(checkpoints)
    start, curve, tokens_seen, resumed = 0, [], 0, None
    # Every rank resumes from the checkpoint rank 0 found (it alone writes them).
    found = distributed.agree(find_resumable(checkpoints, run_key) if main else None)
    if found is not None:
        state = load_checkpoint(found, model, optimizer, scheduler, settings)
        start, curve, tokens_seen, resumed = state["step"], state["curve"], state["tokens_seen"], state["step"]

    if world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        # Only the LoRA weights train, so only their gradients are reduced. Buffers (rotary
        # frequencies) never change: no broadcast of them before each forward.
        loss_of = DistributedDataParallel(loss_of, forward_sync_buffers=False)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
    bar = tqdm(total=steps, initial=start, disable=not (progress and main), desc="train", unit="step", dynamic_ncols=True)
    t0, run_tokens = time.perf_counter(), 0
    for step in range(start, steps):
        idx = stream_indices(len(packed), settings.seed, step * per_step, per_step)
        mine = idx[rank * per_rank : (rank + 1) * per_rank]
        # The step's loss is the mean over all its blocks' loss tokens, as one pass over them would
        # give: each micro-batch's mean counts by its share of those tokens.
        parts = [mine[i : i + plan.micro_batch] for i in range(0, per_rank, plan.micro_batch)]
        counts = [loss_tokens(packed, part) for part in parts]
        total = loss_tokens(packed, idx) or 1
        rank_loss = 0.0
        for j, (part, n) in enumerate(zip(parts, counts)):
            ids = torch.tensor([packed.blocks[i] for i in part], device=device)
            mask = torch.tensor([packed.masks[i] for i in part], device=device) if packed.masks is not None else None
            # The ranks' gradients are reduced once a step, in the backward of its last micro-batch.
            last = j == len(parts) - 1
            if sharded:
                loss_of.set_requires_gradient_sync(last)
            with nullcontext() if world == 1 or sharded or last else loss_of.no_sync():
                with autocast:
                    loss = loss_of(ids, mask)
                share = n / total
                # DDP and FSDP average the ranks' gradients: scaled by `world`, the average is their sum.
                (loss * share * world).backward()
            rank_loss += loss.item() * share
        step_loss = distributed.sum_over_ranks(rank_loss, device)
        step_tokens = sum(len(packed.blocks[i]) for i in idx)
        run_tokens += step_tokens
        tokens_seen += step_tokens
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        curve.append([done, round(step_loss, 5)])
        elapsed = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{run_tokens / max(elapsed, 1e-9):.0f}")
        if done % t.save_every == 0 and done < steps and (main or sharded):
            # Rank 0 writes; under FSDP every rank takes part in gathering what it writes.
            weights, adam = trainable_state(model, settings), optimizer_state(model, optimizer, settings)
            if main:
                state = {"step": done, "curve": curve, "tokens_seen": tokens_seen, "run_key": run_key}
                save_checkpoint(checkpoints, weights, adam, scheduler, state)
        if on_step is not None:
            on_step(done, step_loss)
    bar.close()
    if plan.checkpointing:
        set_checkpointing(model, False)
    model.eval()
    # The trained model whole on rank 0, to publish: under FSDP no process holds it otherwise.
    final = trainable_state(model, settings) if sharded else None
    return LoopResult(
        steps=steps,
        total_steps=steps,
        tokens_seen=tokens_seen,
        curve=curve,
        train_seconds=round(time.perf_counter() - t0, 3),
        tokens_this_run=run_tokens,
        resumed_from=resumed,
        memory_plan=memory_plan,
        processes=world,
        full_weights=final,
    )
