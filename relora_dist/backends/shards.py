"""Where each rank's piece of a parameter is (a face of the engine contract, backends/base.py).

Every piece is a contiguous [start, end) range of the row-major flattened parameter. Two ranges
matter: `local_range`, what this rank's module copy holds (the whole tensor where it is replicated),
and `owned_range`, what this rank alone writes: into checkpoints, merges and its fp32 merge master.
Collectives are named `gather_*` (every rank's pieces made whole) and `all_reduce_*`; every rank
must call them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
import torch.distributed as dist


def rank_slice(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """ZeRO-3's partition of a flattened tensor: ceil(numel/world) elements per rank, tail padded."""
    per_rank = -(-numel // world_size)
    start = min(rank * per_rank, numel)
    return start, min(start + per_rank, numel)


class Shards(ABC):
    """The pieces of parameters on this rank, for one engine."""

    fp32_params: bool = False
    """Whether the sharded params stay fp32 whatever the compute dtype (FSDP2's mixed precision
    casts at each all-gather): they are then their own merge masters, none are kept beside them."""

    comm_device = torch.device("cpu")
    """Where collectives take their tensors (NCCL: the accelerator)."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size

    # --- shapes of (possibly sharded) params ------------------------------------------------------
    def numel(self, p: torch.nn.Parameter) -> int:
        """Elements of the whole param, however it is sharded."""
        return p.numel()

    def shape(self, p: torch.nn.Parameter) -> torch.Size:
        """Shape of the whole param, however it is sharded."""
        return p.shape

    def storage_dtype(self, p: torch.nn.Parameter) -> torch.dtype:
        """dtype of the tensor the forward computes with (the shard's, when sharded)."""
        return p.dtype

    # --- where the pieces are -----------------------------------------------------------------------
    @abstractmethod
    def local_range(self, p: torch.nn.Parameter) -> tuple[int, int]:
        """The [start, end) range of flatten(p) that this rank's module copy holds."""

    @abstractmethod
    def local_view(self, p: torch.nn.Parameter) -> torch.Tensor:
        """1-D view of this rank's shard of the module copy of p (the tensor the forward uses)."""

    def owned_range(self, p: torch.nn.Parameter) -> tuple[int, int]:
        """The flat range of p this rank alone writes: into checkpoints, merges and the fp32 merge
        master it keeps. Its own shard, or for a replicated tensor its `rank_slice`, so that each
        element is written exactly once and masters and merge work are 1/world under ZeRO-2."""
        start, end = self.local_range(p)
        numel = self.numel(p)
        if end - start == numel and self.world_size > 1:
            return rank_slice(numel, self.rank, self.world_size)
        return start, end

    def owned_view(self, p: torch.nn.Parameter) -> torch.Tensor:
        """1-D view of the `owned_range(p)` slice of the module copy."""
        start, end = self.owned_range(p)
        lstart, _ = self.local_range(p)
        return self.local_view(p)[start - lstart:end - lstart]

    def owned_slice(self, p: torch.nn.Parameter, full_value: torch.Tensor) -> torch.Tensor:
        """The `owned_range(p)` slice of a full value of p (a view)."""
        start, end = self.owned_range(p)
        return full_value.reshape(-1)[start:end]

    @abstractmethod
    def owned_fp32(self, p: torch.nn.Parameter) -> torch.Tensor:
        """A copy of the `owned_range(p)` slice of the optimizer's fp32 master of a trainable param,
        without autograd history (collective: every rank must call)."""

    @abstractmethod
    def fp32_fragment(self, p: torch.nn.Parameter) -> tuple[int, int, torch.Tensor | None]:
        """(start, end, view) of the part of a trainable param's fp32 master this rank owns (no
        communication; the optimizer state's fragments cover the same range)."""

    # --- writes -------------------------------------------------------------------------------------
    @abstractmethod
    def write_owned(self, p: torch.nn.Parameter, values: torch.Tensor) -> Callable[[], int]:
        """Set the `owned_range(p)` slice of the module copy of a param no optimizer holds, from
        this rank's `values` (any dtype/device; cast to the compute dtype, read before returning),
        and start making the module copy whole again where it is replicated (collective). Returns
        `finish()`, which completes the write and returns the bytes this rank received; callers may
        compute in between (the next merge overlaps this one's all-gather)."""

    @abstractmethod
    def write_trainable(self, p: torch.nn.Parameter, full_value: torch.Tensor) -> None:
        """Set a trainable param in the module copy AND the optimizer's fp32 master."""

    @abstractmethod
    def write_frozen(self, p: torch.nn.Parameter, full_value: torch.Tensor) -> None:
        """Set the module copy of a param that no optimizer holds (every rank passes the full value)."""

    # --- collectives --------------------------------------------------------------------------------
    @abstractmethod
    def gather_fp32(self, p: torch.nn.Parameter) -> torch.Tensor:
        """Full fp32 master of a trainable param, without autograd history (collective)."""

    @abstractmethod
    def gather_param(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The whole module copy of p in fp32 (collective). For evaluation, tests and export."""

    def gather_owned(self, p: torch.nn.Parameter, owned: torch.Tensor) -> torch.Tensor:
        """Full flat tensor from every rank's `owned_range(p)` slice (collective)."""
        return self.gather_slices(owned, self.numel(p))

    def gather_slices(self, local: torch.Tensor, numel: int) -> torch.Tensor:
        """Reassemble a flat tensor from every rank's `rank_slice` part (collective)."""
        out, work = self.gather_slices_async(local, numel)
        if work is not None:
            work.wait()
        return out

    def gather_slices_async(self, local: torch.Tensor, numel: int):
        """(tensor, work): gather_slices started; the tensor is complete once `work.wait()`
        returns (work is None when nothing was communicated)."""
        if self.world_size == 1:
            # No collective at world size 1: one gloo all-gather above torch's parallel grain makes
            # gloo's threads open OpenMP regions; libgomp then manages more threads than cores and
            # throttles its spinning: every later step ran 1.6x slower (measured, default run).
            return local.reshape(-1)[:numel].clone(), None
        per_rank = -(-numel // self.world_size)
        padded = torch.zeros(per_rank, dtype=local.dtype, device=local.device)
        padded[: local.numel()] = local.reshape(-1)
        out = torch.empty(per_rank * self.world_size, dtype=local.dtype, device=local.device)
        work = dist.all_gather(list(out.view(self.world_size, per_rank).unbind(0)), padded, async_op=True)
        return out[:numel], work

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise max over ranks of a small tensor (none at world size 1)."""
        if self.world_size == 1:
            return t
        out = t.to(self.comm_device)
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out.cpu()

    def all_reduce_sum_(self, t: torch.Tensor, dst: int | None = None) -> None:
        """In-place sum over ranks of a tensor on `comm_device` (none at world size 1); with `dst`
        only that rank receives the sum (a reduce: half the traffic of an all-reduce)."""
        if self.world_size == 1:
            return
        if dst is None:
            dist.all_reduce(t)
        else:
            dist.reduce(t, dst)
