"""PyTorch FSDP2 (`fully_shard`) behind the backend contract.

One `fully_shard` unit per decoder layer plus the root (embeddings, final norm, lm_head) on a 1-D
device mesh over all ranks. Every param is a DTensor sharded on dim 0 like `torch.chunk`
(`_chunk_with_empty` in torch/distributed/fsdp/_fully_shard/_fsdp_common.py, torch 2.13): each rank
holds rows [rank*c, rank*c + c) clipped to the row count, c = ceil(rows/world), so at world 3 a
tensor of 4 rows leaves the last rank an empty shard. Row shard [r0, r1) of an (out x in) weight
is the flat range [r0*in, r1*in).

The sharded params stay fp32 under bf16 (MixedPrecisionPolicy casts each all-gather), so they are
the optimizer's masters AND the frozen weights' merge masters: no separate copies (`fp32_params`).
The optimizer states: backends/fsdp2_state.py (AdamW) and backends/fsdp2_8bit.py (AdamW8bit).
W and B are row-sharded alike, so a merge gathers only A (relora/steps.py gathers A and B; B is small).
The ReLoRA switch flips requires_grad on the same sharded params and builds a new AdamW over the
trainable ones: FSDP2 re-reads requires_grad at every unshard (`set_requires_grad_if_needed` in
_fsdp_param.py), so nothing is re-sharded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from relora_dist.backends.base import Backend, release_memory
from relora_dist.backends.fsdp2_8bit import FSDP2AdamW8bit
from relora_dist.backends.fsdp2_state import FSDP2AdamW, local_tensor
from relora_dist.backends.probe import Probe
from relora_dist.backends.shards import Shards


class FSDPEngine:
    """The sharded module and the optimizer of the current phase. Calling it runs the module; a
    no-grad call reshards the root afterwards (FSDP2 keeps the root unsharded after forward for
    the backward that follows, and the backend reads the sharded params)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, backend: "FSDP2Backend"):
        self.module, self.optimizer, self._backend = module, optimizer, backend

    def __call__(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        if not torch.is_grad_enabled():
            self.module.reshard()
        return out

    # A training step is forward / backward / step, as on a DeepSpeed engine, so that a caller
    # (tools/bench.py) can tell the collectives of each apart: all-gathers in forward, all-gathers
    # and reduce-scatters in backward, the grad-norm all-reduce in step.
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, update and zero the grads; the global grad norm."""
        return self._backend._clip_and_step(self)

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.get_decoder().layers)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class FSDP2Shards(Shards):
    """Row shards of DTensor params, fp32 whatever the compute dtype; never replicated."""

    fp32_params = True

    @property
    def comm_device(self):
        return _comm_device()

    def local_range(self, p):
        shape = p.shape
        rows = shape[0] if len(shape) else 1
        inner = p.numel() // rows if rows else 0
        chunk = -(-rows // self.world_size)
        r0 = min(self.rank * chunk, rows)
        r1 = min(r0 + chunk, rows)
        return r0 * inner, r1 * inner

    def owned_range(self, p):
        return self.local_range(p)  # never replicated

    def local_view(self, p):
        return local_tensor(p).view(-1)

    def gather_rows(self, local: torch.Tensor, p) -> torch.Tensor:
        """The whole flat tensor from every rank's row shard `local` of p (collective)."""
        numel = p.numel()
        if self.world_size == 1:  # no collective at world 1 (see Shards.gather_slices)
            return local.reshape(-1)[:numel].clone()
        rows = p.shape[0] if p.dim() else 1
        per_rank = -(-rows // self.world_size) * (numel // rows if rows else 0)
        padded = torch.zeros(per_rank, dtype=local.dtype, device=self.comm_device)
        padded[: local.numel()] = local.reshape(-1)
        out = torch.empty(per_rank * self.world_size, dtype=local.dtype, device=self.comm_device)
        dist.all_gather(list(out.view(self.world_size, per_rank).unbind(0)), padded)
        return out[:numel]

    def write_local(self, dst: torch.Tensor, p, full_value: torch.Tensor) -> None:
        """Copy this rank's row shard of a full value of p into `dst`."""
        start, end = self.local_range(p)
        dst.copy_(full_value.reshape(-1)[start:end].to(device=dst.device, dtype=dst.dtype))

    def gather_fp32(self, p):
        return self.gather_rows(local_tensor(p).detach().float(), p).view(p.shape)

    def owned_fp32(self, p):
        return local_tensor(p).detach().float().reshape(-1).clone()

    def write_owned(self, p, values):
        view = self.local_view(p)  # the fp32 shard is the merge master: nothing to communicate
        view.copy_(values.reshape(-1).to(device=view.device, dtype=view.dtype))
        return lambda: 0

    def write_trainable(self, p, full_value):
        self.write_local(self.local_view(p), p, full_value)  # the shard is the optimizer's master

    def write_frozen(self, p, full_value):
        self.write_local(self.local_view(p), p, full_value)

    def gather_param(self, p):
        """The fp32 shards gathered: FSDP2 has no rounded module copy (the bf16 cast happens
        inside each forward's all-gather)."""
        return self.gather_rows(local_tensor(p).float(), p).view(p.shape)

    def fp32_fragment(self, p):
        start, end = self.local_range(p)
        return start, end, self.local_view(p)


class FSDP2Backend(Backend):
    name = "fsdp2"

    def __init__(self, rank: int, world_size: int, optimizer_name: str = "adamw", *, grad_clip: float = 0.0,
                 bf16: bool = False, implementation: str = "foreach"):
        """`grad_clip`: clip the global grad norm to this (0: never); `bf16`: compute in bf16
        (params, grads' reduction and the optimizer stay fp32); `implementation`: how torch AdamW
        steps (fused or foreach)."""
        self.rank, self.world_size = rank, world_size
        self._grad_clip, self._bf16 = grad_clip, bf16
        self.shards = FSDP2Shards(rank, world_size)
        state = FSDP2AdamW8bit if optimizer_name == "adamw8bit" else FSDP2AdamW
        self.optimizer_state = state(self.shards, optimizer_name, implementation)

    def describe(self) -> dict:
        # zero_stage is a required manifest field; 0 = no ZeRO (readers use the flat ranges only)
        return {"backend": self.name, "zero_stage": 0}

    # --- engines --------------------------------------------------------------------------------
    def _shard(self, model: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.shards.comm_device.type, (self.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self._bf16 \
            else MixedPrecisionPolicy()
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        if dist.get_backend() == "gloo":
            # FSDP2 reduce-scatters fp32 gradients with ReduceOp.AVG, which gloo can silently run as
            # SUM (pytorch#162338). torch 2.13's gloo averaged a 2-rank reduce_scatter_tensor right
            # (checked), but SUM plus FSDP2's own division by the world size is the same math and
            # does not depend on it; tests compare 2 ranks with 1 process either way.
            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.set_force_sum_reduction_for_comms(True)

    def build_engine(self, model: nn.Module, param_groups: list[dict]) -> Any:
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(model, FSDPModule):  # the first engine shards; the ReLoRA phase reuses it
            names = {id(p): n for n, p in model.named_parameters()}
            self._shard(model)  # replaces every param by a sharded DTensor param
            by_name = dict(model.named_parameters())
            param_groups = [{**g, "params": [by_name[names[id(p)]] for p in g["params"]]} for g in param_groups]
        engine = FSDPEngine(model, self.optimizer_state.build(param_groups), self)
        self.optimizer_state.attach(engine)
        return engine

    def teardown_engine(self, engine: Any) -> None:
        """Free the optimizer and its state; the sharded module stays (no re-sharding)."""
        for p in engine.module.parameters():
            p.grad = None
        self.optimizer_state.detach(engine)
        engine.optimizer = None
        engine.module = None
        release_memory()

    # --- one training step ------------------------------------------------------------------------
    def train_step(self, engine, micro_batches, before_update=None):
        engine.module.train()
        losses, n = [], len(micro_batches)
        for i, batch in enumerate(micro_batches):
            loss = engine.forward(input_ids=batch, labels=batch, use_cache=False).loss
            # Mean over micro-batches, like DeepSpeed's loss / gradient_accumulation_steps; every
            # micro-batch's gradients are reduce-scattered into the sharded fp32 grads.
            engine.backward(loss / n)
            losses.append(loss.detach())
            if before_update is not None and i == n - 1:
                before_update()
        return losses, engine.step()

    def _clip_and_step(self, engine: FSDPEngine) -> float:
        params = [p for p in self.optimizer_state.params(engine) if p.grad is not None]
        norm = self._grad_norm(params)
        if torch.isfinite(torch.tensor(norm)):  # like DeepSpeed: a non-finite step applies no update
            if self._grad_clip > 0 and norm + 1e-6 > self._grad_clip:  # DeepSpeed's clip rule
                coef = self._grad_clip / (norm + 1e-6)
                torch._foreach_mul_([local_tensor(p.grad) for p in params], coef)  # one launch, not one per grad
            engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)
        return norm

    def _grad_norm(self, params) -> float:
        """Global L2 norm of the sharded grads: local sums of squares (float64), one SUM all-reduce.

        The local norms come from one `torch._foreach_norm` over all grads, on their device: the
        per-grad form (`g.double().pow(2).sum().cpu()`) launched 4 ops per grad, and on a GPU
        synchronised on each (`tools/bench.py --count-ops`, docs/benchmarks.md)."""
        grads = [local_tensor(p.grad) for p in params]
        if grads:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
            sq = torch.stack(norms).square().sum().reshape(1)
        else:
            sq = torch.zeros(1, dtype=torch.float64)
        if self.world_size > 1:
            sq = sq.to(self.shards.comm_device)
            dist.all_reduce(sq)
        return float(sq.sqrt())


class FSDP2Probe(Probe):
    def inner_optimizer(self, engine):
        return getattr(engine.optimizer, "inner", engine.optimizer)  # AdamW8bit: bitsandbytes' own

    def optimizer_state_numel(self, engine):
        return sum(local_tensor(p).numel() for p in self.optimizer_params(engine))

    def held_tensors(self, engine, model):
        """Sharded params (fp32 whatever the compute dtype: they are also the optimizer's and the
        merges' masters, so nothing is "fp32_master"), sharded grads, AdamW state. A param that is
        not a DTensor is unsharded at this moment (between an all-gather and its reshard: a
        transient full copy in the compute dtype)."""
        from torch.distributed.tensor import DTensor

        for name, p in model.named_parameters():
            if isinstance(p, DTensor):
                yield f"module.{name}", local_tensor(p), "params"
            else:
                yield f"module.{name}.unsharded", p.detach(), "gathered_params"
            if p.grad is not None:
                yield f"module.{name}.grad", local_tensor(p.grad), "grads"
        for i, state in enumerate(engine.optimizer.state.values() if engine.optimizer is not None else []):
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    yield f"opt.state[{i}][{key}]", local_tensor(value), "optimizer_state"

    def gather_grad(self, p):
        return None if p.grad is None else self.shards.gather_rows(local_tensor(p.grad).float(), p).view(p.shape)
