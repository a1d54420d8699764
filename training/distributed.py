"""Data-parallel training under ``torchrun``: one process per CPU share or GPU, DDP in between.

``torchrun`` starts the processes and tells each who it is through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``). Without
that environment every helper here is a no-op and training is the plain single process.

The semantics, the same on one machine or several:
- ``--batch-size`` is the *global* batch: each rank takes ``batch_size / world_size`` items a
  step (it must divide evenly), DDP averages the gradients, so a step, the steps per epoch and
  the learning-rate schedule are the single-process ones. Nothing is rescaled behind your back.
- Every rank starts from the same seed (DDP also broadcasts rank 0's weights at wrap time); the
  training split is sharded by a seeded ``DistributedSampler`` reshuffled each epoch.
- Every rank evaluates the whole validation set, and the figures are averaged across ranks, so
  early stopping decides the same on every rank (a rank that stopped alone would hang the rest).
- Only rank 0 logs, draws the progress bar, writes curves and exports into the model store.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(ValueError):
    """A configuration that cannot run data-parallel; the message says what to change."""


def launched() -> bool:
    """True in a process that ``torchrun`` started (its rank variables are set)."""
    return all(name in os.environ for name in _ENV)


def active() -> bool:
    """True once the process group is up (after ``setup``)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def is_main() -> bool:
    """The process that logs and exports: rank 0, or the only process."""
    return rank() == 0


def device(requested: str) -> str:
    """A CUDA device is this rank's own GPU (``cuda:LOCAL_RANK``); anything else is unchanged."""
    if launched() and requested.startswith("cuda"):
        return f"cuda:{local_rank()}"
    return requested


def threads_per_rank(requested: int) -> int:
    """``requested`` torch threads, capped at this machine's cores shared by its local ranks:
    2 ranks on 2 cores get 1 thread each instead of fighting over 2 (oversubscription)."""
    if not launched():
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(requested, (cores or 1) // local_world_size()))


def setup(requested_device: str) -> None:
    """Join the process group torchrun describes: NCCL for GPUs, gloo for CPUs. No-op alone."""
    if not launched() or active():
        return
    if requested_device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DistributedError(f"--device {requested_device} but CUDA is not available")
        gpu = torch.device(device(requested_device))
        torch.cuda.set_device(gpu)
        dist.init_process_group(backend="nccl", device_id=gpu)
    else:
        dist.init_process_group(backend="gloo")


def cleanup() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def session(requested_device: str) -> Iterator[None]:
    """Set up on entry; on a normal exit wait for every rank (rank 0 may still be exporting)
    and leave the group. After an exception it leaves without waiting: the others may be inside
    a collective that will never complete, and torchrun stops them when this process fails."""
    setup(requested_device)
    try:
        yield
        barrier()
    finally:
        cleanup()


def per_rank_batch(batch_size: int) -> int:
    """This rank's share of the global batch."""
    n = world_size()
    if batch_size % n:
        raise DistributedError(f"--batch-size {batch_size} does not split evenly over {n} "
                               f"processes; use a multiple of {n}")
    return batch_size // n


def sampler(dataset: Dataset, seed: int) -> DistributedSampler | None:
    """This rank's shard of ``dataset``, reshuffled (seeded) by ``set_epoch``; None alone."""
    if not active():
        return None
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True,
                              seed=seed)


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel (gradients averaged across ranks); itself alone."""
    if not active():
        return model
    ids = [model_device(model)] if model_device(model).type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP broadcasts them
    before each training forward, but the last forward of an epoch updates them from each
    rank's own batch; without this the ranks would validate slightly different models."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_mean(*values: float) -> tuple[float, ...]:
    """The mean of each value across ranks (identical on every rank); the values alone."""
    if not active():
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return tuple((t / world_size()).tolist())
