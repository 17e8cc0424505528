"""bitsandbytes' AdamW8bit on FSDP2's row shards.

bitsandbytes' update kernel takes plain tensors and refuses DTensors ("got mixed torch.Tensor and
DTensor", bitsandbytes 0.50.2 with torch 2.13), so the optimizer steps plain Parameters that alias
each sharded param's local tensor (same storage: an update is the shard's update) and gets the
local shard of each DTensor grad just before its step. Each local shard is its own stepped tensor,
so its blockwise state (backends/state8bit.py) covers exactly that shard: a parameter's fragment
is the whole state, from offset 0.
"""

from __future__ import annotations

import torch

from relora_dist.backends.state8bit import STATE8_KEYS


def _local(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return t.to_local() if hasattr(t, "to_local") else t


class LocalShardOptimizer:
    """AdamW8bit over plain Parameters aliasing the local shards of `param_groups`' DTensors. Looks
    like a torch optimizer to the trainer (param_groups for the LR, step, zero_grad, state)."""

    def __init__(self, param_groups: list[dict]):
        from relora_dist.quant import bnb

        self.sharded: list[torch.nn.Parameter] = []  # the DTensor params, in group order
        self.local: dict[int, torch.nn.Parameter] = {}  # id(DTensor param) -> aliasing Parameter
        groups = []
        for g in param_groups:
            params = []
            for p in g["params"]:
                q = torch.nn.Parameter(_local(p), requires_grad=True)  # aliases the shard's storage
                self.sharded.append(p)
                self.local[id(p)] = q
                params.append(q)
            groups.append({**g, "params": params})
        self.inner = bnb().optim.AdamW8bit(groups)

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def state_of(self, p) -> dict | None:
        """bitsandbytes' state of DTensor param `p` (None before its first step)."""
        state = self.inner.state.get(self.local[id(p)])
        return state if state and "state1" in state else None

    def step(self) -> None:
        for p in self.sharded:
            self.local[id(p)].grad = None if p.grad is None else _local(p.grad)
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.sharded:
            p.grad = None
            self.local[id(p)].grad = None

    def init_state(self, step: int) -> None:
        """The lazily-built state (zero moments) of every param, with the saved step count."""
        for gindex, group in enumerate(self.inner.param_groups):
            for pindex, q in enumerate(group["params"]):
                self.inner.init_state(group, q, gindex, pindex)
                self.inner.state[q]["step"] = int(step)

    def raw_state(self) -> dict[str, torch.Tensor]:
        """Codes and block scales of every param's state, by param index (the live tensors)."""
        out = {}
        for i, p in enumerate(self.sharded):
            state = self.state_of(p) or {}
            for key in STATE8_KEYS:
                if key in state:
                    out[f"optimizer8/{i}/{key}"] = state[key]
        return out
