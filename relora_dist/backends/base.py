"""The engine contract, in faces: `Backend` (this file: an engine's lifecycle and its training
step), `Shards` (backends/shards.py: where each rank's piece of a parameter is, and the
collectives over those pieces), `OptimizerState` (backends/optimizer_state.py: the optimizer's
state of one engine x optimizer, chosen once at build) and `Probe` (backends/probe.py: what only
the benchmark and the tests read; the trainer and the ReLoRA steps may not use it).

The ReLoRA steps in `relora_dist/relora/steps.py` are written once against these faces; ZeRO-2,
ZeRO-3 and FSDP2 implement them. Shards are described as a contiguous range of the row-major
flattened parameter, which is exactly how ZeRO-3 partitions and how the checkpoint format slices
tensors.
"""

from __future__ import annotations

import gc
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from relora_dist.backends.optimizer_state import OptimizerState
from relora_dist.backends.shards import Shards


class Backend(ABC):
    """Build and tear down engines, and run one training step on them. `shards` and
    `optimizer_state` (the other two faces of the contract) are set by each engine's constructor,
    as are `rank` and `world_size`."""

    name: str
    """The engine as the checkpoint manifest and logs name it (zero2, zero3, fsdp2)."""

    shards: Shards
    """Where this rank's piece of each parameter is, and the collectives over those pieces."""

    optimizer_state: OptimizerState
    """The optimizer's state (fp32 masters' moments) of the engines this backend builds."""

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

    # --- one training step ------------------------------------------------------------------------
    def set_lr(self, engine: Any, lr: float) -> None:
        """Set the learning rate of every param group (both kinds of engine expose the optimizer's)."""
        for group in engine.optimizer.param_groups:
            group["lr"] = lr

    def set_train(self, engine: Any, train: bool) -> None:
        """Train or eval mode of the wrapped module (dropout)."""
        engine.train(train)

    def forward_loss(self, engine: Any, batch: torch.Tensor) -> torch.Tensor:
        """The causal-LM loss of one micro-batch (labels = inputs)."""
        return engine(input_ids=batch, labels=batch, use_cache=False).loss

    @abstractmethod
    def train_step(self, engine: Any, micro_batches: list[torch.Tensor],
                   before_update: Callable[[], None] | None = None) -> tuple[list[torch.Tensor], float | None]:
        """One optimizer step: forward + backward over the micro-batches (gradient accumulation),
        clipping and the update, all inside. Returns the detached loss of each micro-batch and the
        global grad norm (the same on every rank; None when the engine skipped the step).
        `before_update()` runs after the last backward, before the update."""


def release_memory() -> None:
    """Collect garbage and hand freed memory back (after an engine or a set of weights is freed)."""
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
    matches; False (nothing copied) otherwise. For OptimizerState.load_exact_local_state."""
    if not saved or set(targets) != set(saved) or any(
            targets[k].shape != saved[k].shape or targets[k].dtype != saved[k].dtype for k in targets):
        return False
    for k, t in targets.items():
        t.copy_(saved[k])
    return True
