"""The optimizer's state of one engine x optimizer (a face of the engine contract, backends/base.py).

One small class per engine (ZeRO-2, ZeRO-3, FSDP2) and optimizer (AdamW, AdamW8bit), chosen once
when the backend is built (`for_optimizer`), so no method asks which optimizer runs. A class
`build`s the torch optimizer the engine steps, is `attach`ed to the engine's optimizer once the
engine exists, and reads and writes the moments of parameters by the flat ranges of
`Shards.fp32_fragment` (no communication) or whole (`gather_state`, collective).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
"""The per-parameter moments every optimizer state here reads and writes (AdamW's names)."""


def torch_optimizer(name: str, param_groups: list[dict], implementation: str = "foreach") -> torch.optim.Optimizer:
    """The torch optimizer named by optimizer.name for `param_groups` (every engine but 8-bit);
    AdamW steps by `implementation` (optimizer.implementation: fused or foreach)."""
    if name == "sgd":  # a baseline; config validation forbids Adam-moment resets with it
        return torch.optim.SGD(param_groups, momentum=0.9)
    return torch.optim.AdamW(param_groups, **{implementation: True})


def zero_adamw_state(like: torch.Tensor, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """AdamW's lazily-built state of one stepped tensor: zero moments and the saved step count,
    which a fused `optimizer` keeps on the tensor's device (as AdamW's own `_init_group` does)."""
    fused = optimizer is not None and any(g.get("fused") for g in optimizer.param_groups)
    return {"step": torch.tensor(float(step), device=like.device if fused else None),
            "exp_avg": torch.zeros_like(like, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(like, memory_format=torch.preserve_format)}


def require_adamw(optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.AdamW):
        raise TypeError(f"resuming optimizer state supports AdamW, not {type(optimizer).__name__}")


class OptimizerState(ABC):
    """Moments of the optimizer of the engine this backend built last. `shards` is the engine's
    Shards (ranges and collectives); `name` the optimizer (adamw, sgd: the plain classes)."""

    def __init__(self, shards, name: str = "adamw", implementation: str = "foreach"):
        self.shards = shards
        self.name = name
        self.implementation = implementation

    # --- build ------------------------------------------------------------------------------------
    def build(self, param_groups: list[dict]) -> Any:
        """The optimizer the engine steps over `param_groups`."""
        return torch_optimizer(self.name, param_groups, self.implementation)

    def attach(self, engine: Any) -> None:
        """Called once the engine that steps this optimizer exists."""

    def detach(self, engine: Any) -> None:
        """Called when that engine is torn down."""

    # --- the state --------------------------------------------------------------------------------
    @abstractmethod
    def params(self, engine: Any) -> list[torch.nn.Parameter]:
        """The module params the engine's optimizer updates (its view of the param groups)."""

    @abstractmethod
    def adam_step(self, engine: Any) -> int | None:
        """Adam's step counter (shared by every stepped tensor), None before the first step."""

    @abstractmethod
    def init(self, engine: Any, step: int) -> None:
        """Create Adam's lazily-built state (zero moments, the saved step counter) so that resume
        and the switch can overwrite the moments."""

    def link_fragments(self, engine: Any) -> None:
        """Make per-param views of the optimizer state valid (ZeRO-2 needs it; see there)."""

    @abstractmethod
    def state_fragment(self, p: torch.nn.Parameter, key: str) -> torch.Tensor | None:
        """This rank's fragment of state `key` of p (the range of Shards.fp32_fragment), None
        before the first step. No communication."""

    def local_state(self, p: torch.nn.Parameter, key: str) -> tuple[int, torch.Tensor] | None:
        """(flat start, 1-D fragment) of this rank's part of state `key` of p, the fragment
        empty where the rank holds none of p; None while the optimizer has no state yet. No
        communication."""
        frag = self.state_fragment(p, key)
        return None if frag is None else (self.shards.fp32_fragment(p)[0], frag)

    def mask_local_state(self, p: torch.nn.Parameter, key: str, keep: torch.Tensor) -> None:
        """Multiply this rank's fragment of state `key` (as local_state returns it) by the
        same-length bool mask `keep`. No communication."""
        _, frag = self.local_state(p, key)
        frag.mul_(keep.to(frag))  # a view into the optimizer's state: in place

    @abstractmethod
    def gather_state(self, p: torch.nn.Parameter, key: str) -> torch.Tensor | None:
        """Full fp32 state `key` of p (collective), None before the first step."""

    @abstractmethod
    def write_state(self, p: torch.nn.Parameter, key: str, full_value: torch.Tensor) -> None:
        """Set this rank's shard of state `key` from the full value."""

    def finish_writes(self) -> None:
        """Complete a series of write_state calls (8-bit state is quantized per stepped tensor
        once all its parameters are written)."""

    def exact_local_state(self, engine: Any) -> dict[str, torch.Tensor]:
        """State of this rank that the per-parameter fields cannot restore bit for bit (8-bit
        Adam's codes and block scales, whose blocks span parameters), by name. Saved beside them;
        read back only at the same world size, where the partition is the same."""
        return {}

    def load_exact_local_state(self, engine: Any, tensors: dict[str, torch.Tensor]) -> bool:
        """Overwrite this rank's state with `exact_local_state`'s tensors after the per-parameter
        writes; False (nothing changed) when they do not fit this partition."""
        return False
