"""DeepSpeed ZeRO-2 behind the engine contract: params replicated, fp32 masters, gradients and
moments partitioned over one flat buffer per param group, so a param's fp32 master and moments are
a fragment of this rank's flat partition (`_hp_mapping`), possibly empty. AdamW8bit's blockwise
state lives on the same flat partition (backends/state8bit.py)."""

from __future__ import annotations

import weakref

import torch

from relora_dist.backends.base import copy_if_same_layout
from relora_dist.backends.state8bit import STATE8_KEYS, dequantize_fragment, full_flat, mask_fragment, quantize_into
from relora_dist.backends.zero import ZeroAdamW, ZeroBackend, ZeroShards  # first: it quiets DeepSpeed's import
from relora_dist.backends.zero3 import Zero3Backend

from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state  # noqa: E402,I001


class Zero2Shards(ZeroShards):
    """Module copies are replicated: each rank owns the `rank_slice` of every weight."""

    def local_range(self, p):
        return 0, p.numel()

    def local_view(self, p):
        return p.data.view(-1)

    def owned_fp32(self, p):
        return self.owned_slice(p, self.gather_fp32(p)).clone()

    def write_owned(self, p, values):
        flat = p.data.view(-1)
        if self.world_size == 1:
            flat.copy_(values.reshape(-1))
            return lambda: 0
        # The replicated bf16 copy is rebuilt from every rank's rounded slice: one all-gather of
        # the compute dtype per weight and reset, (world-1)/world x numel x 2 bytes received (bf16).
        owned = values.reshape(-1).to(device=flat.device, dtype=flat.dtype)
        full, work = self.gather_slices_async(owned, flat.numel())

        def finish() -> int:
            work.wait()
            flat.copy_(full)
            return (self.world_size - 1) * owned.numel() * flat.element_size()

        return finish

    def write_trainable(self, p, full_value):
        full_value = full_value.reshape(p.shape).to(p.device)
        p.data.copy_(full_value.to(p.dtype))
        safe_set_full_fp32_param(p, full_value.float())

    def write_frozen(self, p, full_value):
        p.data.copy_(full_value.reshape(p.shape).to(p.dtype))

    def gather_param(self, p):
        return p.data.detach().float().clone()

    def fp32_fragment(self, p):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return 0, 0, None
        address = mapping.lp_fragment_address
        return address.start, address.start + address.numel, mapping.hp_fragment.reshape(-1)


class Zero2AdamW(ZeroAdamW):
    """torch AdamW: each param's moments are views (`optim_fragment`) into the flat state."""

    def params(self, engine):
        return [p for g in engine.optimizer.bit16_groups for p in g]

    def flats(self, engine):
        return list(engine.optimizer.single_partition_of_fp32_groups)

    def local_state(self, p, key):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # none of p lies in this rank's flat partition
            return 0, torch.zeros(0)
        if not mapping.optim_fragment or key not in mapping.optim_fragment:
            return None
        return mapping.lp_fragment_address.start, mapping.optim_fragment[key].reshape(-1)

    def state_fragment(self, p, key):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None or not mapping.optim_fragment or key not in mapping.optim_fragment:
            return None
        return mapping.optim_fragment[key].reshape(-1)

    def write_state(self, p, key, full_value):
        safe_set_full_optimizer_state(p, full_value.reshape(p.shape).float(), key)

    def link_fragments(self, engine):
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


class Zero2AdamW8bit(Zero2AdamW):
    """bitsandbytes AdamW8bit stepping the flat partitions: a param's moments are a sub-range of
    its partition's blockwise codes, read dequantized and written by requantizing the partition."""

    def build(self, param_groups):
        from relora_dist.relora.quant import bnb

        return bnb().optim.AdamW8bit(param_groups)

    def attach(self, engine):
        self._optimizer = weakref.ref(engine.optimizer)

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

    def local_state(self, p, key):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # none of p lies in this rank's flat partition
            return 0, torch.zeros(0)
        found = self._state8(p, key)
        return None if found is None else (mapping.lp_fragment_address.start, dequantize_fragment(*found))

    def mask_local_state(self, p, key, keep):
        mask_fragment(*self._state8(p, key), keep)

    def state_fragment(self, p, key):  # checkpoints hold the dequantized moments
        found = None if getattr(p, "_hp_mapping", None) is None else self._state8(p, key)
        return None if found is None else dequantize_fragment(*found)

    def init(self, engine, step):
        inner = engine.optimizer.optimizer
        for gindex, (group, flat) in enumerate(zip(inner.param_groups, self.flats(engine))):
            inner.init_state(group, flat, gindex, 0)
            inner.state[flat]["step"] = int(step)
        self._pending8 = {}
        self.link_fragments(engine)

    def write_state(self, p, key, full_value):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return
        state, start, numel, _ = self._state8(p, key)
        entry = self._pending8.setdefault((id(state), key), (state, key, full_flat(state, key)))
        lp = mapping.lp_fragment_address.start
        entry[2][start:start + numel] = full_value.reshape(-1)[lp:lp + numel].float()

    def finish_writes(self):
        """8-bit state: quantize each written flat partition once (its blocks span parameters)."""
        for state, key, values in getattr(self, "_pending8", {}).values():
            quantize_into(state, key, values)
        self._pending8 = {}

    def exact_local_state(self, engine):
        # Checkpoints hold dequantized moments per parameter (they reshard); requantizing them need
        # not give back the same bytes: a block the prune emptied comes back with scale 0, and on
        # N(0, 1e-3) data 11 of 100k signed codes moved (bitsandbytes 0.50.2, quantize_blockwise of
        # its own dequantization). So the raw state is kept too, for a resume at the same world size.
        inner, out = engine.optimizer.optimizer, {}
        for i, flat in enumerate(self.flats(engine)):
            state = inner.state.get(flat) or {}
            for key in STATE8_KEYS:
                if key in state:
                    out[f"optimizer8/{i}/{key}"] = state[key]
        return out

    def load_exact_local_state(self, engine, tensors):
        # exact_local_state returns the live tensors: the targets of the copy
        return copy_if_same_layout(self.exact_local_state(engine), tensors)


class Zero2Backend(ZeroBackend):
    """ZeRO-2: module copies are replicated; the fp32 master and moments are partitioned."""

    stage = 2
    name = "zero2"
    _shards = Zero2Shards
    _states = {"adamw": Zero2AdamW, "adamw8bit": Zero2AdamW8bit}

    def relora_phase_backend(self, cfg):
        from relora_dist.backends.ds_config import relora_phase_ds_config

        phase_ds = relora_phase_ds_config(self._ds_config, cfg)
        if phase_ds is self._ds_config:
            return self
        return Zero3Backend(phase_ds, self.rank, self.world_size, self._optimizer_name, self._implementation)
