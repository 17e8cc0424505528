"""bitsandbytes' AdamW8bit on FSDP2's row shards, and its OptimizerState.

bitsandbytes' update kernel takes plain tensors and refuses DTensors ("got mixed torch.Tensor and
DTensor", bitsandbytes 0.50.2 with torch 2.13), so the optimizer steps plain Parameters that alias
each sharded param's local tensor (same storage: an update is the shard's update) and gets the
local shard of each DTensor grad just before its step. Each local shard is its own stepped tensor,
so its blockwise state (backends/state8bit.py) covers exactly that shard: a parameter's fragment
is the whole state, from offset 0.
"""

from __future__ import annotations

import torch

from relora_dist.backends.base import copy_if_same_layout
from relora_dist.backends.fsdp2_state import FSDP2AdamW, local_tensor
from relora_dist.backends.state8bit import STATE8_KEYS, dequantize_fragment, mask_fragment, quantize_into


class LocalShardOptimizer:
    """AdamW8bit over plain Parameters aliasing the local shards of `param_groups`' DTensors. Looks
    like a torch optimizer to the trainer (param_groups for the LR, step, zero_grad, state)."""

    def __init__(self, param_groups: list[dict]):
        from relora_dist.relora.quant import bnb

        self.sharded: list[torch.nn.Parameter] = []  # the DTensor params, in group order
        self.local: dict[int, torch.nn.Parameter] = {}  # id(DTensor param) -> aliasing Parameter
        groups = []
        for g in param_groups:
            params = []
            for p in g["params"]:
                q = torch.nn.Parameter(local_tensor(p), requires_grad=True)  # aliases the shard's storage
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
            self.local[id(p)].grad = None if p.grad is None else local_tensor(p.grad)
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


class FSDP2AdamW8bit(FSDP2AdamW):
    """AdamW8bit over the row shards (LocalShardOptimizer): each shard's blockwise state is the
    parameter's whole fragment, from offset 0; read dequantized, written by quantizing the shard."""

    def build(self, param_groups):
        return LocalShardOptimizer(param_groups)

    def params(self, engine):
        return list(engine.optimizer.sharded)  # its groups hold the aliases of the local shards

    def state_fragment(self, p, key):
        state = self.optimizer.state_of(p) if self.optimizer is not None else None
        return None if state is None else dequantize_fragment(state, 0, local_tensor(p).numel(), key)

    def mask_local_state(self, p, key, keep):  # pruned codes set to the map's exact 0
        mask_fragment(self.optimizer.state_of(p), 0, local_tensor(p).numel(), key, keep)

    def write_state(self, p, key, full_value):  # the shard is its own stepped tensor: quantize it
        start, end = self.shards.local_range(p)
        quantize_into(self.optimizer.state_of(p), key, full_value.reshape(-1)[start:end].float())

    def adam_step(self, engine):
        found = [engine.optimizer.state_of(p) for p in self.params(engine)]
        return next((int(s["step"]) for s in found if s is not None), None)

    def init(self, engine, step):
        engine.optimizer.init_state(step)

    def exact_local_state(self, engine):
        # as under ZeRO-2: requantizing dequantized moments need not give back the same bytes
        return engine.optimizer.raw_state()

    def load_exact_local_state(self, engine, tensors):
        return copy_if_same_layout(engine.optimizer.raw_state(), tensors)
