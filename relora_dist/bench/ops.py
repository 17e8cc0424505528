"""Operator launches per training step (`tools/bench.py --count-ops`): a machine-independent proxy
for the host work of a step.

On an H200 the ReLoRA step ran 1.43-1.51x slower than the full-rank step at world 1 although its
matmul FLOPs are 0.878x: the step is host-bound, and its kernel count grew from 7,538 (full rank) to
12,736 (ReLoRA). Kernels cannot be counted on a CPU-only machine, but the aten operators that
launch them can, and their number does not depend on the machine.

What is counted: every operator that reaches a `TorchDispatchMode`, i.e. below autograd (composite
ops such as `linear` arrive already decomposed into `mm`/`addmm`; a backward formula arrives as the
ops it runs), counted once per call at the outermost level (the mode is switched off while an op
runs, so the ops a kernel calls internally are not counted again). Not counted, because they launch
no kernel on a GPU: views and other aliasing ops (every op whose schema returns an alias of an
input without writing it: view, t, transpose, slice, expand, detach, alias, as_strided, ...) and
metadata/allocation-only ops (`METADATA_ONLY`: _unsafe_view, empty, resize_, set_, ...; and the
profiler's record_function markers, which FSDP2 dispatches as ops around each of its hooks).
Collectives that dispatch as ops (c10d.*, FSDP2's foreach copy-in/out) are counted like aten ops.

Each op is attributed to a source:
* `forward`: model code under the engine's forward (transformers, the ReLoRA layers);
* `backward`: autograd's own kernels (run by the autograd engine, no Python frame in between);
* `hooks`: engine machinery inside forward or backward: any op whose innermost non-torch Python
  frame is in deepspeed/, torch/distributed/ or the project's backends/ (DeepSpeed's per-gradient
  hooks and bucket reductions, ZeRO-3 / FSDP2 parameter gathers and gradient reduce-scatters;
  DeepSpeed's ZeRO-3 replacement of F.linear is model math, not a hook);
* `step`: everything under the engine's step: optimizer, clipping and grad norm, overflow check;
* `other`: the rest of `Trainer.train_step` (batch transfer, loss averaging and its all-reduce).

Compiled decoder blocks (`train.compile`): torch.compile runs a graph's fused kernels as calls of
C++ functions (CPU inductor; Triton launches on a GPU) that never reach a dispatch mode, and by
default dynamo falls back to eager code while a dispatch mode is active, which would count the
eager ops. The counter therefore declares `ignore_compile_internals` (the compiled code runs, the
mode still sees what the graph dispatches: its extern matmuls `aten.mm.out`/`addmm.out` and any
fallback op), and `count_compiled_kernels` wraps every fused kernel of the generated modules so
that each call counts as one launch (`inductor::cpp_fused_*`), under the region it runs in
(forward, or backward for the compiled backward graph). One fused kernel is one launch on a GPU
too, but inductor's CPU and GPU fusion choices can differ; the count is the CPU graph's.

Caveat: an optimizer built with `foreach=False` (torch's default for CPU tensors) issues one op per
tensor where a GPU run's default `foreach=True` issues one `_foreach_*` op per group; under ZeRO the
optimizer steps over flat partitions (a few tensors), under FSDP2 over every sharded parameter, so
FSDP2's `step` count here is an upper bound of the GPU's launches.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SOURCES = ("forward", "backward", "hooks", "step", "other")

# Ops that only allocate or change metadata: no kernel launch on a GPU. (Views and aliases are
# recognised from the schema, see is_launch.)
METADATA_ONLY = frozenset({
    "_unsafe_view", "_reshape_alias", "empty", "empty_strided", "empty_like", "new_empty",
    "new_empty_strided", "resize_", "set_", "lift_fresh", "lift", "_has_compatible_shallow_copy_type",
    "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "record_stream",
})

# record_function markers (FSDP2 wraps its hooks in them): profiler bookkeeping, no kernel.
METADATA_NAMESPACES = frozenset({"profiler"})

_TORCH = os.path.dirname(torch.__file__) + os.sep
_TORCH_DIST = _TORCH + "distributed" + os.sep
_AUTOGRAD_ENGINE = (_TORCH + os.path.join("autograd", "graph.py"), "_engine_run_backward")
# The project's own engine code (backends/, e.g. the foreach copies that replace DeepSpeed's
# per-gradient ones, backends/zero_fused.py) is engine machinery as DeepSpeed's is.
_ENGINE_DIRS = (_TORCH_DIST, os.sep + "deepspeed" + os.sep, os.sep + os.path.join("relora_dist", "backends") + os.sep)
# DeepSpeed's ZeRO-3 replaces torch.nn.functional.linear by its own autograd Function (when the
# model is built inside its partitioning init context, memory_efficient_linear): its frames are the linear's math,
# not engine machinery, so they are skipped like torch's own frames.
_MODEL_MATH = (os.path.join("deepspeed", "runtime", "zero", "linear.py"),)

_launch_cache: dict[Any, bool] = {}


def is_launch(func: Any) -> bool:
    """Whether an op launches a kernel: not a view/alias (a return that aliases an input without
    writing it), not metadata- or allocation-only."""
    hit = _launch_cache.get(func)
    if hit is None:
        schema = func._schema
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        namespace, _, name = schema.name.rpartition("::")
        hit = _launch_cache[func] = not view and name not in METADATA_ONLY and namespace not in METADATA_NAMESPACES
    return hit


def _frame_source(region: str) -> str:
    """Source of an op dispatched now inside the forward or backward region (see module docstring):
    walk the Python stack from the innermost frame, skipping torch's own frames."""
    f = sys._getframe(3)  # the caller of the op: above _frame_source, _count and __torch_dispatch__
    while f is not None:
        path = f.f_code.co_filename
        if path.startswith(_TORCH):
            if path.startswith(_TORCH_DIST):
                return "hooks"
            if (path, f.f_code.co_name) == _AUTOGRAD_ENGINE:
                return "backward"  # called by the autograd engine itself: a backward kernel
            f = f.f_back
            continue
        if path.endswith(_MODEL_MATH):
            f = f.f_back
            continue
        if any(d in path for d in _ENGINE_DIRS):
            return "hooks"
        return region  # model code (or the trainer): the region's own work
    return "backward" if region == "backward" else region  # an autograd device thread: no Python frame


# The counter active now, for the kernels of compiled graphs (count_compiled_kernels).
_ACTIVE: list = [None]


def count_compiled_kernels() -> None:
    """From now on, wrap the fused kernels of every module inductor loads so that the active
    OpCounter counts each call as a launch (see the module docstring). Call it before the first
    compilation: modules loaded earlier stay unwrapped. Idempotent."""
    from torch._inductor.codecache import PyCodeCache

    if getattr(PyCodeCache, "_counts_kernels", False):
        return
    load = PyCodeCache.load_by_key_path.__func__

    def counted_load(cls, *args, **kwargs):
        module = load(cls, *args, **kwargs)
        for name, fn in list(vars(module).items()):
            if name.startswith("cpp_fused") and callable(fn) and not getattr(fn, "_counted", False):
                setattr(module, name, _counted_kernel(fn, name))
        return module

    PyCodeCache.load_by_key_path = classmethod(counted_load)
    PyCodeCache._counts_kernels = True


def _counted_kernel(fn: Callable, name: str) -> Callable:
    key = "inductor::" + name.rstrip("0123456789").rstrip("_")

    def kernel(*args):
        counter = _ACTIVE[0]
        if counter is not None and counter.enabled:
            counter.count_kernel(key)
        return fn(*args)
    kernel._counted = True
    return kernel


class OpCounter(TorchDispatchMode):
    """Counts kernel-launching ops by source while active and `enabled` (see module docstring).
    `region` is set by `instrument(engine)`; outside forward/backward/step it is `other`."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # compiled graphs run as compiled (not as eager code) while counting

    def __enter__(self):
        _ACTIVE[0] = self
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE[0] = None
        return super().__exit__(*exc)

    def count_kernel(self, key: str) -> None:
        """One call of a compiled graph's fused kernel: model code of the region it runs in."""
        self.by_source[self.region] += 1
        self.by_op[self.region][key] += 1

    def __init__(self) -> None:
        super().__init__()
        self.region = "other"
        self.enabled = True
        self.by_source: collections.Counter = collections.Counter()
        self.by_op: dict[str, collections.Counter] = {s: collections.Counter() for s in SOURCES}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.enabled and is_launch(func):
            self._count(func)
        return out

    def _count(self, func) -> None:
        region = self.region
        source = _frame_source(region) if region in ("forward", "backward") else region
        self.by_source[source] += 1
        self.by_op[source][str(func)] += 1

    def reset(self) -> None:
        self.by_source.clear()
        for c in self.by_op.values():
            c.clear()

    @contextlib.contextmanager
    def as_region(self, region: str) -> Iterator[None]:
        outer, self.region = self.region, region
        try:
            yield
        finally:
            self.region = outer


@contextlib.contextmanager
def instrument(engine: Any, counter: OpCounter) -> Iterator[None]:
    """Set `counter.region` around the engine's forward, backward and step (instance attributes
    over the class methods; DeepSpeed's engine and relora_dist's FSDPEngine alike). Afterwards the
    attributes are what they were: the collective counter's own wrappers (comm.track_engine) stay."""
    def wrap(name: str, region: str) -> Callable:
        method = getattr(engine, name)

        def wrapped(*args, **kwargs):
            with counter.as_region(region):
                return method(*args, **kwargs)
        return wrapped

    names = {"forward": "forward", "backward": "backward", "step": "step"}
    before = {name: engine.__dict__[name] for name in names if name in engine.__dict__}
    for name, region in names.items():
        engine.__dict__[name] = wrap(name, region)
    try:
        yield
    finally:
        for name in names:
            if name in before:
                engine.__dict__[name] = before[name]
            else:
                engine.__dict__.pop(name, None)


def count_steps(trainer: Any, steps: int) -> dict:
    """`steps` calls of `Trainer.train_step`, every op counted: per-step totals, the per-source
    counts per step (mean over the steps) and the 15 most frequent ops of each source."""
    counter = OpCounter()
    totals, per_source = [], collections.Counter()
    by_op: dict[str, collections.Counter] = {s: collections.Counter() for s in SOURCES}
    for _ in range(steps):
        batch = trainer.loader.next_batch()
        counter.reset()
        with instrument(trainer.engine, counter), counter:
            trainer.train_step(batch)
        totals.append(sum(counter.by_source.values()))
        per_source.update(counter.by_source)
        for s in SOURCES:
            by_op[s].update(counter.by_op[s])
    return {"steps": steps, "per_step": totals, "total": sum(totals) / steps,
            "by_source": {s: per_source[s] / steps for s in SOURCES},
            "top_ops": {s: {k: v / steps for k, v in by_op[s].most_common(15)} for s in SOURCES}}
