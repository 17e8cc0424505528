"""DeepSpeed ZeRO-2 and ZeRO-3 behind the backend contract.

Facts this relies on were checked on DeepSpeed 0.19.8 (CPU accelerator, gloo):
- ZeRO keeps an fp32 master of every trainable param and copies it back at each step, so a write
  to the module copy alone is undone: write both (module copy + `safe_set_*_fp32_param`).
- `safe_set_full_*` setters break on ZeRO-3 when numel % world != 0; the `safe_set_local_*` ones
  with a padded slice work, so ZeRO-3 writes are always shard-local.
- `engine.destroy()` leaves the engine reachable (module forward hooks, `_z3_optimizer`,
  `_hp_mapping` on params); `teardown_engine` removes those so the first engine is collected.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from relora_dist.dist import quiet_libraries

quiet_libraries()  # before DeepSpeed's first import

from deepspeed.utils import (  # noqa: E402
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)

from relora_dist.backends.base import Backend, rank_slice  # noqa: E402
from relora_dist.backends.state8bit import (  # noqa: E402
    STATE8_KEYS,
    dequantize_fragment,
    full_flat,
    mask_fragment,
    quantize_into,
)


class ZeroBackend(Backend):
    """Engine lifecycle shared by both stages."""

    stage: int

    def describe(self) -> dict:
        return {"backend": self.name, "zero_stage": self.stage}

    def inner_optimizer(self, engine):
        return engine.optimizer.optimizer

    def relora_phase_backend(self, cfg):
        from relora_dist.backends.ds_config import relora_phase_ds_config

        phase_ds = relora_phase_ds_config(self.ds_config, cfg)
        return self if phase_ds is self.ds_config else make_backend(
            phase_ds, self.rank, self.world_size, self.optimizer_name)

    def set_lr(self, engine, lr):
        for group in engine.optimizer.param_groups:
            group["lr"] = lr

    def set_train(self, engine, train):
        engine.train(train)

    def forward_loss(self, engine, batch):
        return engine(input_ids=batch, labels=batch).loss

    def train_step(self, engine, micro_batches, before_update=None):
        engine.train()
        losses = []
        for i, batch in enumerate(micro_batches):
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            if before_update is not None and i == len(micro_batches) - 1:
                before_update()
            engine.step()  # DeepSpeed applies the update (and clipping) at the accumulation boundary
            losses.append(loss.detach())
            del loss
        grad_norm = engine.get_global_grad_norm()  # global: the same on every rank
        return losses, float(grad_norm) if grad_norm is not None else None

    @property
    def comm_device(self):
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())

    def build_engine(self, model: torch.nn.Module, param_groups: list[dict]) -> Any:
        import deepspeed

        if self.optimizer_name == "sgd":  # a baseline; config validation forbids Adam-moment resets with it
            optimizer = torch.optim.SGD(param_groups, momentum=0.9)
        elif self.optimizer_name == "adamw8bit":
            from relora_dist.quant import bnb

            optimizer = bnb().optim.AdamW8bit(param_groups)
        else:
            optimizer = torch.optim.AdamW(param_groups)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self._optimizer = weakref.ref(engine.optimizer)
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
            self._own_storage(p)
        engine.module = None
        engine.optimizer = None
        self.release_memory()

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

    def adam_step(self, engine: Any) -> int | None:
        """Adam's step counter (shared by every flat group), None before the first step."""
        state = engine.optimizer.optimizer.state
        for flat in self.optimizer_flats(engine):
            if "step" in state.get(flat, {}):
                return int(state[flat]["step"])
        return None

    def init_optimizer_state(self, engine: Any, step: int) -> None:
        """Create Adam's lazily-built state for every flat partition (zero moments, the saved step
        counter) so resume can overwrite the moments. Built directly rather than by a dummy step:
        ZeRO-3 swaps sub-group params into the inner optimizer only inside its own step."""
        inner = engine.optimizer.optimizer
        if not isinstance(inner, torch.optim.AdamW):
            raise TypeError(f"resuming optimizer state supports AdamW, not {type(inner).__name__}")
        for flat in self.optimizer_flats(engine):
            inner.state[flat] = {"step": torch.tensor(float(step)),
                                 "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format)}
        self.link_optimizer_fragments(engine)

    def _own_storage(self, p: torch.nn.Parameter) -> None:
        p.data = p.data.clone()

    def _shape(self, p):
        return getattr(p, "ds_shape", p.shape)

    def full_grad(self, p):
        return safe_get_full_grad(p)

    def numel(self, p):
        return int(getattr(p, "ds_numel", p.numel()))

    def shape(self, p):
        return self._shape(p)

    def storage_dtype(self, p):
        return getattr(p, "ds_tensor", p).dtype

    # At world size 1 the fragments ARE the full tensors: read them without DeepSpeed's full-tensor
    # getters, whose all-reduce / all-gather would be a gloo collective (see gather_flat_slices).
    def full_fp32(self, p):
        if self.world_size == 1:
            return self.fp32_fragment(p)[2].reshape(self._shape(p)).float().clone()
        return safe_get_full_fp32_param(p).float()

    def full_optimizer_state(self, p, key):
        if self.world_size == 1:
            frag = self.state_fragment(p, key)
            return None if frag is None else frag.reshape(self._shape(p)).float().clone()
        return safe_get_full_optimizer_state(p, key)


class Zero2Backend(ZeroBackend):
    """ZeRO-2: module copies are replicated; the fp32 master and moments are partitioned."""

    stage = 2
    name = "zero2"

    def optimizer_params(self, engine):
        return [p for g in engine.optimizer.bit16_groups for p in g]

    def optimizer_state_numel(self, engine):
        return sum(int(f.numel()) for f in engine.optimizer.single_partition_of_fp32_groups)

    def local_range(self, p):
        return 0, p.numel()

    def local_view(self, p):
        return p.data.view(-1)

    def fp32_master_slice(self, p):
        return self.master_slice_of(p, self.full_fp32(p)).clone()

    def write_owned_slice(self, p, values):
        flat = p.data.view(-1)
        if self.world_size == 1:
            flat.copy_(values.reshape(-1))
            return lambda: 0
        # The replicated bf16 copy is rebuilt from every rank's rounded slice: one all-gather of
        # the compute dtype per weight and reset, (world-1)/world x numel x 2 bytes received (bf16).
        owned = values.reshape(-1).to(device=flat.device, dtype=flat.dtype)
        full, work = self.gather_flat_slices_async(owned, flat.numel())

        def finish() -> int:
            work.wait()
            flat.copy_(full)
            return (self.world_size - 1) * owned.numel() * flat.element_size()

        return finish

    def write_trainable(self, p, full_value):
        full_value = full_value.reshape(p.shape).to(p.device)
        p.data.copy_(full_value.to(p.dtype))
        safe_set_full_fp32_param(p, full_value.float())

    def local_state(self, p, key):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # none of p lies in this rank's flat partition
            return 0, torch.zeros(0)
        if self.optimizer_name == "adamw8bit":
            found = self._state8(p, key)
            return None if found is None else (mapping.lp_fragment_address.start, dequantize_fragment(*found))
        if not mapping.optim_fragment or key not in mapping.optim_fragment:
            return None
        return mapping.lp_fragment_address.start, mapping.optim_fragment[key].reshape(-1)

    def mask_local_state(self, p, key, keep):
        if self.optimizer_name == "adamw8bit":
            mask_fragment(*self._state8(p, key), keep)
            return
        _, frag = self.local_state(p, key)
        frag.mul_(keep.to(frag))  # a view into the flat Adam state: in place

    def _state8(self, p, key):
        """(bitsandbytes state of p's flat partition, offset of p's fragment in it, its numel, key),
        None before the first step. The flat partition is the tensor AdamW8bit steps: its blockwise
        codes and absmax cover the whole partition, so a parameter's fragment is a sub-range."""
        mapping = p._hp_mapping
        opt = self._optimizer()
        ptr = mapping.hp_fragment.untyped_storage().data_ptr()
        for flat in opt.single_partition_of_fp32_groups:
            if flat.untyped_storage().data_ptr() == ptr:
                state = opt.optimizer.state.get(flat)
                if not state or "state1" not in state:
                    return None
                address = mapping.hp_fragment_address
                return state, address.start, address.numel, key
        raise RuntimeError(f"no ZeRO-2 flat partition holds the parameter of shape {tuple(p.shape)}")

    def gather_full(self, p):
        return p.data.detach().float().clone()

    def fp32_fragment(self, p):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return 0, 0, None
        address = mapping.lp_fragment_address
        return address.start, address.start + address.numel, mapping.hp_fragment.reshape(-1)

    def state_fragment(self, p, key):
        mapping = getattr(p, "_hp_mapping", None)
        if self.optimizer_name == "adamw8bit":  # checkpoints hold the dequantized moments
            found = None if mapping is None else self._state8(p, key)
            return None if found is None else dequantize_fragment(*found)
        if mapping is None or not mapping.optim_fragment or key not in mapping.optim_fragment:
            return None
        return mapping.optim_fragment[key].reshape(-1)

    def init_optimizer_state(self, engine, step):
        if self.optimizer_name != "adamw8bit":
            return super().init_optimizer_state(engine, step)
        inner = engine.optimizer.optimizer
        for gindex, (group, flat) in enumerate(zip(inner.param_groups, self.optimizer_flats(engine))):
            inner.init_state(group, flat, gindex, 0)
            inner.state[flat]["step"] = int(step)
        self._pending8 = {}
        self.link_optimizer_fragments(engine)

    def finish_optimizer_state_writes(self):
        """8-bit state: quantize each written flat partition once (its blocks span parameters)."""
        for state, key, values in getattr(self, "_pending8", {}).values():
            quantize_into(state, key, values)
        self._pending8 = {}

    def exact_local_state(self, engine):
        # Checkpoints hold dequantized moments per parameter (they reshard); requantizing them need
        # not give back the same bytes: a block the prune emptied comes back with scale 0, and on
        # N(0, 1e-3) data 11 of 100k signed codes moved (bitsandbytes 0.50.2, quantize_blockwise of
        # its own dequantization). So the raw state is kept too, for a resume at the same world size.
        if self.optimizer_name != "adamw8bit":
            return {}
        inner, out = engine.optimizer.optimizer, {}
        for i, flat in enumerate(self.optimizer_flats(engine)):
            state = inner.state.get(flat) or {}
            for key in STATE8_KEYS:
                if key in state:
                    out[f"optimizer8/{i}/{key}"] = state[key]
        return out

    def load_exact_local_state(self, engine, tensors):
        if self.optimizer_name != "adamw8bit" or not tensors:
            return False
        inner, flats = engine.optimizer.optimizer, self.optimizer_flats(engine)
        targets = {}
        for i, flat in enumerate(flats):
            state = inner.state.get(flat) or {}
            for key in STATE8_KEYS:
                if key in state:
                    targets[f"optimizer8/{i}/{key}"] = state[key]
        if set(targets) != set(tensors) or any(targets[k].shape != tensors[k].shape
                                                 or targets[k].dtype != tensors[k].dtype for k in targets):
            return False
        for k, t in targets.items():
            t.copy_(tensors[k])
        return True

    def optimizer_flats(self, engine):
        return list(engine.optimizer.single_partition_of_fp32_groups)

    def link_optimizer_fragments(self, engine):
        # DeepSpeed 0.19.8 bug: ZeRO-2 steps one param group at a time and links the per-param
        # optimizer-state views after the FIRST group's step, when the other groups' Adam state
        # does not exist yet; params of later groups (here: norms, no weight decay) never get
        # views, and safe_get/set_full_optimizer_state fail for them. Link every group again.
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        opt = engine.optimizer
        for i, flat in enumerate(opt.single_partition_of_fp32_groups):
            if opt.optimizer.state.get(flat):
                lazy_init_hp_params_optimizer_state(opt.bit16_groups[i], flat, opt.optimizer.state)
        opt._hp_optimizer_states_linked = True

    def write_frozen(self, p, full_value):
        p.data.copy_(full_value.reshape(p.shape).to(p.dtype))

    def write_optimizer_state(self, p, key, full_value):
        if self.optimizer_name == "adamw8bit":
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                return
            state, start, numel, _ = self._state8(p, key)
            entry = self._pending8.setdefault((id(state), key), (state, key, full_flat(state, key)))
            lp = mapping.lp_fragment_address.start
            entry[2][start:start + numel] = full_value.reshape(-1)[lp:lp + numel].float()
            return
        safe_set_full_optimizer_state(p, full_value.reshape(p.shape).float(), key)


class Zero3Backend(ZeroBackend):
    """ZeRO-3: params, fp32 masters and moments are all partitioned; every write is shard-local."""

    stage = 3
    name = "zero3"

    def optimizer_params(self, engine):
        return [p for g in engine.optimizer.fp16_groups for p in g]

    def optimizer_state_numel(self, engine):
        return sum(int(f.numel()) for f in engine.optimizer.fp32_partitioned_groups_flat)

    def local_range(self, p):
        return rank_slice(p.ds_numel, self.rank, self.world_size)

    def local_view(self, p):
        start, end = self.local_range(p)
        return p.ds_tensor.data.view(-1)[: end - start]

    def _padded_local(self, p, full_value: torch.Tensor) -> torch.Tensor:
        start, end = self.local_range(p)
        padded = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=p.ds_tensor.device)
        padded[: end - start] = full_value.reshape(-1)[start:end].float()
        return padded

    def fp32_master_slice(self, p):
        start, end = self.local_range(p)
        return safe_get_local_fp32_param(p).float().reshape(-1)[: end - start].clone()

    def write_owned_slice(self, p, values):
        view = self.local_view(p)  # master_range == local_range: nothing to communicate
        view.copy_(values.reshape(-1).to(device=view.device, dtype=view.dtype))
        return lambda: 0

    def write_trainable(self, p, full_value):
        padded = self._padded_local(p, full_value.to(p.ds_tensor.device))
        p.ds_tensor.data.copy_(padded.to(p.ds_tensor.dtype).view_as(p.ds_tensor))
        safe_set_local_fp32_param(p, padded)

    def local_state(self, p, key):
        frag = self.state_fragment(p, key)
        return None if frag is None else (self.local_range(p)[0], frag)

    def mask_local_state(self, p, key, keep):
        local = safe_get_local_optimizer_state(p, key)
        padded = torch.zeros(local.numel(), dtype=local.dtype, device=local.device)
        padded[: keep.numel()] = keep.to(padded)
        safe_set_local_optimizer_state(p, local * padded.view_as(local), key)

    def gather_full(self, p):
        return self.gather_flat_slices(self.local_view(p).float(), p.ds_numel).view(p.ds_shape)

    def fp32_fragment(self, p):
        start, end = self.local_range(p)
        return start, end, safe_get_local_fp32_param(p).reshape(-1)[: end - start]

    def state_fragment(self, p, key):
        try:
            return safe_get_local_optimizer_state(p, key).reshape(-1)[: self.local_range(p)[1] - self.local_range(p)[0]]
        except KeyError:  # Adam builds its state lazily at the first step
            return None

    def optimizer_flats(self, engine):
        return list(engine.optimizer.fp32_partitioned_groups_flat)

    def gathered_update(self, p, fn):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if self.rank == 0:
                fn(p.data)

    def write_frozen(self, p, full_value):
        padded = self._padded_local(p, full_value)
        p.ds_tensor.data.copy_(padded.to(p.ds_tensor.dtype).view_as(p.ds_tensor))

    def write_optimizer_state(self, p, key, full_value):
        local = safe_get_local_optimizer_state(p, key)
        safe_set_local_optimizer_state(p, self._padded_local(p, full_value).view_as(local).to(local), key)

    def _own_storage(self, p):
        p.ds_tensor.data = p.ds_tensor.data.clone()


def make_backend(ds_config: dict, rank: int, world_size: int, optimizer_name: str = "adamw") -> Backend:
    stage = int(ds_config["zero_optimization"]["stage"])
    return {2: Zero2Backend, 3: Zero3Backend}[stage](ds_config, rank, world_size, optimizer_name)
