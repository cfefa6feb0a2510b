"""Data-parallel training under torchrun (DistributedDataParallel), a no-op otherwise.

torchrun starts ``nproc_per_node`` copies of the training entry and sets RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT in each one's environment. Each rank holds
a full replica of the model; every optimizer step, DDP all-reduces (averages) the
gradients, so the replicas stay identical. Each rank draws the same epoch order (same
seed) and trains on its own slice of it, ``order[rank::world]``, padded so that every
rank takes the same number of steps (a rank with one step fewer would leave the others
waiting in the all-reduce forever). The per-rank batch is ``batch_size``; the global
batch is ``batch_size x world``.

Nothing here starts a process group: the entry point does (``init_from_env``), so the
trainer behaves exactly as before when it is not under torchrun.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from roadwork_assets.contracts.errors import BadInputError


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def backend() -> str:
    return str(dist.get_backend()) if active() else "none"


def init_from_env() -> torch.device | None:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl
    on CUDA, one GPU per local rank); returns the rank's CUDA device, or None on CPU.
    Outside torchrun (no WORLD_SIZE) it does nothing and returns None."""
    if "WORLD_SIZE" not in os.environ or active():
        return None
    if torch.cuda.is_available():
        local_rank, n_gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= n_gpus:  # else cuda:k fails deep inside set_device / nccl
            raise BadInputError(
                f"torchrun started local rank {local_rank} but this node has {n_gpus} "
                f"GPU(s): set trainer.nproc_per_node <= {n_gpus} (one rank per GPU), or "
                "hide the GPUs (CUDA_VISIBLE_DEVICES='') to train the ranks on CPU with gloo")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # torch.device("cuda") now means this rank's GPU
        dist.init_process_group(backend="nccl")
        return device
    dist.init_process_group(backend="gloo")
    return None


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` under DistributedDataParallel when a process group is up, else itself.
    Train through the wrapper; read and save the unwrapped ``model`` (no ``module.``
    prefix in its state dict)."""
    if not active():
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard(order: torch.Tensor) -> torch.Tensor:
    """This rank's slice of an epoch order, every rank the same length (the order is
    wrapped around to pad it, like torch's DistributedSampler)."""
    world = world_size()
    if world == 1:
        return order
    pad = (-len(order)) % world
    padded = torch.cat([order, order[:pad]]) if pad else order
    return padded[rank()::world]


def shard_len(n: int) -> int:
    """Rows one rank trains on per epoch when an epoch has ``n``."""
    return -(-n // world_size())
