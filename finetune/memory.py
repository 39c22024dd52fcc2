"""Training memory: an estimate of the peak, and a plan that fits it in the memory that is free.

The plan keeps the optimizer's batch (`train.batch_size` blocks) and chooses how to run it: in
micro-batches of `micro_batch` blocks whose gradients add up before the optimizer step, with or
without gradient checkpointing (each decoder layer keeps only its input and recomputes the rest
in the backward pass).

The estimate counts the tensors that dominate a decoder-only transformer's training step, in
bytes:

    peak = weights + optimizer + saved activations + max(loss peak, one layer's backward)

Each term is derived where it is computed. The counts follow what autograd keeps for a
Llama/Qwen-style block (RMSNorm, rotary attention through fused SDPA, SwiGLU MLP) with peft's
LoRA on every linear layer; tests/test_memory_plan.py holds them against the tensors autograd
saves for the bundled SmolLM2-135M. Anything not counted (kernel workspaces, the allocator's fragmentation, small
buffers) is what `HEADROOM` is for.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from kinject.core.errors import KinjectError

GiB = 2**30
# Share of the free memory the plan leaves unused: the CUDA caching allocator rounds and
# fragments blocks, cuBLAS and attention kernels take workspaces, and the estimate is a sum of
# the largest tensors, not of all of them.
HEADROOM = 0.10
# LoRA matrices are trained in float32 (peft upcasts adapters on a bf16/fp16 base), as are
# their gradients and AdamW's two moments.
ADAPTER_BYTES = 4
# The linear layers of one Llama/Qwen decoder block, by the names LoRA targets use.
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class MemoryPlanError(KinjectError):
    pass


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only transformer that its training memory depends on."""

    hidden: int
    layers: int
    vocab: int
    intermediate: int
    kv_dim: int  # key/value heads x head size (smaller than hidden with grouped-query attention)
    act_bytes: int  # bytes per activation value: 2 under bf16 (weights or autocast), 4 in float32

    @classmethod
    def of(cls, config, act_bytes: int) -> "Shape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            vocab=config.vocab_size,
            intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
            kv_dim=kv_heads * head_dim,
            act_bytes=act_bytes,
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in features, out features) of each linear layer of a block."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        shapes = ((h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h))
        return dict(zip(BLOCK_LINEARS, shapes))


@dataclass(frozen=True)
class Footprint:
    """What training holds whatever the batch: the stored weights and the trained values."""

    weight_bytes: int  # every parameter and buffer, adapter included
    trainable_params: int
    trainable_bytes: int  # bytes per trained value; its gradient and AdamW's moments share the dtype


def lora_params(shape: Shape, rank: int, targets: list[str] | str = "all-linear") -> int:
    """Parameters of a LoRA: an A (in x r) and a B (r x out) matrix per targeted linear layer."""
    chosen = shape.linears() if targets in ("all-linear", ["all-linear"]) else {
        name: io for name, io in shape.linears().items() if name in targets
    }
    return shape.layers * sum(rank * (n_in + n_out) for n_in, n_out in chosen.values())


def lora_footprint(shape: Shape, params: int, rank: int, targets: list[str] | str = "all-linear") -> Footprint:
    """The footprint of a LoRA run planned from a model's config alone (no weights loaded), its
    `params` weights stored in the activations' dtype."""
    adapter = lora_params(shape, rank, targets)
    return Footprint(params * shape.act_bytes + adapter * ADAPTER_BYTES, adapter, ADAPTER_BYTES)


def model_footprint(model) -> Footprint:
    """The exact footprint of a loaded (peft or plain) model."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trained = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trained)
    size = trained[0].element_size() if trained else ADAPTER_BYTES
    return Footprint(weights, n, size)


# ---- the estimate ------------------------------------------------------------------------------
def layer_bytes_per_token(shape: Shape) -> int:
    """What autograd keeps of one decoder layer, per token, when nothing is recomputed.

    a = act_bytes. LoRA: the A matrix of each linear fed by a hidden-sized input (q, k, v, o, gate,
    up) keeps that input. With bf16 activations peft casts it to the adapter's float32 and autocast
    casts it back, so each of the six keeps its own a*h copy; in float32 the copies are not made
    and q/k/v share one input, gate/up another (3*a*h). Attention: SDPA keeps q and its output
    (a*h each) and k and v at their grouped-query width (a*kv each). MLP: gate and up outputs,
    silu's output and the product fed to down_proj, a*i each. The two RMSNorms upcast to float32
    and keep that copy (4*h each). The B matrices' inputs (a*rank each) are left out: 7*rank
    values against tens of thousands.
    """
    h, kv, i, a = shape.hidden, shape.kv_dim, shape.intermediate, shape.act_bytes
    lora_inputs = 3 * h if a == ADAPTER_BYTES else 6 * h
    attention = 2 * h + 2 * kv
    mlp = 4 * i
    norms = 2 * 4 * h
    return a * (lora_inputs + attention + mlp) + norms


def loss_bytes_per_token(shape: Shape) -> int:
    """The output layer and cross-entropy, per position in the loss, at their peak.

    The bf16 logits (2 bytes per vocabulary entry) are upcast to float32 (4) before the loss, as
    `causal_lm_loss` and transformers both do, and log-softmax keeps its float32 output (4) for the
    backward: 10 bytes in the forward. The backward then holds that output, the incoming float32
    gradient and the outgoing one at once: 12 bytes, the larger of the two.
    """
    return 12 * shape.vocab


@dataclass(frozen=True)
class Estimate:
    weights: int
    optimizer: int  # gradients and AdamW's two moments of the trained values
    activations: int  # what the forward keeps for the backward
    transient: int  # the larger of the loss's peak and one layer's backward, on top of the rest

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.transient

    def parts(self) -> str:
        return (
            f"weights {gib(self.weights)}, optimizer {gib(self.optimizer)}, activations {gib(self.activations)}, "
            f"loss/backward peak {gib(self.transient)}"
        )


def estimate(shape: Shape, footprint: Footprint, micro_batch: int, block_size: int, checkpointing: bool) -> Estimate:
    """Peak training memory for one micro-batch of `micro_batch` blocks of `block_size` tokens."""
    tokens = micro_batch * block_size
    layer = tokens * layer_bytes_per_token(shape)
    # Gradients live through the backward; AdamW's moments exist from the first step on and so
    # are present during every later forward and backward.
    optimizer = footprint.trainable_params * footprint.trainable_bytes * 3
    # The final norm's float32 copy feeds the output layer in both modes.
    final_norm = tokens * 4 * shape.hidden
    if checkpointing:
        # Each layer keeps only its input; the backward recomputes one layer at a time, holding
        # that layer's activations and their gradients (about as large) at once.
        saved = shape.layers * tokens * shape.act_bytes * shape.hidden + final_norm
        backward = 2 * layer
    else:
        # Every layer keeps everything; the backward adds the gradients of one layer's activations.
        saved = shape.layers * layer + final_norm
        backward = layer
    # Every position counts toward the loss in the worst case (documents, `train.loss_on=all`).
    loss = tokens * loss_bytes_per_token(shape)
    return Estimate(footprint.weight_bytes, optimizer, saved, max(loss, backward))


# ---- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    micro_batch: int
    accumulation: int  # micro-batches per `batch_size` blocks
    checkpointing: bool
    estimate: Estimate
    available: int  # bytes training may use: free memory plus what the model already holds there
    device: str
    fits: bool = True  # False only when a micro-batch set by hand is run against the estimate

    def line(self) -> str:
        e = self.estimate
        over = "; over the usable memory, kept because train.micro_batch_size was set" if not self.fits else ""
        return (
            f"memory plan on {self.device}: estimate {gib(e.total)} GiB ({e.parts()}) of {gib(self.available)} GiB "
            f"available ({gib(usable(self.available))} usable); batch {self.micro_batch * self.accumulation} as "
            f"{self.accumulation} micro-batch{'es' if self.accumulation > 1 else ''} of {self.micro_batch}, "
            f"gradient checkpointing {'on' if self.checkpointing else 'off'}{over}"
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "estimate": {**asdict(self.estimate), "total": self.estimate.total}, "line": self.line()}


def gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def usable(available: int) -> int:
    return int(available * (1 - HEADROOM))


def plan(
    shape: Shape,
    footprint: Footprint,
    batch_size: int,
    block_size: int,
    available: int,
    checkpointing: Literal["auto"] | bool = "auto",
    micro_batch_size: int = 0,
    device: str = "cuda",
) -> Plan:
    """The largest micro-batch that divides `batch_size` and fits, checkpointing only where that
    size needs it to fit.

    Fewer, larger micro-batches come first, and at each size the plan tries without checkpointing
    before with it. Checkpointing frees nearly all activation memory at the price of one more
    forward pass per step (for a LoRA, whose backward skips the frozen weights' gradients, about
    half again the compute); splitting the batch only divides the activations, and each split
    runs its passes one after another on a smaller matrix. With long blocks the split can be the
    faster of the two: `checkpointing=False` (train.gradient_checkpointing=false) asks for it.
    `micro_batch_size` pins the size, which is then kept even where the estimate says it will not
    fit: the estimate can be wrong, and the setting is the way around it.
    """
    limit = usable(available)
    if micro_batch_size:
        if batch_size % micro_batch_size:
            raise MemoryPlanError(f"train.micro_batch_size {micro_batch_size} does not divide train.batch_size {batch_size}")
        sizes = [micro_batch_size]
    else:
        sizes = [m for m in range(batch_size, 0, -1) if batch_size % m == 0]
    modes = [False, True] if checkpointing == "auto" else [bool(checkpointing)]
    for m in sizes:
        for ckpt in modes:
            est = estimate(shape, footprint, m, block_size, ckpt)
            if est.total <= limit:
                return Plan(m, batch_size // m, ckpt, est, available, device)
    m, ckpt = sizes[-1], modes[-1]
    est = estimate(shape, footprint, m, block_size, ckpt)
    if micro_batch_size:
        return Plan(m, batch_size // m, ckpt, est, available, device, fits=False)
    if est.weights >= limit:
        advice = "the weights alone do not fit: train a smaller models.llm, or free memory on the device"
    else:
        advice = ("set train.gradient_checkpointing=auto, " if not ckpt else "") + (
            f"lower train.block_size (now {block_size}), train a smaller models.llm, or free memory on the device"
        )
    raise MemoryPlanError(
        f"training does not fit on {device}: even one block per micro-batch"
        f"{' with gradient checkpointing' if ckpt else ''} needs about {gib(est.total)} GiB ({est.parts()}), "
        f"and {gib(available)} GiB is available "
        f"({gib(limit)} GiB after keeping {HEADROOM:.0%} free): {advice}"
    )


# ---- the running process -----------------------------------------------------------------------
def available_ram() -> int:
    """MemAvailable: free RAM plus the caches the kernel would drop for us."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_for(model, device: str) -> int:
    """Bytes training may use on `device`: what is free there, plus what the model already holds
    (the estimate counts the weights itself)."""
    import torch

    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t.device.type == device.split(":")[0])
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # blocks cached by loading count as used in the driver's figure
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free + held
    return available_ram() + held


def plan_for(model, settings, device: str, bf16: bool, batch: int | None = None, shards: int = 1) -> Plan:
    """The plan for training `model` (already on `device`) with `settings.train`, under bf16
    autocast or not, on `batch` blocks per step (default `train.batch_size`; one process's share
    of the step when several train it). `shards` > 1: FSDP splits the weights, their gradients
    and AdamW's moments over that many processes, each holding its share (the layer being
    computed is gathered whole for a moment, which HEADROOM covers for a model of many layers)."""
    t = settings.train
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    weight_size = next(lm.parameters()).element_size()
    footprint = model_footprint(model)
    if bf16 and weight_size > 2:
        # Autocast multiplies with bf16 copies of float32 weights, and the backward keeps them.
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        footprint = replace(footprint, weight_bytes=footprint.weight_bytes + 2 * frozen)
    if shards > 1:
        footprint = replace(footprint, weight_bytes=-(-footprint.weight_bytes // shards), trainable_params=-(-footprint.trainable_params // shards))
    return plan(
        Shape.of(lm.config, 2 if bf16 else weight_size),
        footprint,
        batch or t.batch_size,
        t.block_size,
        available_for(model, device),
        t.gradient_checkpointing,
        t.micro_batch_size,
        device,
    )
