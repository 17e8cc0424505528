"""DeepSpeed ZeRO behind the backend contract: what ZeRO-2 (backends/zero2.py) and ZeRO-3
(backends/zero3.py) share.

Facts this relies on were checked on DeepSpeed 0.19.8 (CPU accelerator, gloo):
- ZeRO keeps an fp32 master of every trainable param and copies it back at each step, so a write
  to the module copy alone is undone: write both (module copy + `safe_set_*_fp32_param`).
- `safe_set_full_*` setters break on ZeRO-3 when numel % world != 0; the `safe_set_local_*` ones
  with a padded slice work, so ZeRO-3 writes are always shard-local.
- `engine.destroy()` leaves the engine reachable (module forward hooks, `_z3_optimizer`,
  `_hp_mapping` on params); `teardown_engine` removes those so the first engine is collected.

Each stage module holds its Backend, Shards, one OptimizerState per optimizer and its Probe.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from typing import Any

import torch

from relora_dist.runtime.dist import quiet_libraries

quiet_libraries()  # before DeepSpeed's first import

from deepspeed.utils import (  # noqa: E402
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
)

from relora_dist.backends import zero_fused  # noqa: E402
from relora_dist.backends.base import Backend, release_memory  # noqa: E402
from relora_dist.backends.optimizer_state import OptimizerState, require_adamw, zero_adamw_state  # noqa: E402
from relora_dist.backends.probe import Probe  # noqa: E402
from relora_dist.backends.shards import Shards  # noqa: E402


class ZeroBackend(Backend):
    """Engine lifecycle shared by both stages. `ds_config` is the resolved DeepSpeed JSON."""

    stage: int
    _shards: type
    _states: dict  # optimizer.name -> OptimizerState class

    def __init__(self, ds_config: dict, rank: int, world_size: int, optimizer_name: str = "adamw",
                 implementation: str = "foreach"):
        self._ds_config, self._optimizer_name, self._implementation = ds_config, optimizer_name, implementation
        self.rank, self.world_size = rank, world_size
        self.shards = self._shards(rank, world_size)
        state = self._states.get("adamw" if optimizer_name == "sgd" else optimizer_name)
        if state is None:
            # config validation says so first (validation.py); this guards a backend built directly
            raise ValueError(f"optimizer.name={optimizer_name} under {self.name}: use optimizer.name=adamw or "
                             f"ds_configs/zero2.json with relora.phase_stage=same")
        self.optimizer_state = state(self.shards, optimizer_name, implementation)

    def describe(self) -> dict:
        return {"backend": self.name, "zero_stage": self.stage}

    def train_step(self, engine, micro_batches, before_update=None):
        engine.train()
        losses = []
        for i, batch in enumerate(micro_batches):
            loss = engine(input_ids=batch, labels=batch, use_cache=False).loss
            engine.backward(loss)
            if before_update is not None and i == len(micro_batches) - 1:
                before_update()
            engine.step()  # DeepSpeed applies the update (and clipping) at the accumulation boundary
            losses.append(loss.detach())
            del loss
        grad_norm = engine.get_global_grad_norm()  # global: the same on every rank
        return losses, float(grad_norm) if grad_norm is not None else None

    def build_engine(self, model: torch.nn.Module, param_groups: list[dict]) -> Any:
        import deepspeed

        optimizer = self.optimizer_state.build(param_groups)
        from relora_dist.backends.ds_config import with_model_buckets

        trainable = sum(self.shards.numel(p) for p in model.parameters() if p.requires_grad)
        config = with_model_buckets(self._ds_config, trainable)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        zero_fused.fuse(engine.optimizer)
        self.optimizer_state.attach(engine)
        return engine

    def teardown_engine(self, engine: Any) -> None:
        module = engine.module
        engine.destroy()
        for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
            hook = getattr(engine, name, None)
            if hook is not None:
                hook.remove()
                setattr(engine, name, None)
        for sub in module.modules():
            # ZeRO-3 caches its backward autograd Functions on each module (parameter_offload.py:
            # created only `if "pre_bwd_fn" not in module.__dict__`), closing over the engine that
            # made them; left there, the next engine's backward is driven by this dead one (which
            # re-gathers every param: 2x traffic, found by tools/bench.py) and keeps it alive.
            for attr in ("pre_bwd_fn", "post_bwd_fn"):
                sub.__dict__.pop(attr, None)
        for p in module.parameters():
            for attr in ("_z3_optimizer", "_hp_mapping"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
            # Give every param its own storage again: views into the engine's flat buffers would
            # keep those whole buffers (and the dead copies of now-frozen weights) alive.
            self.shards.own_storage(p)
        engine.module = None
        engine.optimizer = None
        release_memory()


class ZeroShards(Shards):
    """What both stages share: DeepSpeed's whole-shape attributes and full-tensor getters."""

    @property
    def comm_device(self):
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())

    def own_storage(self, p: torch.nn.Parameter) -> None:
        """Give p's module copy its own storage (after teardown: no view into a dead flat buffer)."""
        p.data = p.data.clone()

    def numel(self, p):
        return int(getattr(p, "ds_numel", p.numel()))

    def shape(self, p):
        return getattr(p, "ds_shape", p.shape)

    def storage_dtype(self, p):
        return getattr(p, "ds_tensor", p).dtype

    # At world size 1 the fragments ARE the full tensors: read them without DeepSpeed's full-tensor
    # getters, whose all-reduce / all-gather would be a gloo collective (see gather_slices).
    def gather_fp32(self, p):
        if self.world_size == 1:  # detached: a copy with history would keep the whole flat alive
            return self.fp32_fragment(p)[2].detach().reshape(self.shape(p)).float().clone()
        return safe_get_full_fp32_param(p).detach().float()


class ZeroAdamW(OptimizerState):
    """torch AdamW (or SGD) stepping DeepSpeed's flat fp32 partitions: its state is keyed by those
    flats, and `_hp_mapping` on each param points at the param's fragment of them."""

    @abstractmethod
    def flats(self, engine: Any) -> list[torch.Tensor]:
        """The flat fp32 partitions the inner torch optimizer steps (its state keys)."""

    def adam_step(self, engine: Any) -> int | None:
        state = engine.optimizer.optimizer.state
        for flat in self.flats(engine):
            if "step" in state.get(flat, {}):
                return int(state[flat]["step"])
        return None

    def init(self, engine: Any, step: int) -> None:
        """Create Adam's lazily-built state for every flat partition. Built directly rather than by
        a dummy step: ZeRO-3 swaps sub-group params into the inner optimizer only inside its own step."""
        inner = engine.optimizer.optimizer
        require_adamw(inner)
        for flat in self.flats(engine):
            inner.state[flat] = zero_adamw_state(flat, step, inner)
        self.link_fragments(engine)

    def gather_state(self, p, key):
        if self.shards.world_size == 1:
            frag = self.state_fragment(p, key)
            return None if frag is None else frag.detach().reshape(self.shards.shape(p)).float().clone()
        return safe_get_full_optimizer_state(p, key)


class ZeroProbe(Probe):
    def gathered_params(self, params):
        return contextlib.nullcontext()  # ZeRO-2: the module copies are replicated

    def inner_optimizer(self, engine):
        return engine.optimizer.optimizer

    def optimizer_state_numel(self, engine):
        return sum(int(f.numel()) for f in self.backend.optimizer_state.flats(engine))

    def held_tensors(self, engine, model):
        from relora_dist.backends.zero_tensors import held_tensors

        return held_tensors(engine, model)

    def collective_bindings(self):
        # DeepSpeed's TorchBackend binds these two torch.distributed functions at start-up
        # (deepspeed/comm/torch.py), so a wrapper installed on torch.distributed misses them.
        from deepspeed.comm import comm as ds_comm

        cdb = ds_comm.cdb
        return [(cdb, attr, op) for attr, op in (("all_gather_function", "all_gather_into_tensor"),
                                                  ("reduce_scatter_function", "reduce_scatter_tensor"))
                if cdb is not None and getattr(cdb, attr, None) is not None]

    def gather_grad(self, p):
        return safe_get_full_grad(p)
