"""DeepSpeed ZeRO-3 behind the engine contract: params, fp32 masters and moments are all
partitioned (ceil(numel / world) per rank, the last shard padded), so every write is shard-local
through DeepSpeed's `safe_*_local_*` accessors (the `safe_set_full_*` ones break when numel % world
!= 0, checked on DeepSpeed 0.19.8)."""

from __future__ import annotations

import torch

from relora_dist.backends.shards import rank_slice
from relora_dist.backends.zero import ZeroAdamW, ZeroBackend, ZeroProbe, ZeroShards  # first: it quiets DeepSpeed

from deepspeed.utils import (  # noqa: E402,I001
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)


class Zero3Shards(ZeroShards):
    """Every rank holds and owns its `rank_slice` of every param (`ds_tensor`)."""

    def local_range(self, p):
        # self.numel: also a quantized base's shape-only weight, whose master keeps ZeRO-3's partition
        return rank_slice(self.numel(p), self.rank, self.world_size)

    def local_view(self, p):
        start, end = self.local_range(p)
        return p.ds_tensor.data.view(-1)[: end - start]

    def own_storage(self, p):
        p.ds_tensor.data = p.ds_tensor.data.clone()

    def padded_local(self, p, full_value: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full value, fp32, padded to the length of its `ds_tensor`."""
        start, end = self.local_range(p)
        padded = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=p.ds_tensor.device)
        padded[: end - start] = full_value.reshape(-1)[start:end].float()
        return padded

    def owned_fp32(self, p):
        start, end = self.local_range(p)
        return safe_get_local_fp32_param(p).detach().float().reshape(-1)[: end - start].clone()

    def write_owned(self, p, values):
        view = self.local_view(p)  # owned_range == local_range: nothing to communicate
        view.copy_(values.reshape(-1).to(device=view.device, dtype=view.dtype))
        return lambda: 0

    def write_trainable(self, p, full_value):
        padded = self.padded_local(p, full_value.to(p.ds_tensor.device))
        p.ds_tensor.data.copy_(padded.to(p.ds_tensor.dtype).view_as(p.ds_tensor))
        safe_set_local_fp32_param(p, padded)

    def write_frozen(self, p, full_value):
        padded = self.padded_local(p, full_value)
        p.ds_tensor.data.copy_(padded.to(p.ds_tensor.dtype).view_as(p.ds_tensor))

    def gather_param(self, p):
        return self.gather_slices(self.local_view(p).float(), p.ds_numel).view(p.ds_shape)

    def fp32_fragment(self, p):
        start, end = self.local_range(p)
        return start, end, safe_get_local_fp32_param(p).reshape(-1)[: end - start]


class Zero3AdamW(ZeroAdamW):
    """AdamW (or SGD) over ZeRO-3's partitioned flats, read and written through DeepSpeed's
    shard-local accessors."""

    def params(self, engine):
        return [p for g in engine.optimizer.fp16_groups for p in g]

    def flats(self, engine):
        return list(engine.optimizer.fp32_partitioned_groups_flat)

    def state_fragment(self, p, key):
        start, end = self.shards.local_range(p)
        try:
            return safe_get_local_optimizer_state(p, key).reshape(-1)[: end - start]
        except KeyError:  # Adam builds its state lazily at the first step
            return None

    def mask_local_state(self, p, key, keep):
        local = safe_get_local_optimizer_state(p, key)
        padded = torch.zeros(local.numel(), dtype=local.dtype, device=local.device)
        padded[: keep.numel()] = keep.to(padded)
        safe_set_local_optimizer_state(p, local * padded.view_as(local), key)

    def write_state(self, p, key, full_value):
        local = safe_get_local_optimizer_state(p, key)
        safe_set_local_optimizer_state(p, self.shards.padded_local(p, full_value).view_as(local).to(local), key)


class Zero3Probe(ZeroProbe):
    def gathered_params(self, params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)

    def gathered_update(self, p, fn):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if self.backend.rank == 0:
                fn(p.data)


class Zero3Backend(ZeroBackend):
    """ZeRO-3: params, fp32 masters and moments are all partitioned; every write is shard-local."""

    stage = 3
    name = "zero3"
    _shards = Zero3Shards
    _states = {"adamw": Zero3AdamW}  # adamw8bit: refused by config validation (ZeRO-2 only)
