"""Collective byte counting for tools/bench.py.

torch.distributed's collectives (and the ones an engine bound at start-up outside it, which the
backend names: `Probe.collective_bindings`) are wrapped while the counter is installed; each call
counts the logical buffer it reduces or gathers on this rank (all_reduce/reduce/broadcast: the
tensor; reduce_scatter: the full input; all_gather: the full output). `track_engine` tags the calls
made inside the engine's forward / backward / step, so a step's gradient reductions (backward +
step) are told apart from parameter gathers (ZeRO-3 and FSDP2 fetches, ZeRO-2's post-step
all-gather) and from the rest (the trainer's loss all-reduce).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Any

import torch

# torch 2.13 added all_gather_single / reduce_scatter_single, which FSDP2 calls (not the *_tensor
# ones); one implemented through another counts once (the outermost call, see CommCounter).
REDUCE_OPS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
              "reduce_scatter_single", "all_reduce_coalesced")
GATHER_OPS = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_single", "broadcast")
OTHER_OPS = ("all_to_all_single", "all_to_all", "gather", "scatter")


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _payload(op: str, bound: dict) -> int:
    """Logical bytes of one collective on this rank: the (full) buffer reduced or gathered."""
    first = next(iter(bound.values()), None)
    if op in ("reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_single"):
        return _nbytes(bound.get("input", list(bound.values())[1] if len(bound) > 1 else None))
    if op == "reduce_scatter":
        return _nbytes(bound.get("input_list", list(bound.values())[1] if len(bound) > 1 else None))
    if op in ("all_gather_into_tensor", "_all_gather_base", "all_gather_single"):
        return _nbytes(bound.get("output_tensor", first))
    if op == "all_gather":
        return _nbytes(bound.get("tensor_list", first))
    if op in ("all_to_all_single", "all_to_all", "gather", "scatter"):
        return _nbytes(first)
    return _nbytes(bound.get("tensor", bound.get("tensors", first)))


class CommCounter:
    """Wraps the collectives while active; counts bytes and calls per (region, op).

    `region` is set by `track_engine` (forward / backward / step) or by the caller (e.g. "merge").
    Nested wrapped calls (one collective implemented through another) count once, at the outermost.
    """

    def __init__(self):
        self.region = "other"
        self.enabled = False
        self.records: dict[tuple[str, str], list[int]] = {}
        self._local = threading.local()
        self._patched: list[tuple[Any, str, Any]] = []
        self._wrappers: dict[int, Any] = {}

    # --- install / remove ---------------------------------------------------------------------
    def install(self) -> "CommCounter":
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for op in REDUCE_OPS + GATHER_OPS + OTHER_OPS:
            for ns in (dist, c10d):
                fn = getattr(ns, op, None)
                if fn is None or getattr(fn, "_bench_wrapped", False):
                    continue
                if id(fn) not in self._wrappers:
                    self._wrappers[id(fn)] = self._wrap(op, fn)
                self._patch(ns, op, self._wrappers[id(fn)])
        return self

    def install_bindings(self, bindings: list[tuple[Any, str, str]]) -> None:
        """Also wrap (owner, attribute, op) entries: collectives an engine bound outside
        torch.distributed (`Probe.collective_bindings`)."""
        for owner, attr, op in bindings:
            fn = getattr(owner, attr)
            if not getattr(fn, "_bench_wrapped", False):
                self._patch(owner, attr, self._wrappers.get(id(fn)) or self._wrap(op, fn))

    def _patch(self, owner: Any, name: str, new: Any) -> None:
        self._patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    def uninstall(self) -> None:
        for owner, name, old in reversed(self._patched):
            setattr(owner, name, old)
        self._patched.clear()

    def _wrap(self, op: str, fn: Any) -> Any:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            sig = None
        counter = self

        def wrapper(*args, **kwargs):
            depth = getattr(counter._local, "depth", 0)
            if counter.enabled and depth == 0:
                try:
                    bound = dict(sig.bind_partial(*args, **kwargs).arguments) if sig else {}
                except TypeError:
                    bound = {str(i): a for i, a in enumerate(args)}
                rec = counter.records.setdefault((counter.region, op), [0, 0])
                rec[0] += _payload(op, bound)
                rec[1] += 1
            counter._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter._local.depth = depth

        wrapper._bench_wrapped = True  # type: ignore[attr-defined]
        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    # --- use ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def region_as(self, name: str):
        old, self.region = self.region, name
        try:
            yield
        finally:
            self.region = old

    def reset(self) -> None:
        self.records = {}

    def summary(self, steps: int = 1) -> dict:
        """Bytes per step by kind (reduce/gather/other) and region, and per op."""
        out: dict[str, Any] = {"per_op": {}}
        kinds = {"reduce": REDUCE_OPS, "gather": GATHER_OPS, "other": OTHER_OPS}
        totals: dict[str, float] = {}
        for (region, op), (nbytes, calls) in sorted(self.records.items()):
            kind = next(k for k, ops in kinds.items() if op in ops)
            out["per_op"][f"{region}/{op}"] = {"bytes": nbytes / steps, "calls": calls / steps}
            totals[f"{kind}_{region}"] = totals.get(f"{kind}_{region}", 0.0) + nbytes / steps
        out.update(totals)
        out["grad_bytes"] = totals.get("reduce_backward", 0.0) + totals.get("reduce_step", 0.0)
        out["param_gather_bytes"] = sum(v for k, v in totals.items() if k.startswith("gather_"))
        out["param_gather_bytes_forward"] = totals.get("gather_forward", 0.0)
        # Every collective of the step, whatever its region (also the trainer's loss all-reduce and
        # the engine's grad-norm / overflow scalars): the denominator of comm_bytes_ratio.
        out["total_bytes"] = sum(totals.values())
        out["other_bytes"] = out["total_bytes"] - out["grad_bytes"] - out["param_gather_bytes"]
        return out


def track_engine(engine: Any, counter: CommCounter) -> None:
    """Tag collectives issued inside engine.forward / backward / step with that region (DeepSpeed
    engines and the FSDP2 backend's engine both train through these three methods)."""
    for name in ("forward", "backward", "step"):
        original = getattr(engine, name)

        def tagged(*args, __original=original, __name=name, **kwargs):
            with counter.region_as(__name):
                return __original(*args, **kwargs)

        setattr(engine, name, tagged)
