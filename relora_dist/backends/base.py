"""The backend contract: the only place that knows how parameters are sharded.

The ReLoRA steps in `relora_dist/relora_steps.py` are written once against this contract; ZeRO-2 and
ZeRO-3 and FSDP2 implement it. Shards are described as a contiguous range of the
row-major flattened parameter, which is exactly how ZeRO-3 partitions (`ds_tensor`) and how the
checkpoint format will slice tensors.
"""

from __future__ import annotations

import contextlib
import gc
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist


def rank_slice(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """ZeRO-3's partition of a flattened tensor: ceil(numel/world) elements per rank, tail padded."""
    per_rank = -(-numel // world_size)
    start = min(rank * per_rank, numel)
    return start, min(start + per_rank, numel)


class Backend(ABC):
    """Build/tear down engines and read/write sharded params and optimizer state."""

    name: str
    """The engine as the checkpoint manifest and logs name it (zero2, zero3, fsdp2)."""

    fp32_params: bool = False
    """Whether the sharded params stay fp32 whatever the compute dtype (FSDP2's mixed precision
    casts at each all-gather): they are then their own merge masters, none are kept beside them."""

    def __init__(self, ds_config: dict, rank: int, world_size: int, optimizer_name: str = "adamw"):
        self.ds_config = ds_config
        self.optimizer_name = optimizer_name
        self.rank = rank
        self.world_size = world_size

    # --- engines --------------------------------------------------------------------------------
    @abstractmethod
    def build_engine(self, model: torch.nn.Module, param_groups: list[dict]) -> Any:
        """Wrap `model` with an engine whose optimizer holds exactly `param_groups`."""

    @abstractmethod
    def teardown_engine(self, engine: Any) -> None:
        """Free the engine, its optimizer state and every hook it left on the module."""

    def relora_phase_backend(self, cfg) -> "Backend":
        """The backend that builds the ReLoRA phase's engine (another ZeRO stage with
        relora.phase_stage=3); itself by default."""
        return self

    def describe(self) -> dict:
        """What the checkpoint manifest records about the engine that wrote it."""
        return {"backend": self.name}

    def inner_optimizer(self, engine: Any) -> torch.optim.Optimizer:
        """The torch optimizer that owns the state (its type and state tensors, for tests)."""
        return engine.optimizer

    @abstractmethod
    def optimizer_params(self, engine: Any) -> list[torch.nn.Parameter]:
        """The module params the engine's optimizer updates (its view of the param groups)."""

    @abstractmethod
    def optimizer_state_numel(self, engine: Any) -> int:
        """Elements of optimizer master state this rank holds (per Adam key, i.e. the fp32 masters)."""

    # --- instrumentation (tools/bench.py) ----------------------------------------------------------
    HELD_CATEGORIES = ("params", "grads", "fp32_master", "optimizer_state", "comm_buffers", "gathered_params",
                       "other")
    """What `held_tensors` sorts tensors into; the first four are the training state."""

    def held_tensors(self, engine: Any, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, str]]:
        """(name, tensor, category) of every tensor the engine and the module hold on this rank,
        category one of HELD_CATEGORIES. A storage may come under several names (a view, a param
        and its optimizer's reference); the caller counts each storage once. Engines expose
        `forward`, `backward` and `step` so that a caller can tag the collectives of each."""
        raise NotImplementedError(f"{self.name} does not list its tensors")

    def collective_bindings(self) -> list[tuple[Any, str, str]]:
        """(owner, attribute, torch.distributed op it runs) of collectives the engine bound at
        start-up outside torch.distributed, so that wrapping torch.distributed misses them."""
        return []

    def gathered_params(self, params: list[torch.nn.Parameter]):
        """A context in which the module copies of `params` are whole, for a forward outside the
        engine (collective where they are sharded). Replicated engines: nothing to do."""
        return contextlib.nullcontext()

    def gathered_update(self, p: torch.nn.Parameter, fn: Callable[[torch.Tensor], None]) -> None:
        """Gather the whole module copy of p, let rank 0 modify it in place (`fn(full)`) and
        re-shard it from rank 0: the gather-based merge the shard-local one is compared with
        (tools/bench.py). Only ZeRO-3 has one."""
        raise NotImplementedError(f"{self.name} has no gathered update")

    # --- one training step ------------------------------------------------------------------------
    @abstractmethod
    def set_lr(self, engine: Any, lr: float) -> None:
        """Set the learning rate of every param group."""

    @abstractmethod
    def set_train(self, engine: Any, train: bool) -> None:
        """Train or eval mode of the wrapped module (dropout)."""

    @abstractmethod
    def forward_loss(self, engine: Any, batch: torch.Tensor) -> torch.Tensor:
        """The causal-LM loss of one micro-batch (labels = inputs)."""

    @abstractmethod
    def train_step(self, engine: Any, micro_batches: list[torch.Tensor],
                   before_update: Callable[[], None] | None = None) -> tuple[list[torch.Tensor], float | None]:
        """One optimizer step: forward + backward over the micro-batches (gradient accumulation),
        clipping and the update, all inside. Returns the detached loss of each micro-batch and the
        global grad norm (the same on every rank; None when the engine skipped the step).
        `before_update()` runs after the last backward, before the update."""

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

    # --- shards of params -------------------------------------------------------------------------
    @abstractmethod
    def local_range(self, p: torch.nn.Parameter) -> tuple[int, int]:
        """The [start, end) range of flatten(p) that this rank holds and writes."""

    @abstractmethod
    def local_view(self, p: torch.nn.Parameter) -> torch.Tensor:
        """1-D view of this rank's shard of the module copy of p (the tensor the forward uses)."""

    @abstractmethod
    def full_fp32(self, p: torch.nn.Parameter) -> torch.Tensor:
        """Full fp32 master of a trainable param, without autograd history (collective: every rank
        must call)."""

    @abstractmethod
    def fp32_master_slice(self, p: torch.nn.Parameter) -> torch.Tensor:
        """A copy of the `master_range(p)` slice of the optimizer's fp32 master of a trainable param,
        without autograd history (collective: every rank must call)."""

    @abstractmethod
    def write_owned_slice(self, p: torch.nn.Parameter, values: torch.Tensor) -> Callable[[], int]:
        """Set the `master_range(p)` slice of the module copy of a param no optimizer holds, from
        this rank's `values` (any dtype/device; cast to the compute dtype, read before returning),
        and start making the module copy whole again where it is replicated (collective). Returns
        `finish()`, which completes the write and returns the bytes this rank received; callers may
        compute in between (the next merge overlaps this one's all-gather)."""

    @abstractmethod
    def write_trainable(self, p: torch.nn.Parameter, full_value: torch.Tensor) -> None:
        """Set a trainable param in the module copy AND the optimizer's fp32 master."""

    @abstractmethod
    def full_optimizer_state(self, p: torch.nn.Parameter, key: str) -> torch.Tensor | None:
        """Full fp32 optimizer state `key` of p (collective), None before the first step."""

    @abstractmethod
    def local_state(self, p: torch.nn.Parameter, key: str) -> tuple[int, torch.Tensor] | None:
        """(flat start, 1-D fragment) of this rank's part of optimizer state `key` of p, the fragment
        empty where the rank holds none of p; None while the optimizer has no state yet. No
        communication."""

    @abstractmethod
    def mask_local_state(self, p: torch.nn.Parameter, key: str, keep: torch.Tensor) -> None:
        """Multiply this rank's fragment of optimizer state `key` (as local_state returns it) by the
        same-length bool mask `keep`. No communication."""

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

    comm_device = torch.device("cpu")
    """Where collectives take their tensors (NCCL: the accelerator)."""

    @abstractmethod
    def gather_full(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The whole module copy of p in fp32 (collective). For evaluation, tests and export."""

    @abstractmethod
    def full_grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """The whole gradient of a trainable param after backward, before the step (collective)."""

    # --- checkpoint fragments (no communication) --------------------------------------------------
    @abstractmethod
    def fp32_fragment(self, p: torch.nn.Parameter) -> tuple[int, int, torch.Tensor | None]:
        """(start, end, view) of the part of a trainable param's fp32 master this rank owns."""

    @abstractmethod
    def state_fragment(self, p: torch.nn.Parameter, key: str) -> torch.Tensor | None:
        """View of this rank's fragment of optimizer state `key` (same range as fp32_fragment)."""

    @abstractmethod
    def optimizer_flats(self, engine: Any) -> list[torch.Tensor]:
        """The flat fp32 partitions the inner torch optimizer steps (its state keys)."""

    @abstractmethod
    def write_frozen(self, p: torch.nn.Parameter, full_value: torch.Tensor) -> None:
        """Set the module copy of a param that no optimizer holds (every rank passes the full value)."""

    @abstractmethod
    def write_optimizer_state(self, p: torch.nn.Parameter, key: str, full_value: torch.Tensor) -> None:
        """Set this rank's shard of optimizer state `key` from the full value."""

    def master_range(self, p: torch.nn.Parameter) -> tuple[int, int]:
        """The flat range of a frozen weight whose fp32 merge master this rank keeps and merges
        into: the range it writes into checkpoints. Under ZeRO-2 the module copy is replicated but
        the master is not: each rank owns `rank_slice`, so masters and merge work are 1/world."""
        return self.save_range(p)

    def owned_view(self, p: torch.nn.Parameter) -> torch.Tensor:
        """1-D view of the `master_range(p)` slice of the module copy."""
        start, end = self.master_range(p)
        lstart, _ = self.local_range(p)
        return self.local_view(p)[start - lstart:end - lstart]

    def save_range(self, p: torch.nn.Parameter) -> tuple[int, int]:
        """The flat range of a module copy this rank writes into a checkpoint: its own shard, or
        for replicated tensors its `rank_slice`, so each element is written exactly once."""
        start, end = self.local_range(p)
        numel = self.numel(p)
        if end - start == numel and self.world_size > 1:
            return rank_slice(numel, self.rank, self.world_size)
        return start, end

    @abstractmethod
    def adam_step(self, engine: Any) -> int | None:
        """Adam's step counter (shared by every flat group), None before the first step."""

    @abstractmethod
    def init_optimizer_state(self, engine: Any, step: int) -> None:
        """Create Adam's lazily-built state (zero moments, the saved step counter) so that resume
        can overwrite the moments."""

    def finish_optimizer_state_writes(self) -> None:
        """Complete a series of write_optimizer_state calls (8-bit state is quantized per flat
        partition once all its parameters are written)."""

    def link_optimizer_fragments(self, engine: Any) -> None:
        """Make per-param views of the optimizer state valid (ZeRO-2 needs it; see there)."""

    def exact_local_state(self, engine: Any) -> dict[str, torch.Tensor]:
        """Optimizer state of this rank that the per-parameter fields cannot restore bit for bit
        (8-bit Adam's codes and block scales, whose blocks span parameters), by name. Saved beside
        them; read back only at the same world size, where the partition is the same."""
        return {}

    def load_exact_local_state(self, engine: Any, tensors: dict[str, torch.Tensor]) -> bool:
        """Overwrite this rank's optimizer state with `exact_local_state`'s tensors after the
        per-parameter writes; False (nothing changed) when they do not fit this partition."""
        return False

    # --- shared helpers ---------------------------------------------------------------------------
    def master_slice_of(self, p: torch.nn.Parameter, full_value: torch.Tensor) -> torch.Tensor:
        start, end = self.master_range(p)
        return full_value.reshape(-1)[start:end]

    def gather_owned(self, p: torch.nn.Parameter, owned: torch.Tensor) -> torch.Tensor:
        """Full flat tensor from every rank's `master_range(p)` slice (collective)."""
        return self.gather_flat_slices(owned, self.numel(p))

    def gather_flat_slices(self, local: torch.Tensor, numel: int) -> torch.Tensor:
        """Reassemble a flat tensor from every rank's `rank_slice` part (collective)."""
        out, work = self.gather_flat_slices_async(local, numel)
        if work is not None:
            work.wait()
        return out

    def gather_flat_slices_async(self, local: torch.Tensor, numel: int):
        """(tensor, work): gather_flat_slices started; the tensor is complete once `work.wait()`
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

    @staticmethod
    def release_memory() -> None:
        gc.collect()
        try:  # return freed arenas to the OS so RSS reflects the freed optimizer state
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # pragma: no cover - non-glibc platforms
            pass
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def copy_if_same_layout(targets: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> bool:
    """Copy `saved` into `targets` (live tensors, same names) when every name, shape and dtype
    matches; False (nothing copied) otherwise. For Backend.load_exact_local_state."""
    if not saved or set(targets) != set(saved) or any(
            targets[k].shape != saved[k].shape or targets[k].dtype != saved[k].dtype for k in targets):
        return False
    for k, t in targets.items():
        t.copy_(saved[k])
    return True
