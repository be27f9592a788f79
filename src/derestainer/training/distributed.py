"""Multi-process training helpers: ``torchrun`` environment, DistributedDataParallel, seeding.

One code path serves a laptop and a cluster. Launched plainly, :func:`init_distributed` returns a
single-process :class:`DistEnv`; launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) it joins the process group — NCCL when the rank
owns a CUDA device, Gloo on CPU — and every rank trains on its own shard of each epoch::

    torchrun --nproc_per_node 8 -m derestainer train --config paper --data /data/BCI
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 -m derestainer train ...

Only rank 0 logs, validates and writes checkpoints; the others wait at barriers. Every rank reads
the checkpoint when resuming, so a multi-node run folder must be on a shared filesystem.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from derestainer.core.device import resolve_device


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job.

    Attributes:
        rank / world_size / local_rank: as set by ``torchrun`` (0 / 1 / 0 when launched plainly).
        device: the device this rank computes on.
        backend: ``nccl`` / ``gloo`` when a process group is initialised, else None.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on the rank that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Read the ``torchrun`` environment and, when ``WORLD_SIZE > 1``, initialise the process group.

    Args:
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; ``auto``/``cuda`` pick ``cuda:LOCAL_RANK``.
        backend: force a backend; default NCCL for CUDA devices, Gloo otherwise.
        timeout_s: collective timeout (validation on rank 0 makes the others wait at a barrier).
    """
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", rank)
    dev = resolve_device(device, local)
    if world <= 1:
        return DistEnv(0, 1, 0, dev, None)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dev.type == "mps":  # gloo has no MPS tensors: several processes on a Mac share the CPU
        dev = torch.device("cpu")
    be = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # device_id only for NCCL: older torch releases (the floor is 2.1) do not know the argument
        kwargs: dict[str, Any] = {"device_id": dev} if be == "nccl" else {}
        dist.init_process_group(backend=be, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistEnv(rank, world, local, dev, be)


def cleanup(env: DistEnv) -> None:
    """Leave the process group (safe to call twice or without one)."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.backend == "nccl":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean over ranks, in place (no-op on one process). Launches a collective; no host sync."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(env.world_size)
    return t


def all_reduce_max(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Maximum over ranks, in place (no-op on one process)."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj: object, env: DistEnv, src: int = 0) -> object:
    """Rank ``src``'s (small, plain-data) object on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=env.device if env.backend == "nccl" else None)
    return box[0]


def wrap_model(model: nn.Module, env: DistEnv, sync_bn: bool = True, find_unused: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` on several ranks; the model itself on one.

    ``sync_bn`` converts BatchNorm to SyncBatchNorm (batch statistics over all ranks), which only
    runs on CUDA; on CPU (Gloo) each rank normalises with its own batch, and rank 0's running
    statistics are broadcast at every forward (DDP's ``broadcast_buffers``).
    """
    if not env.distributed:
        return model
    if sync_bn and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); with ``deterministic``, ask torch for deterministic kernels.

    ``deterministic`` sets ``torch.use_deterministic_algorithms(True, warn_only=True)`` (some CUDA
    kernels, e.g. reflection-pad backward, have no deterministic version: they warn instead of
    failing), disables cuDNN autotuning and sets ``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS.
    Without it, cuDNN autotuning is enabled (faster convolutions for fixed input sizes).
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from several integers (e.g. ``(seed, epoch, index)``)."""
    state = np.random.SeedSequence([int(p) % (2**64) for p in parts]).generate_state(2, np.uint32)
    return ((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker seeding: Python and NumPy from the worker's torch seed (which the loader's
    seeded ``generator`` determines), so that no two workers share a stream."""
    s = torch.initial_seed() % (2**32)
    random.seed(s)
    np.random.seed(s)


def free_port() -> int:
    """A free TCP port on localhost (for ``MASTER_PORT`` in tests and single-node launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
