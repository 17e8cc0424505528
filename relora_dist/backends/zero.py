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
import weakref
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

from relora_dist.backends.base import Backend, release_memory  # noqa: E402
from relora_dist.backends.optimizer_state import OptimizerState, require_adamw, zero_adamw_state  # noqa: E402
from relora_dist.backends.probe import Probe  # noqa: E402
from relora_dist.backends.shards import Shards  # noqa: E402


def _partition_grads(optimizer: Any) -> list:
    """The gradients DeepSpeed's ZeRO-1/2 overflow check walks: this rank's partition, per group."""
    return [g for i in range(len(optimizer.bit16_groups)) for g in (optimizer.averaged_gradients[i] or [])]


def overflow_foreach(grads: list) -> torch.Tensor:
    """Whether any of `grads` (dense; None allowed) holds an inf or NaN, as a [1] bool tensor on
    the accelerator (DeepSpeed 0.19.8's `has_overflow_partitioned_grads_serial` contract): every
    gradient's max |g| in one `torch._foreach_norm(ord=inf)` (inf or NaN iff the gradient holds
    one), then one finiteness test over the stacked maxima."""
    grads = [g for g in grads if g is not None and g.numel() > 0]
    if not grads:
        from deepspeed.accelerator import get_accelerator

        return torch.zeros([1], dtype=torch.bool, device=get_accelerator().current_device_name())
    maxabs = torch.stack(torch._foreach_norm(grads, float("inf")))
    return (~torch.isfinite(maxabs)).any().reshape(1)


def fuse_overflow_check(optimizer: Any) -> None:
    """Replace DeepSpeed's per-gradient overflow check of a ZeRO-1/2 optimizer by
    `overflow_foreach` (the same answer as DeepSpeed's per-gradient `has_inf_or_nan`,
    tests/test_ds_config.py).

    Why: with bf16 (DeepSpeed's `bf16.check_grad_overflow`, on by default) the check runs every
    step over every gradient of the rank's partition, about 13 launches per gradient (amax, amin,
    two isfinite, logical_and / logical_not, the running count), and the ReLoRA phase has 387
    trainable tensors against 219. Measured at the 350m structure (ZeRO-2, bf16, rank 0 of 2,
    `tools/bench.py --count-ops`): the step 1,757 -> 333 launches at full rank, 3,017 -> 501 in
    the ReLoRA phase.
    A NaN that the foreach maximum missed would still skip the step: DeepSpeed also flags a
    non-finite global norm as an overflow under this setting. Left alone where the optimizer is
    not DeepSpeed's ZeRO-1/2 one (ZeRO-3 checks its flat partitions) or offloads to the CPU (it
    then checks while copying) or a gradient is sparse."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or getattr(optimizer, "cpu_offload", False):
        return
    # Through a weak reference and the class's function: no cycle keeps a torn-down engine alive.
    ref, original = weakref.ref(optimizer), type(optimizer).has_overflow_partitioned_grads_serial

    def check():
        opt = ref()
        grads = _partition_grads(opt)
        if any(g is not None and g.is_sparse for g in grads):
            return original(opt)
        return overflow_foreach(grads)

    optimizer.has_overflow_partitioned_grads_serial = check
    if _norm_decides_overflow(optimizer):
        def check_overflow(partition_gradients=True):
            ref().overflow = False  # step() takes the global norm next and skips on a non-finite one

        optimizer.check_overflow = check_overflow


def _norm_decides_overflow(optimizer: Any) -> bool:
    """Whether this ZeRO-1/2 optimizer's `step()` decides every overflow from its global gradient
    norm alone, so the separate overflow check reads every gradient a second time for nothing.

    It does when the optimizer takes the norm (`zero_optimization.compute_grad_norm`, on by
    default) and DeepSpeed's step flags a non-finite norm as an overflow (DeepSpeed 0.19.8 does
    under `bf16.check_grad_overflow` and fp16; a release whose `step` lacks that test keeps its own
    check), and the norm sums every gradient of the rank's partition: no pipeline-replicated,
    model-parallel or expert parameters, which DeepSpeed leaves out of a rank's sum. The two tests
    agree: a gradient holds
    an inf or NaN iff its fp64 sum of squares does (finite bf16 squares stay below 1e77), the
    all-reduced sum then holds it on every rank, and the norm is masked to -1 and read as an
    overflow; a finite norm too large for fp32 (above 1.8e19) is read as one by both code paths
    already. Measured at the 350m structure (ZeRO-2, bf16, rank 0 of 2, `tools/bench.py
    --count-ops`): the step's launches 101 -> 90 in both phases, among them one all-reduce and one host
    read."""
    import inspect

    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    try:
        step_source = inspect.getsource(DeepSpeedZeroOptimizer.step)
    except (OSError, TypeError):
        return False
    params = [p for group in getattr(optimizer, "params_in_partition", []) for p in group]
    return (bool(getattr(optimizer, "compute_grad_norm", False))
            and "is_invalid_grad_norm(scaled_global_grad_norm)" in step_source
            and getattr(optimizer, "model_parallel_rank", 0) == 0
            and not getattr(optimizer, "has_moe_layers", False)
            and not any(getattr(p, "ds_pipe_replicated", False) for p in params))


def norm_foreach(grads: list, norm_dtype: torch.dtype) -> torch.Tensor:
    """The sum of squares of `grads`' 2-norms as a 0-dim `norm_dtype` tensor, each norm taken in
    `norm_dtype` by one `torch._foreach_norm` (bitwise DeepSpeed's per-gradient
    `vector_norm(g.to(norm_dtype))` on this CPU, tests/test_ds_config.py)."""
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return torch.zeros((), dtype=norm_dtype)
    return torch.stack(torch._foreach_norm(grads, 2, dtype=norm_dtype)).pow(2).sum()


def fuse_grad_norm(optimizer: Any) -> None:
    """Replace the per-gradient loop of a ZeRO-1/2 optimizer's `get_grad_norm_direct` (the 2-norm
    DeepSpeed clips by and, under bf16, also tests for overflow) by `norm_foreach`; the
    all-reduce, the root and the masking of a non-finite norm stay DeepSpeed's.

    Why: DeepSpeed casts each gradient of the rank's partition to fp64 and takes its norm, 2
    launches per gradient, and the ReLoRA phase has 387 trainable tensors against 219. Measured
    at the 350m structure (ZeRO-2, bf16, rank 0 of 2, `tools/bench.py --count-ops`): the step's
    launches 333 -> 101 at full rank, 501 -> 101 in the ReLoRA phase. Left alone for another
    norm type, pipeline-replicated or model-parallel parameters, sparse gradients, or an
    optimizer that is not DeepSpeed's ZeRO-1/2 one."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or getattr(optimizer, "cpu_offload", False) \
            or getattr(optimizer, "model_parallel_rank", 0) != 0:
        return
    ref, original = weakref.ref(optimizer), type(optimizer).get_grad_norm_direct

    def grad_norm(gradients, params, norm_type=2):
        opt = ref()
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        if float(norm_type) != 2.0 or any(g.is_sparse for g in grads) \
                or any(getattr(p, "ds_pipe_replicated", False) for p in params):
            return original(opt, gradients, params, norm_type)
        from deepspeed import comm
        from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

        total = norm_foreach(grads[:len(params)], get_norm_dtype()).float().to(opt.device)
        comm.all_reduce(total, op=comm.ReduceOp.SUM, group=opt.dp_process_group)
        opt._model_parallel_all_reduce(tensor=total, op=comm.ReduceOp.SUM)
        total = total.pow(0.5)
        mask_nan_or_inf_with_val_inplace(total, device=opt.device)
        return total

    optimizer.get_grad_norm_direct = grad_norm


def fuse_grad_norm_stage3(optimizer: Any) -> None:
    """`fuse_grad_norm` for DeepSpeed's ZeRO-3 optimizer, whose `get_grad_norm_direct` takes each
    sub-group's gradient norm per gradient in the same way (sum kept in fp64). Measured at the
    350m structure (bf16, rank 0 of 2, AdamW fused): the step's launches 504 -> 68 at full rank, 840 -> 68 in
    the ReLoRA phase. Left alone where DeepSpeed's own rules would count a gradient on some ranks
    only (model or expert parallelism), for another norm type, or when a gradient is elsewhere
    than the accelerator (offload)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3) or getattr(optimizer, "model_parallel_rank", 0) != 0:
        return
    ref, original = weakref.ref(optimizer), type(optimizer).get_grad_norm_direct

    def grad_norm(gradients, params, norm_type=2):
        from deepspeed.accelerator import get_accelerator

        opt = ref()
        device = torch.device(get_accelerator().current_device_name())
        if float(norm_type) != 2.0 or not params or getattr(opt, "offload_optimizer", False) \
                or opt._autoep_expert_parallel_group(params) is not None \
                or any(g.is_sparse or g.device != device for g in gradients):
            return original(opt, gradients, params, norm_type)
        from deepspeed import comm

        opt._assert_same_partition_group(params)
        group = opt._get_param_partition_group(params[0])
        counts_every_rank = opt._grad_norm_counts_every_rank(params, group)
        total = norm_foreach(list(gradients)[:len(params)], get_norm_dtype())
        comm.all_reduce(total, op=comm.ReduceOp.SUM, group=group)
        if not counts_every_rank:
            opt._model_parallel_all_reduce(tensor=total, op=comm.ReduceOp.SUM)
        total = total**0.5
        return torch.where(total.isnan().logical_or(total.isinf()),
                           torch.tensor(-1.0, device=opt.device, dtype=torch.float), total)

    optimizer.get_grad_norm_direct = grad_norm


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
        fuse_overflow_check(engine.optimizer)
        fuse_grad_norm(engine.optimizer)
        fuse_grad_norm_stage3(engine.optimizer)
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
