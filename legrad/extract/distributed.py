"""This process's place in a ``torch.distributed`` job, or a single process: just what extract needs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch

from ..frontend.models import resolve_device

__all__ = ["Dist"]


class Dist:
    """Rank, world size and device of this process; integer all-reduces and a barrier.

    Create it with :meth:`start`; :meth:`close` destroys the process group only if :meth:`start` made it.

    Attributes:
        rank: this process's rank (0 alone).
        world: number of processes (1 alone).
        device: the resolved device string, ``cuda:LOCAL_RANK`` for CUDA under torchrun.
        owns_group: whether :meth:`start` initialised the process group.
    """

    def __init__(self, rank: int, world: int, device: str, owns_group: bool):
        self.rank, self.world, self.device, self.owns_group = rank, world, device, owns_group

    @classmethod
    def start(cls, device: str) -> Dist:
        """Joins the torchrun job described by the environment (``WORLD_SIZE``, ``LOCAL_RANK``), if any.

        An already initialised process group is used as it is. A new one uses NCCL on CUDA, else gloo.

        Raises:
            RuntimeError: if ``WORLD_SIZE`` > 1 but this PyTorch has no ``torch.distributed``.
            ValueError: for a device that does not exist.
        """
        import torch.distributed as dist

        env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        initialized = dist.is_available() and dist.is_initialized()
        if not initialized and env_world <= 1:
            return cls(0, 1, resolve_device(device), False)
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
        dev = (device or "auto").strip().lower()
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev == "cuda":
            dev = f"cuda:{local_rank}"
        dev = resolve_device(dev)
        if initialized:
            return cls(dist.get_rank(), dist.get_world_size(), dev, False)
        if dev.startswith("cuda"):
            torch.cuda.set_device(torch.device(dev))
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), dev, True)

    def _collective_device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device(self.device) if dist.get_backend() == "nccl" else torch.device("cpu")

    def reduce(self, values: Sequence[int], op: str = "sum") -> list[int]:
        """Element-wise sum (or max) of ``values`` over all ranks."""
        if self.world == 1:
            return [int(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return [int(v) for v in t.tolist()]

    def barrier(self) -> None:
        """Waits for every rank."""
        if self.world > 1:
            self.reduce([0])  # an all-reduce is a barrier that works the same on gloo and NCCL

    def close(self) -> None:
        """Destroys the process group if this object created it."""
        if self.owns_group:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
