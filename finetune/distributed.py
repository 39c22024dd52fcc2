"""Training on several processes of this machine: torchrun starts them, torch.distributed joins them.

`train.nproc` > 1 makes `train.train` run `python -m torch.distributed.run --standalone
--nproc-per-node N -m kinject.finetune.worker ...`, and each of the N processes runs the same
stage. The loop gives each process an equal share of every step's blocks and wraps the model in
DistributedDataParallel (a LoRA) or shards it with FSDP (full fine-tuning); the gradients'
reduction makes the step the one a single process would take. Rank 0 alone takes the KB's lock
and writes checkpoints, the adapter and the report.

Here: the launch, the process group, FSDP's sharding, and the two collectives the stage itself
needs (rank 0's value on every rank, and a sum over ranks).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from kinject.core.errors import KinjectError
from kinject.core.settings import Settings

WORKER = "kinject.finetune.worker"


class DistributedTrainError(KinjectError):
    pass


def is_running() -> bool:
    """Whether this process is one of several joined in a process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_running() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_running() else 0


def is_main() -> bool:
    """The process that writes: checkpoints, the adapter, the report, the manifest."""
    return rank() == 0


def agree(value: Any) -> Any:
    """Rank 0's `value` (any picklable object), on every rank; `value` itself on one process."""
    if not is_running():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(value: float, device: str) -> float:
    """The sum of every rank's `value` (`value` on one process). `device` is where the backend
    reduces: NCCL reduces CUDA tensors only."""
    if not is_running():
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()


def shard(root, model) -> None:
    """FSDP (PyTorch's `fully_shard`) over the process group, for full fine-tuning: each decoder
    layer is one unit whose weights, gradients and AdamW moments are split over the processes and
    gathered whole only for that layer's forward and backward; `root` (the module whose forward
    computes the loss from `model`) holds the rest (embeddings, final norm, output layer)."""
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(model.get_decoder(), "layers", None) or []:
        fully_shard(layer)
    fully_shard(root)


def backend_for(device: str, nproc: int) -> str:
    """gloo on CPU; NCCL on CUDA, which needs a GPU per process."""
    if not device.startswith("cuda"):
        return "gloo"
    import torch

    gpus = torch.cuda.device_count()
    if gpus < nproc:
        raise DistributedTrainError(
            f"train.nproc {nproc} on CUDA needs a GPU per process (NCCL), and {gpus} {'is' if gpus == 1 else 'are'} "
            f"visible: set train.nproc to at most {gpus}, or engine.device=cpu to train on processes sharing the CPU"
        )
    return "nccl"


@contextmanager
def process_group(device: str) -> Iterator[None]:
    """Join the process group torchrun set up (its RANK, WORLD_SIZE, MASTER_ADDR... variables);
    on CUDA each process uses the GPU of its local rank."""
    import torch
    import torch.distributed as dist

    if "LOCAL_RANK" not in os.environ:
        raise DistributedTrainError(f"{WORKER} runs under torchrun: use `kinject train --nproc N`")
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = backend_for(device, int(os.environ["LOCAL_WORLD_SIZE"]))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # "cuda" in this process means this GPU from here on
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def settings_payload(settings: Settings) -> str:
    """The effective settings as JSON for the worker processes, secrets left out (training uses
    none; the workers read them from the environment, as this process did)."""
    from pydantic import SecretStr

    def plain(node: dict) -> dict:
        return {k: plain(v) if isinstance(v, dict) else v for k, v in node.items() if not isinstance(v, SecretStr)}

    return json.dumps(plain(settings.model_dump()), default=str)


def torchrun_command(kb_name: str, settings: Settings, *, force: bool, merge: bool, progress: bool) -> list[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(settings.train.nproc),
        "-m", WORKER, "--kb", kb_name, "--settings", settings_payload(settings),
    ]  # fmt: skip
    return cmd + ["--force"] * force + ["--merge"] * merge + ["--quiet"] * (not progress)


def launch(kb_name: str, settings: Settings, *, force: bool, merge: bool, progress: bool) -> int:
    """Run the workers under torchrun and return its exit status (0 when every process finished).

    When one process dies, torchrun stops the others and exits non-zero. On Ctrl-C the whole
    foreground process group gets SIGINT: torchrun stops its workers, and this process waits
    for it rather than leave them behind.
    """
    env = dict(os.environ)
    # Processes share the cores: torch would start one thread per core in each of them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // settings.train.nproc)))
    proc = subprocess.Popen(torchrun_command(kb_name, settings, force=force, merge=merge, progress=progress), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        raise
