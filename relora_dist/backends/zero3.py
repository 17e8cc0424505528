"""DeepSpeed ZeRO-3 behind the backend contract: params, fp32 masters and moments are all
partitioned (ceil(numel / world) per rank, the last shard padded), so every write is shard-local
through DeepSpeed's `safe_*_local_*` accessors (the `safe_set_full_*` ones break when numel % world
!= 0, checked on DeepSpeed 0.19.8)."""

from __future__ import annotations

import torch

from relora_dist.backends.base import rank_slice
from relora_dist.backends.zero import ZeroBackend  # first: it quiets DeepSpeed's import

from deepspeed.utils import (  # noqa: E402,I001
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)

class Zero3Backend(ZeroBackend):
    """ZeRO-3: params, fp32 masters and moments are all partitioned; every write is shard-local."""

    stage = 3
    name = "zero3"

    def optimizer_params(self, engine):
        return [p for g in engine.optimizer.fp16_groups for p in g]

    def optimizer_state_numel(self, engine):
        return sum(int(f.numel()) for f in engine.optimizer.fp32_partitioned_groups_flat)

    def local_range(self, p):
        # self.numel: also a quantized base's shape-only weight, whose master keeps ZeRO-3's partition
        return rank_slice(self.numel(p), self.rank, self.world_size)

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
        return safe_get_local_fp32_param(p).detach().float().reshape(-1)[: end - start].clone()

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

    def gathered_params(self, params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)

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
