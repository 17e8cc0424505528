"""Fewer operator launches per step than DeepSpeed's per-tensor loops, for the ZeRO engines.

DeepSpeed 0.19.8's ZeRO-1/2 optimizer walks the rank's gradients one tensor at a time for its bf16
overflow check, its gradient norm and its copy of reduced gradients into the rank's partition, and
ZeRO-3 takes its norm the same way: a few launches per trainable tensor, and the ReLoRA phase has
387 trainable tensors against full rank's 219 at the 350m structure. On a GPU that step is
host-bound (docs/benchmarks.md, "Operator launches per step"). Each function here replaces one such
loop on one optimizer instance by multi-tensor (foreach) ops with the same result, and leaves the
optimizer alone wherever DeepSpeed's own rules differ from the case it was checked on.
`fuse(optimizer)` applies all of them; the engines call it once per engine.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


def fuse(optimizer: Any) -> None:
    """Every fusion below that applies to `optimizer` (a DeepSpeed ZeRO optimizer)."""
    fuse_overflow_check(optimizer)
    fuse_grad_norm(optimizer)
    fuse_grad_norm_stage3(optimizer)
    fuse_partition_copies(optimizer)
    fuse_partition_copies_stage3(optimizer)


def _code_is(cls: type, method: str, *snippets: str) -> bool:
    """Whether the source of DeepSpeed's `cls.method` holds every snippet: each replacement below
    stands in for code checked on DeepSpeed 0.19.8, and leaves a release whose code differs alone.
    DeepSpeed wraps some methods in its NVTX range decorator (a closure over the method, no
    `__wrapped__`): the method is then read from the closure."""
    import inspect

    fn = getattr(cls, method, None)
    inner = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())
             if getattr(c.cell_contents, "__name__", None) == method]
    try:
        source = inspect.getsource(inner[0] if inner else fn)
    except (OSError, TypeError):
        return False
    return all(snippet in source for snippet in snippets)


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
    agree: a gradient holds an inf or NaN iff its fp64 sum of squares does (finite bf16 squares
    stay below 1e77), the all-reduced sum then holds it on every rank, and the norm is masked to -1
    and read as an overflow; a finite norm too large for fp32 (above 1.8e19) is read as one by both
    code paths already. Measured at the 350m structure (ZeRO-2, bf16, rank 0 of 2, `tools/bench.py
    --count-ops`): the step's launches 101 -> 90 in both phases, among them one all-reduce and one
    host read."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    params = [p for group in getattr(optimizer, "params_in_partition", []) for p in group]
    return (bool(getattr(optimizer, "compute_grad_norm", False))
            and _code_is(DeepSpeedZeroOptimizer, "step", "is_invalid_grad_norm(scaled_global_grad_norm)")
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


def _copies_one_at_a_time() -> bool:
    """Whether this DeepSpeed's ZeRO-1/2 `copy_grads_in_partition` is the per-gradient copy that
    `fuse_partition_copies` defers and `reduce_ipg_grads` the caller that reaches it there."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Z

    return (hasattr(Z, "_use_compact_grad_partition_buffer")
            and _code_is(Z, "copy_grads_in_partition", "new_grad_tensor.copy_(grad_reduc.view(-1))",
                         "grad_reduc.data = new_grad_tensor.data.view_as(grad_reduc)",
                         "self.grads_in_partition_offset += param.numel()")
            and _code_is(Z, "reduce_ipg_grads", "self.copy_grads_in_partition(param, group_idx)"))


def fuse_partition_copies(optimizer: Any) -> None:
    """Copy a reduced bucket's gradients into the rank's partition with one `torch._foreach_copy_`
    instead of one `copy_` per gradient.

    DeepSpeed's ZeRO-1/2 optimizer (`contiguous_gradients`) copies each gradient of the rank's
    partition out of the reduction bucket once the bucket is reduced, in `copy_grads_in_partition`,
    and points the gradient at its new place. Here that call only records the (destination,
    source) pair and points the gradient; the wrapped `reduce_ipg_grads` copies every recorded pair
    in one op before it returns, so before the bucket is written again and before the step reads
    the partition. The same bytes land in the same places (bitwise the same masters:
    tests/test_faults.py runs DeepSpeed's own loop beside it at 1 and 2 ranks). On a GPU
    `_foreach_copy_` is one multi-tensor kernel per ~100 tensors.

    Why: at world size 1 every trainable tensor is in the rank's partition, one launch each (387 in
    the ReLoRA phase at the 350m structure, 219 at full rank); at world 2 about half. Measured in
    docs/benchmarks.md ("Operator launches per step"). Left alone under `overlap_comm` (the copies
    then run on DeepSpeed's reduction stream, whose ordering a CPU run cannot test), CPU offload,
    DeepSpeed's fp32 gradient-accumulation buffer, and a DeepSpeed whose code differs from the
    copy checked (`_copies_one_at_a_time`)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not getattr(optimizer, "contiguous_gradients", False) \
            or getattr(optimizer, "overlap_comm", True) or getattr(optimizer, "cpu_offload", True) \
            or not _copies_one_at_a_time():
        return
    ref, cls = weakref.ref(optimizer), type(optimizer)
    destinations: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []

    def copy_grads_in_partition(param, group_idx=None):
        opt = ref()
        if group_idx is None:
            group_idx = opt._get_param_group_idx(param)
        if opt.grads_in_partition is None or opt._use_compact_grad_partition_buffer(group_idx):
            return cls.copy_grads_in_partition(opt, param, group_idx)  # allocates the partition buffer
        grad = opt.get_gradient_for_reduction(param)
        destination = opt.grads_in_partition.view(-1).narrow(0, opt.grads_in_partition_offset, param.numel())
        destinations.append(destination)
        sources.append(grad.view(-1))  # the bucket's bytes: still referenced after .data moves
        grad.data = destination.data.view_as(grad)
        opt.grads_in_partition_offset += param.numel()

    def reduce_ipg_grads(comm_dtype=None):
        try:
            cls.reduce_ipg_grads(ref(), comm_dtype)
        finally:
            if destinations:
                torch._foreach_copy_(destinations, sources)
                destinations.clear()
                sources.clear()

    optimizer.copy_grads_in_partition = copy_grads_in_partition
    optimizer.reduce_ipg_grads = reduce_ipg_grads


_STAGE3_GRAD_PARTITIONS = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"


def _stage3_copies_one_at_a_time() -> bool:
    """Whether this DeepSpeed's ZeRO-3 `partition_grads` is the per-gradient loop that
    `fuse_partition_copies_stage3` replaces."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Z3

    return _code_is(Z3, "partition_grads",
                    "contains_real_data = param.partition_numel() * self._get_param_partition_rank(param)"
                    " < param.ds_numel",
                    "self.__param_id_to_grad_partition[param.ds_id].narrow(0, 0, grad_partition.numel())",
                    "if self.micro_step_id == 0:  # don't accumulate",
                    "grad_buffer.copy_(grad_partition, non_blocking=True)",
                    "self._offload_boundary_param_ids.add(param.ds_id)")


def fuse_partition_copies_stage3(optimizer: Any) -> None:
    """`fuse_partition_copies` for DeepSpeed's ZeRO-3 optimizer: after each bucket's
    reduce-scatter, `partition_grads` copies every gradient partition into the rank's gradient
    buffer one `copy_` at a time; on the first micro-batch of a step (nothing to accumulate) this
    does the same copies as one `torch._foreach_copy_` and DeepSpeed's own bookkeeping per
    parameter (which partitions hold real data, the boundary set, freeing the gradient). Later
    micro-batches (accumulating adds) and the offloaded optimizer stay DeepSpeed's. It runs where
    DeepSpeed's loop ran, inside DeepSpeed's reduce-and-partition stream context, so the copies
    keep their place on that stream under `overlap_comm`. Same bytes in the same places:
    tests/test_faults.py runs DeepSpeed's loop beside it at 1 and 2 ranks.
    Measured at the 350m structure, world 2, rank 0: docs/benchmarks.md ("Operator launches per
    step")."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3) or getattr(optimizer, "offload_optimizer", True) \
            or not hasattr(optimizer, _STAGE3_GRAD_PARTITIONS) or not _stage3_copies_one_at_a_time():
        return
    ref, cls = weakref.ref(optimizer), type(optimizer)
    synchronized = get_accelerator().is_synchronized_device()

    def partition_grads(params_to_release, grad_partitions):
        opt = ref()
        if opt.micro_step_id != 0:
            return cls.partition_grads(opt, params_to_release, grad_partitions)
        by_id = getattr(opt, _STAGE3_GRAD_PARTITIONS)
        buffers, sources = [], []
        for param, grad_partition in zip(params_to_release, grad_partitions):
            if param.partition_numel() * opt._get_param_partition_rank(param) < param.ds_numel:
                opt._offload_boundary_param_ids.add(param.ds_id)
                buffers.append(by_id[param.ds_id].narrow(0, 0, grad_partition.numel()))
                sources.append(grad_partition)
                if not synchronized and param.grad is not None:
                    param.grad.record_stream(get_accelerator().current_stream())
            param.grad = None
        if buffers:
            torch._foreach_copy_(buffers, sources)
        return buffers

    optimizer.partition_grads = partition_grads
