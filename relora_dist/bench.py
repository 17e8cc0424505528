"""Side-by-side benchmark of the two phases of a ReLoRA run (`tools/bench.py`).

For each ZeRO stage, one run of `world` real processes (gloo, DeepSpeed CPU accelerator on CPU)
builds ONE Trainer and measures, in this order and with the same model, batch and engine code:

1. full-rank steps (`Trainer.train_step`): step times, collective bytes, engine tensors, RSS;
2. `Trainer.switch_to_relora()` (timed; with `--override=--relora.phase_stage=3` a ZeRO-2 run
   continues under ZeRO-3 and `trainer.backend` is the new backend from here on);
3. ReLoRA steps: the same measurements;
4. resets as `Trainer.train` does them: a step, `Trainer.reset()` (= `relora_steps.relora_reset`:
   merge, re-init, prune, each timed), then `Trainer.rank_stats(measure=effective_rank_every >= 0)`
   (timed apart);
4b. ReLoRA steps again after the last reset, measured like 3: `post_reset_step_ratio` (a collective
   at a reset can leave every later step slower: at world size 1 a gloo all-gather makes libgomp
   throttle its spinning threads, seen as more voluntary context switches per step);
5. the merge alone: shard-local (`relora_steps.merge_adapters`) against gather-based merges
   (ZeRO-3: `deepspeed.zero.GatheredParameters(modifier_rank=0)` over each W, and an all-gather of
   each W's fp32 shard, full add, keep own slice), time and bytes moved; run right after a reset,
   where B = 0, so they leave the weights unchanged;
6. optionally the ReLoRA phase again with `relora.train_extra=false` (a third engine over the
   adapters only, built the way the switch builds the second one).

How things are counted (documented in docs/benchmarks.md):
- step time: `dist.barrier()` before each step, wall time per rank, max over ranks, median over
  the measured steps (after warm-up steps);
- state bytes: every distinct tensor storage reachable from the engine's ZeRO optimizer and from
  the module's parameters (`p.data`, `p.ds_tensor`, `p.grad`), read right after the last backward
  of a step (gradients alive, Adam state allocated), each storage counted once and attributed to
  params / grads / fp32 master / optimizer state; DeepSpeed's communication buckets (`ipg_*`, a
  `torch.empty` of reduce_bucket_size elements that is mostly never touched on CPU) and ZeRO-3
  params gathered at that moment are reported apart, not in the state; plus the fp32 merge
  masters (`trainer.masters.nbytes()`);
- communication: `torch.distributed` (and `torch.distributed.distributed_c10d`) collectives and
  the two functions DeepSpeed's comm backend binds at start-up are wrapped; each call counts the
  logical buffer it reduces or gathers on this rank (all_reduce/reduce/broadcast: the tensor;
  reduce_scatter: the full input; all_gather: the full output). Reductions during
  `engine.backward` + `engine.step` are the gradient bytes; all-gathers/broadcasts are parameter
  traffic (ZeRO-3 forward/backward fetches, ZeRO-2's post-step all-gather), reported apart;
- all collective bytes per step (`comm_bytes_ratio` = ReLoRA / full rank), split into gradient
  reductions, parameter gathers and the rest (loss all-reduce, grad-norm scalars);
- context switches: `getrusage(RUSAGE_SELF)` ru_nvcsw / ru_nivcsw deltas over the measured steps
  of each phase, per step (whole process: torch's OpenMP threads and gloo's);
- RSS: `resource.getrusage` ru_maxrss (cumulative over the process, so it can only grow) and the
  phase-local peak VmHWM after resetting it through /proc/self/clear_refs at the phase start.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# Targets (see docs/benchmarks.md for why each is what it is). Each is a ratio measured within one run, and each
# applies only to the configurations named in `judge` (elsewhere its verdict is not_applicable).
TARGETS = {
    "step_time_ratio": 0.75,  # ReLoRA / full-rank median step, presets 20m-60m
    "state_bytes_ratio_350m": 0.65,  # 350m, bf16, r=128, world 2: ZeRO-2, ZeRO-3, or ZeRO-2 with phase_stage=3
    "grad_bytes_vs_trainable_pp": 1.0,  # grad_bytes_ratio within this many points of trainable_fraction
    "reset_over_step": 1.0,  # 350m, bf16, r=128, ZeRO-2 and ZeRO-3
    "post_reset_step_ratio": 1.05,  # median step after the last reset / before the first; world 1-2, tiny/20m
    "comm_bytes_ratio_phase_stage3": 1.1,  # ZeRO-3 ReLoRA phase (phase_stage=3) vs ZeRO-2 full rank
}

# ------------------------------------------------------------------------------------------------
# Collective byte counting
# ------------------------------------------------------------------------------------------------

REDUCE_OPS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
              "all_reduce_coalesced")
GATHER_OPS = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "broadcast")
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
    if op in ("reduce_scatter_tensor", "_reduce_scatter_base"):
        return _nbytes(bound.get("input", list(bound.values())[1] if len(bound) > 1 else None))
    if op == "reduce_scatter":
        return _nbytes(bound.get("input_list", list(bound.values())[1] if len(bound) > 1 else None))
    if op in ("all_gather_into_tensor", "_all_gather_base"):
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

    # --- install / remove ---------------------------------------------------------------------
    def install(self) -> "CommCounter":
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        wrappers: dict[int, Any] = {}
        for op in REDUCE_OPS + GATHER_OPS + OTHER_OPS:
            for ns in (dist, c10d):
                fn = getattr(ns, op, None)
                if fn is None or getattr(fn, "_bench_wrapped", False):
                    continue
                if id(fn) not in wrappers:
                    wrappers[id(fn)] = self._wrap(op, fn)
                self._patch(ns, op, wrappers[id(fn)])
        try:  # DeepSpeed's TorchBackend binds these two at start-up (comm/torch.py)
            from deepspeed.comm import comm as ds_comm

            cdb = ds_comm.cdb
            for attr, op in (("all_gather_function", "all_gather_into_tensor"),
                             ("reduce_scatter_function", "reduce_scatter_tensor")):
                fn = getattr(cdb, attr, None) if cdb is not None else None
                if fn is not None and not getattr(fn, "_bench_wrapped", False):
                    self._patch(cdb, attr, wrappers.get(id(fn)) or self._wrap(op, fn))
        except ImportError:  # pragma: no cover - deepspeed is a dependency
            pass
        return self

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
        # DeepSpeed's grad-norm / overflow scalars): the denominator of comm_bytes_ratio.
        out["total_bytes"] = sum(totals.values())
        out["other_bytes"] = out["total_bytes"] - out["grad_bytes"] - out["param_gather_bytes"]
        return out


def track_engine(engine: Any, counter: CommCounter) -> None:
    """Tag collectives issued inside engine.forward / backward / step with that region."""
    for name in ("forward", "backward", "step"):
        original = getattr(engine, name)

        def tagged(*args, __original=original, __name=name, **kwargs):
            with counter.region_as(__name):
                return __original(*args, **kwargs)

        setattr(engine, name, tagged)


# ------------------------------------------------------------------------------------------------
# Engine tensors
# ------------------------------------------------------------------------------------------------

# A storage reached under several names is counted once, in the first of these categories (ZeRO-3
# with fp32 compute uses the param partition itself as the fp32 master: it counts as params).
_CATEGORY_ORDER = ("optimizer_state", "params", "fp32_master", "grads", "comm_buffers", "gathered_params",
                   "other")
STATE_CATEGORIES = ("params", "grads", "fp32_master", "optimizer_state")


def _walk(obj: Any, path: str, out: list, seen: set, depth: int = 0) -> None:
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        if obj.grad is not None:
            out.append((path + ".grad", obj.grad))
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            _walk(v, f"{path}[{'tensor' if isinstance(k, torch.Tensor) else k}]", out, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", out, seen, depth + 1)
    elif (hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type))
          and type(obj).__module__.startswith(("deepspeed", "torch.optim"))):
        for k, v in list(vars(obj).items()):
            _walk(v, f"{path}.{k}", out, seen, depth + 1)


def _category(path: str) -> str:
    top = path.split("[")[0]
    low = path.lower()
    if top.startswith("opt.optimizer.state"):
        return "optimizer_state"
    if top.startswith("opt.optimizer.param_groups"):  # the inner optimizer's params = fp32 flats
        return "fp32_master"
    if top in ("opt.single_partition_of_fp32_groups", "opt.fp32_partitioned_groups_flat"):
        return "grads" if path.endswith(".grad") else "fp32_master"
    if "ipg" in low or "bucket" in low:
        return "comm_buffers"
    if path.endswith(".grad") or "grad" in top.lower():
        return "grads"
    if path.startswith("module.") and path.endswith(".data") and "gathered" in path:
        return "gathered_params"
    if any(k in top for k in ("bit16", "fp16", "lp_param", "param", "module.")):
        return "params"
    return "other"


def engine_tensor_bytes(trainer: Any) -> dict:
    """Bytes per category of every distinct storage held by the engine and the module on this rank."""
    engine = trainer.engine
    found: list[tuple[str, torch.Tensor]] = []
    _walk(engine.optimizer, "opt", found, set())
    for name, p in trainer.model.named_parameters():
        if hasattr(p, "ds_tensor"):
            found.append((f"module.{name}.ds_tensor", p.ds_tensor))
            if p.data.numel() > 0:  # ZeRO-3 param gathered at this moment (transient)
                found.append((f"module.{name}.gathered.data", p.data))
        else:
            found.append((f"module.{name}.data", p.data))
        if p.grad is not None:
            found.append((f"module.{name}.grad", p.grad))
    claimed: dict[int, str] = {}
    sizes: dict[int, int] = {}
    for path, t in found:
        if t.device.type == "meta" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            continue
        # A ZeRO-3 param met outside the module walk (fp16_groups, param_dict): its .data is the
        # full tensor gathered at this moment, or empty; its partition is counted via ds_tensor.
        cat = "gathered_params" if (hasattr(t, "ds_tensor") and not path.startswith("module.")) else _category(path)
        if key not in claimed or _CATEGORY_ORDER.index(cat) < _CATEGORY_ORDER.index(claimed[key]):
            claimed[key] = cat
        sizes[key] = max(sizes.get(key, 0), storage.nbytes())
    out = {c: 0 for c in _CATEGORY_ORDER}
    for key, cat in claimed.items():
        out[cat] += sizes[key]
    from relora_dist.quant_steps import quantized_nbytes

    out["params"] += quantized_nbytes(trainer.modules)  # a quantized base: a replica outside the engine
    out["merge_masters"] = trainer.masters.nbytes() if trainer.masters is not None else 0
    out["state"] = sum(out[c] for c in STATE_CATEGORIES) + out["merge_masters"]
    # Accelerator-resident state: with relora.merge_master_device=cpu the fp32 merge masters live
    # in host memory (pinned on GPUs) and do not count against the accelerator. On a CPU-only run
    # (DeepSpeed's CPU accelerator, as on the benchmark machine) host and "device" are the same
    # memory, so this figure is only what a GPU run would hold on the device, not a saving here.
    on_host = trainer.cfg.relora.merge_master_device == "cpu"
    out["state_accelerator"] = out["state"] - (out["merge_masters"] if on_host else 0)
    return out


# ------------------------------------------------------------------------------------------------
# RSS
# ------------------------------------------------------------------------------------------------

def _proc_status_kb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:  # pragma: no cover - non-Linux
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:  # pragma: no cover - not permitted
        return False


def rss_report(phase_reset: bool) -> dict:
    hwm = _proc_status_kb("VmHWM")
    rss = _proc_status_kb("VmRSS")
    return {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "phase_peak_rss_mb": (hwm / 1024) if (hwm is not None and phase_reset) else None,
            "rss_mb": rss / 1024 if rss is not None else None}


# ------------------------------------------------------------------------------------------------
# Merges compared
# ------------------------------------------------------------------------------------------------

def gathered_params_merge(trainer: Any) -> None:
    """The reference-style merge on ZeRO-3: gather each W (GatheredParameters, modifier rank 0),
    rank 0 adds s*B*A, DeepSpeed broadcasts W and every rank keeps its partition."""
    import deepspeed

    backend = trainer.backend
    for m in trainer.modules.values():
        A, B = backend.full_fp32(m.lora_A), backend.full_fp32(m.lora_B)
        with deepspeed.zero.GatheredParameters([m.weight], modifier_rank=0):
            if backend.rank == 0:
                m.weight.data.add_((m.scale * (B @ A)).to(m.weight.dtype))


def allgather_merge(trainer: Any) -> None:
    """Gather-based merge that keeps fp32: all-gather each W's fp32 master slices, add s*B*A to the
    full W on every rank, write back this rank's master slice and its part of the compute copy.

    Each rank's fp32 merge master holds `backend.master_range(W)` (ZeRO-3: its own shard, =
    local_range; ZeRO-2: its `rank_slice` of the replicated W), which `gather_owned` reassembles.
    Without a separate master (fp32 compute: `alias`; merge_precision=bf16) the same slice of the
    compute copy is gathered instead."""
    backend, masters = trainer.backend, trainer.masters
    for name, m in trainer.modules.items():
        A, B = backend.full_fp32(m.lora_A), backend.full_fp32(m.lora_B)
        target = backend.local_view(m.weight)
        keep_master = masters is not None and not masters.alias and name in masters.shards
        owned = masters.shards[name] if keep_master else backend.owned_view(m.weight)
        full = backend.gather_owned(m.weight, owned.float().to(target.device))
        full += (m.scale * (B @ A)).reshape(-1).to(full.device)
        if keep_master:
            mstart, mend = backend.master_range(m.weight)
            owned.copy_(full[mstart:mend].to(owned.device))
        start, end = backend.local_range(m.weight)
        target.copy_(full[start:end].to(target.dtype))


# ------------------------------------------------------------------------------------------------
# One rank of one stage
# ------------------------------------------------------------------------------------------------

def _timed(fn, counter: CommCounter | None = None, region: str = "other") -> tuple[float, Any]:
    dt, _, result = _timed_cpu(fn, counter, region)
    return dt, result


def _timed_cpu(fn, counter: CommCounter | None = None, region: str = "other") -> tuple[float, float, Any]:
    """(wall s, this process's CPU s, result) of a collective-aligned call (barrier first)."""
    import torch.distributed as dist

    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    if counter is not None:
        with counter.region_as(region):
            result = fn()
    else:
        result = fn()
    return time.perf_counter() - t0, time.process_time() - c0, result


def _ctx_switches() -> tuple[int, int]:
    """(voluntary, involuntary) context switches of this process so far, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_nvcsw, ru.ru_nivcsw


def _run_steps(trainer: Any, counter: CommCounter, warmup: int, steps: int, snapshot: bool = True) -> dict:
    """warmup + measured steps (timed, collectives counted), then (with `snapshot`) one untimed
    step that reads the engine's tensors right after its last backward.

    Also the process's context switches over the measured steps (getrusage, every thread of the
    process: torch's OpenMP pool, gloo's threads): voluntary switches per step are the diagnostic
    of libgomp's throttled spinning (threads that sleep in futex waits instead of spinning)."""
    times, cpu_times = [], []
    counter.reset()
    ctx0 = None
    for i in range(warmup + steps):
        batch = trainer.loader.next_batch()
        counter.enabled = i >= warmup
        if i == warmup:
            ctx0 = _ctx_switches()
        dt, cpu, _ = _timed_cpu(lambda: trainer.train_step(batch))
        if i >= warmup:
            times.append(dt)
            cpu_times.append(cpu)
    ctx1 = _ctx_switches()
    counter.enabled = False
    comm = counter.summary(steps)
    snap: dict = {}
    if snapshot:
        trainer.train_step(trainer.loader.next_batch(),
                           before_update=lambda: snap.update(engine_tensor_bytes(trainer)))
    ctx = {"voluntary_per_step": (ctx1[0] - ctx0[0]) / steps if ctx0 else float("nan"),
           "involuntary_per_step": (ctx1[1] - ctx0[1]) / steps if ctx0 else float("nan")}
    return {"step_times": times, "step_cpu_times": cpu_times, "comm": comm, "state": snap,
            "ctx_switches": ctx, "loadavg": os.getloadavg()}


def _param_counts(trainer: Any) -> dict:
    def numel(p):
        return int(getattr(p, "ds_numel", p.numel()))

    mods = trainer.modules.values()
    adapters = {id(p) for m in mods for p in (m.lora_A, m.lora_B)}
    wrapped = {id(m.weight) for m in mods}
    params = list(trainer.model.parameters())
    return {"total": sum(numel(p) for p in params),
            "adapters": sum(numel(p) for p in params if id(p) in adapters),
            "wrapped": sum(numel(p) for p in params if id(p) in wrapped),
            "trainable": sum(numel(p) for p in params if p.requires_grad)}


def _patch_teardown_drop_bwd_fns(trainer: Any) -> None:
    """Experiment (--z3-bwd-hook-fix), not the engine's behaviour: DeepSpeed 0.19.8 caches the
    autograd Functions of its ZeRO-3 backward hooks on each submodule (`module.pre_bwd_fn`,
    `module.post_bwd_fn`, closed over the engine that registered them) and a later engine reuses
    them, so after the switch the backward hooks drive the torn-down engine's parameter coordinator.
    Dropping them at teardown lets the ReLoRA engine build its own."""
    original = trainer.backend.teardown_engine

    def teardown(engine):
        original(engine)
        for m in trainer.model.modules():
            for attr in ("pre_bwd_fn", "post_bwd_fn"):
                m.__dict__.pop(attr, None)
        trainer.backend.release_memory()

    trainer.backend.teardown_engine = teardown


def rank_main(args: dict, info: Any, out_path: Path) -> dict:
    """Everything one rank measures for one ZeRO stage (see the module docstring)."""
    import torch.distributed as dist

    from relora_dist import relora_steps as steps
    from relora_dist.config import load_config
    from relora_dist.ds_config import load_ds_template
    from relora_dist.relora import freeze_for_relora_phase
    from relora_dist.trainer import Trainer, param_groups

    counter = CommCounter().install()
    cfg = load_config(None, args["overrides"])
    template = load_ds_template(REPO_ROOT / "ds_configs" / f"zero{args['stage']}.json")
    res: dict[str, Any] = {"rank": info.rank, "stage": args["stage"]}
    t0 = time.perf_counter()
    trainer = Trainer(cfg, template, info)
    res["build_s"] = time.perf_counter() - t0
    mc = trainer.model_config
    res["seq_len"], res["train_extra"] = cfg.data.seq_len, cfg.relora.train_extra
    res["model"] = {"hidden_size": mc.hidden_size, "intermediate_size": mc.intermediate_size,
                    "num_layers": mc.num_hidden_layers, "num_heads": mc.num_attention_heads,
                    "vocab_size": mc.vocab_size, "r": cfg.relora.r, "precision": trainer.precision}
    res["run_config"] = {"world_size": info.world_size, "precision": trainer.precision,
                         "merge_master_device": cfg.relora.merge_master_device,
                         "phase_stage": str(cfg.relora.phase_stage),
                         "effective_rank_every": cfg.relora.effective_rank_every,
                         "torch_threads": torch.get_num_threads()}
    warmup, n = args["warmup"], args["steps"]

    if args.get("z3_bwd_hook_fix") and trainer.backend.stage == 3:
        _patch_teardown_drop_bwd_fns(trainer)

    # --- full rank ------------------------------------------------------------------------------
    track_engine(trainer.engine, counter)
    res["params_full_rank"] = _param_counts(trainer)
    reset_ok = reset_peak_rss()
    res["full_rank"] = _run_steps(trainer, counter, warmup, n)
    res["full_rank"]["rss"] = rss_report(reset_ok)

    # --- switch ---------------------------------------------------------------------------------
    dt, _ = _timed(trainer.switch_to_relora)
    res["switch_s"] = dt
    # The W_switch snapshot only serves the effective-rank diagnostic (not called here); it is not
    # training state. Record its size, then drop it so the phase's RSS shows the training state.
    res["snapshot_bytes"] = trainer.masters.snapshot_nbytes()
    # With relora.phase_stage=3 the switch replaced trainer.backend (ZeRO-2 -> ZeRO-3): from here on
    # every backend call goes through trainer.backend as it is now.
    res["relora_stage"] = trainer.backend.stage
    at_switch, trainer.masters.at_switch = trainer.masters.at_switch, {}
    trainer.backend.release_memory()
    track_engine(trainer.engine, counter)
    res["params_relora"] = _param_counts(trainer)
    reset_ok = reset_peak_rss()
    res["relora"] = _run_steps(trainer, counter, warmup, n)
    res["relora"]["rss"] = rss_report(reset_ok)

    # --- resets, as Trainer.train does them ------------------------------------------------------
    # The step at LR 0, then Trainer.reset() and Trainer.rank_stats(measure=effective_rank_every >= 0)
    # (the effective-rank diagnostic: an all-gather of each W's delta, SVDs on rank 0), which needs
    # the W_switch snapshot dropped above for the ReLoRA phase's RSS: put it back.
    trainer.masters.at_switch = at_switch
    del at_switch
    measure = cfg.relora.effective_rank_every >= 0
    resets = []
    for _ in range(args["resets"]):
        _timed(lambda: None)
        timings = trainer.reset()
        t0 = time.perf_counter()
        trainer.rank_stats(measure=measure)
        timings["rank_stats"] = time.perf_counter() - t0
        resets.append(timings)
        trainer.train_step(trainer.loader.next_batch())
    res["resets"] = resets
    res["rank_stats_measured"] = measure

    # --- ReLoRA steps after the last reset: same measure as before the first ----------------------
    # A collective at a reset can leave the process slower for good (at world 1, gloo threads that
    # run OpenMP regions make libgomp manage more threads than cores and throttle its spinning).
    res["relora_post_reset"] = _run_steps(trainer, counter, warmup, n, snapshot=False)

    # --- merge alone: shard-local vs gather-based (right after a reset: B = 0, weights unchanged)
    _timed(trainer.reset)
    merges: dict[str, dict] = {}
    variants = {"shard_local": lambda: steps.merge_adapters(trainer.backend, trainer.modules, trainer.masters)}
    if trainer.backend.stage == 3:
        variants["allgather_fp32"] = lambda: allgather_merge(trainer)
        variants["gathered_params"] = lambda: gathered_params_merge(trainer)
    for name, fn in variants.items():
        times = []
        for _ in range(args["merge_repeats"]):
            counter.reset()
            counter.enabled = True
            dt, _ = _timed(fn, counter, "merge")
            counter.enabled = False
            times.append(dt)
        summ = counter.summary(1)
        merges[name] = {"times": times, "bytes": sum(v["bytes"] for v in summ["per_op"].values()),
                        "per_op": summ["per_op"]}
    res["merge"] = merges

    # --- ReLoRA phase with train_extra=false: a third engine over the adapters only --------------
    if args["train_extra_false"] and cfg.relora.train_extra:
        trainer.backend.teardown_engine(trainer.engine)
        trainer.engine = None
        trainer.backend.release_memory()
        freeze_for_relora_phase(trainer.model, False)
        trainer.engine = trainer.backend.build_engine(trainer.model,
                                                      param_groups(trainer.model, cfg, cfg.relora_lr, trainer.backend.shape))
        track_engine(trainer.engine, counter)
        res["params_relora_no_extra"] = _param_counts(trainer)
        reset_ok = reset_peak_rss()
        res["relora_no_extra"] = _run_steps(trainer, counter, warmup, n)
        res["relora_no_extra"]["rss"] = rss_report(reset_ok)

    counter.uninstall()
    out_path.write_text(json.dumps(res))
    dist.barrier()
    return res


def _worker(rank: int, world: int, port: int, args: dict, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(args["threads"])
    import torch.distributed as dist

    from relora_dist.dist import init_distributed

    info = init_distributed(timeout_s=600)
    try:
        rank_main(args, info, Path(out_dir) / f"rank{rank}.json")
    finally:
        dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

def _overrides(a: argparse.Namespace, data_dir: str, out_dir: str) -> list[str]:
    world = a.world_size
    # Only train_step / switch_to_relora / reset are called, never train(): the schedule keys just
    # have to validate. Long phases keep the LR away from 0 during the measured steps.
    o = {"model.preset": a.preset, "data.prepared_dir": data_dir, "data.seq_len": a.seq_len,
         "train.micro_batch_size": a.micro_batch, "train.global_batch_size": a.micro_batch * world * a.grad_accum,
         "train.precision": a.precision, "train.eval_every": 0, "relora.r": a.rank,
         "relora.train_extra": str(a.train_extra).lower(), "relora.warm_start_steps": 1000,
         "relora.cycle_length": 1000, "train.max_steps": 2000, "logging.progress_bar": "false",
         "logging.tensorboard": "false", "run.output_dir": out_dir, "run.export_warm_start": "false",
         "checkpoint.resume": "", "train.seed": 0}
    if a.layers:
        o["model.num_layers"] = a.layers
    if a.base_quant != "none":
        o["relora.base_quant"] = a.base_quant
    return [f"--{k}={v}" for k, v in o.items()] + list(a.override or [])


def run_stage(a: argparse.Namespace, stage: int, data_dir: str) -> list[dict]:
    import torch.multiprocessing as mp

    from relora_dist.dist import free_port

    with tempfile.TemporaryDirectory(prefix=f"bench_z{stage}_") as tmp:
        args = {"stage": stage, "overrides": _overrides(a, data_dir, str(Path(tmp) / "run")),
                "warmup": a.warmup, "steps": a.steps, "resets": a.resets, "merge_repeats": a.merge_repeats,
                "train_extra_false": a.train_extra_false, "threads": a.threads,
                "z3_bwd_hook_fix": a.z3_bwd_hook_fix}
        mp.spawn(_worker, args=(a.world_size, free_port(), args, tmp), nprocs=a.world_size, join=True)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(a.world_size)]


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _step_median(ranks: list[dict], phase: str) -> float:
    per_step = [max(r[phase]["step_times"][i] for r in ranks) for i in range(len(ranks[0][phase]["step_times"]))]
    return _median(per_step)


def _spread(ranks: list[dict], phase: str) -> float:
    """(max - min) / median of the per-step wall times: how noisy the phase's timing was."""
    per_step = [max(r[phase]["step_times"][i] for r in ranks) for i in range(len(ranks[0][phase]["step_times"]))]
    return (max(per_step) - min(per_step)) / _median(per_step)


def expected_flops_ratio(model: dict, seq_len: int, train_extra: bool) -> float:
    """ReLoRA / full-rank training FLOPs per token, counting matmuls as 2 x params per token and
    pass: forward 2, input-gradient 2, weight-gradient 2 (only for trainable weights); the
    adapters add their own 6 x (r*in + out*r); attention scores 12 x layers x hidden x seq either way."""
    h, i, L, V, r = (model["hidden_size"], model["intermediate_size"], model["num_layers"], model["vocab_size"],
                     model["r"])
    wrapped = L * (4 * h * h + 3 * h * i)
    adapters = L * r * (11 * h + 3 * i)
    attn = 12 * L * h * seq_len
    full = 6 * wrapped + 6 * V * h + attn
    relora = 4 * wrapped + (6 if train_extra else 4) * V * h + 6 * adapters + attn
    return relora / full


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None when b is 0 (e.g. no gradient reduction at world size 1)."""
    return a / b if b else None


def _max_rank(ranks: list[dict], phase: str, key: str) -> float:
    return max(r[phase]["state"][key] for r in ranks)


def _mean_rank_comm(ranks: list[dict], phase: str, key: str) -> float:
    return sum(r[phase]["comm"].get(key, 0.0) for r in ranks) / len(ranks)


def summarize_stage(ranks: list[dict]) -> dict:
    """Ratios of one stage from its ranks' measurements."""
    r0 = ranks[0]
    phases = ("full_rank", "relora", "relora_post_reset")
    out: dict[str, Any] = {"model": r0["model"], "params_full_rank": r0["params_full_rank"],
                           "params_relora": r0["params_relora"], "build_s": max(r["build_s"] for r in ranks),
                           "switch_s": max(r["switch_s"] for r in ranks),
                           # ZeRO stage of the ReLoRA phase (3 for a ZeRO-2 run with relora.phase_stage=3)
                           "relora_stage": r0["relora_stage"], "run_config": r0["run_config"]}
    fr, rl = _step_median(ranks, "full_rank"), _step_median(ranks, "relora")
    out["step_time_full_rank_s"], out["step_time_relora_s"] = fr, rl
    out["step_time_ratio"] = rl / fr
    # ReLoRA steps after the last reset (Trainer.reset + rank_stats, as in training) against the
    # ReLoRA steps before the first: 1.0 unless a reset leaves the process slower.
    pr = _step_median(ranks, "relora_post_reset")
    out["step_time_post_reset_s"] = pr
    out["post_reset_step_ratio"] = pr / rl
    cpu = {ph: _median([sum(r[ph]["step_cpu_times"][i] for r in ranks) / len(ranks)
                        for i in range(len(r0[ph]["step_cpu_times"]))]) for ph in ("full_rank", "relora")}
    out["step_cpu_time_full_rank_s"], out["step_cpu_time_relora_s"] = cpu["full_rank"], cpu["relora"]
    out["step_cpu_time_ratio"] = cpu["relora"] / cpu["full_rank"]
    out["step_time_spread"] = {ph: _spread(ranks, ph) for ph in phases}
    # Raw per-step figures (wall: slowest rank; CPU: mean over ranks) so the JSON can be re-read.
    out["step_times_s"] = {ph: [max(r[ph]["step_times"][i] for r in ranks) for i in range(len(r0[ph]["step_times"]))]
                           for ph in phases}
    out["step_cpu_times_s"] = {ph: [sum(r[ph]["step_cpu_times"][i] for r in ranks) / len(ranks)
                                    for i in range(len(r0[ph]["step_cpu_times"]))] for ph in phases}
    out["post_reset_step_cpu_ratio"] = (_median(out["step_cpu_times_s"]["relora_post_reset"])
                                        / _median(out["step_cpu_times_s"]["relora"]))
    # Context switches per measured step (whole process, mean over ranks, and per rank).
    out["ctx_switches_per_step"] = {
        ph: {"voluntary": sum(r[ph]["ctx_switches"]["voluntary_per_step"] for r in ranks) / len(ranks),
             "involuntary": sum(r[ph]["ctx_switches"]["involuntary_per_step"] for r in ranks) / len(ranks),
             "voluntary_per_rank": [r[ph]["ctx_switches"]["voluntary_per_step"] for r in ranks]}
        for ph in phases}
    out["step_time_min_ratio"] = min(out["step_times_s"]["relora"]) / min(out["step_times_s"]["full_rank"])
    out["loadavg_1min"] = {ph: r0[ph]["loadavg"][0] for ph in phases}
    out["flops_ratio_expected"] = expected_flops_ratio(r0["model"], r0["seq_len"], r0["train_extra"])
    cats = list(_CATEGORY_ORDER) + ["merge_masters", "state", "state_accelerator"]
    out["state_bytes_per_rank"] = {ph: {c: _max_rank(ranks, ph, c) for c in cats}
                                   for ph in ("full_rank", "relora")}
    out["state_bytes_all_ranks"] = {ph: [r[ph]["state"] for r in ranks] for ph in ("full_rank", "relora")}
    out["state_bytes_ratio"] = out["state_bytes_per_rank"]["relora"]["state"] / out["state_bytes_per_rank"]["full_rank"]["state"]
    rl_state = out["state_bytes_per_rank"]["relora"]
    out["state_bytes_ratio_without_merge_masters"] = ((rl_state["state"] - rl_state["merge_masters"])
                                                      / out["state_bytes_per_rank"]["full_rank"]["state"])
    # What stays on the accelerator: without the merge masters when relora.merge_master_device=cpu,
    # else = state_bytes_ratio (on this CPU-only machine both are the same host memory).
    out["state_bytes_ratio_accelerator"] = (rl_state["state_accelerator"]
                                            / out["state_bytes_per_rank"]["full_rank"]["state_accelerator"])
    out["snapshot_bytes_per_rank"] = max(r["snapshot_bytes"] for r in ranks)
    out["rss_per_rank"] = {ph: [r[ph]["rss"] for r in ranks] for ph in ("full_rank", "relora")}
    peaks = {ph: [x["phase_peak_rss_mb"] for x in out["rss_per_rank"][ph]] for ph in ("full_rank", "relora")}
    if all(v is not None for ph in peaks.values() for v in ph):
        out["peak_rss_ratio"] = max(peaks["relora"]) / max(peaks["full_rank"])
    comm = {ph: {k: _mean_rank_comm(ranks, ph, k) for k in
                 ("grad_bytes", "param_gather_bytes", "param_gather_bytes_forward", "other_bytes", "total_bytes")}
            for ph in phases}
    out["comm_bytes_per_step"] = comm
    out["comm_per_op"] = {ph: r0[ph]["comm"]["per_op"] for ph in phases}
    out["grad_bytes_ratio"] = _ratio(comm["relora"]["grad_bytes"], comm["full_rank"]["grad_bytes"])
    # All collective bytes per ReLoRA step / per full-rank step (with relora.phase_stage=3 on a
    # ZeRO-2 run: a ZeRO-3 ReLoRA phase against ZeRO-2 full rank), and the parts of it.
    out["comm_bytes_ratio"] = _ratio(comm["relora"]["total_bytes"], comm["full_rank"]["total_bytes"])
    out["comm_bytes_breakdown"] = {
        part: {"full_rank": comm["full_rank"][key], "relora": comm["relora"][key],
               "ratio": _ratio(comm["relora"][key], comm["full_rank"][key]),
               "share_of_full_rank_total": _ratio(comm["full_rank"][key], comm["full_rank"]["total_bytes"]),
               "share_of_relora_total": _ratio(comm["relora"][key], comm["relora"]["total_bytes"])}
        for part, key in (("grad_reductions", "grad_bytes"), ("param_gathers", "param_gather_bytes"),
                          ("other", "other_bytes"))}
    out["param_gather_bytes_ratio"] = (comm["relora"]["param_gather_bytes"] / comm["full_rank"]["param_gather_bytes"]
                                       if comm["full_rank"]["param_gather_bytes"] else None)
    pf, pr = r0["params_full_rank"], r0["params_relora"]
    out["trainable_fraction"] = pr["trainable"] / pf["trainable"]
    out["trainable_fraction_of_all_params"] = pr["trainable"] / pr["total"]
    parts = {k: _median([max(r["resets"][i][k] for r in ranks) for i in range(len(r0["resets"]))])
             for k in ("merge", "reinit", "prune", "total")}
    out["reset_s"] = parts
    out["rank_stats_s"] = _median([max(r["resets"][i].get("rank_stats", 0.0) for r in ranks)
                                   for i in range(len(r0["resets"]))])
    out["rank_stats_measured"] = r0["rank_stats_measured"]
    out["resets_done"] = len(r0["resets"])
    out["reset_over_step"] = parts["total"] / rl
    out["reset_parts_over_step"] = {k: v / rl for k, v in parts.items() if k != "total"}
    out["merge"] = {name: {"time_s": _median([max(r["merge"][name]["times"][i] for r in ranks)
                                              for i in range(len(r0["merge"][name]["times"]))]),
                           "bytes_per_rank": sum(r["merge"][name]["bytes"] for r in ranks) / len(ranks)}
                    for name in r0["merge"]}
    if "gathered_params" in out["merge"]:
        base = out["merge"]["shard_local"]
        for name in ("gathered_params", "allgather_fp32"):
            m = out["merge"][name]
            m["time_vs_shard_local"] = m["time_s"] / base["time_s"]
            m["bytes_vs_shard_local"] = m["bytes_per_rank"] / base["bytes_per_rank"] if base["bytes_per_rank"] else None
    if "relora_no_extra" in r0:
        pn = r0["params_relora_no_extra"]
        ne = _step_median(ranks, "relora_no_extra")
        st_ne = max(r["relora_no_extra"]["state"]["state"] for r in ranks)
        g_ne = _mean_rank_comm(ranks, "relora_no_extra", "grad_bytes")
        out["train_extra_false"] = {
            "step_time_s": ne, "step_time_ratio": ne / fr,
            "step_cpu_time_ratio": _median([sum(r["relora_no_extra"]["step_cpu_times"][i] for r in ranks) / len(ranks)
                                            for i in range(len(r0["relora_no_extra"]["step_cpu_times"]))])
            / cpu["full_rank"],
            "flops_ratio_expected": expected_flops_ratio(r0["model"], r0["seq_len"], False),
            "state_bytes_per_rank": {c: max(r["relora_no_extra"]["state"][c] for r in ranks) for c in cats},
            "state_bytes_ratio": st_ne / out["state_bytes_per_rank"]["full_rank"]["state"],
            "grad_bytes_per_step": g_ne, "grad_bytes_ratio": _ratio(g_ne, comm["full_rank"]["grad_bytes"]),
            "trainable_fraction": pn["trainable"] / pf["trainable"],
            "rss_per_rank": [r["relora_no_extra"]["rss"] for r in ranks]}
    return out


def _verdict(value: float | None, limit: float, target: str, applicable: bool, reason) -> dict:
    """value / target / status (met, missed, not_applicable) / reason (measured; when over the limit)."""
    if value is None:
        return {"value": None, "target": target, "status": "not_applicable", "reason": reason()}
    over = value > limit
    return {"value": value, "target": target,
            "status": ("missed" if over else "met") if applicable else "not_applicable",
            "reason": reason() if over else ""}


def judge(stage: int, s: dict, preset: str) -> dict:
    """met / missed / not_applicable for each target, with the reason when not met."""
    verdicts: dict[str, dict] = {}
    m, rc = s["model"], s["run_config"]
    world, rstage = rc["world_size"], s["relora_stage"]
    paper_350m = preset == "350m" and m["precision"] == "bf16" and m["r"] == 128
    stage_name = f"ZeRO-{stage}" + (" with relora.phase_stage=3" if rstage != stage else "")

    applicable = preset in ("20m", "60m")
    verdicts["step_time_ratio"] = _verdict(
        s["step_time_ratio"], TARGETS["step_time_ratio"], f"<= {TARGETS['step_time_ratio']} (20M-60M presets)",
        applicable, lambda: _step_reason(s))

    sb = s["state_bytes_ratio"]
    verdicts["state_bytes_ratio"] = _verdict(
        sb, TARGETS["state_bytes_ratio_350m"],
        f"<= {TARGETS['state_bytes_ratio_350m']} for 350M, bf16, r=128, world 2 (ZeRO-2, ZeRO-3 or phase_stage=3)",
        paper_350m and world == 2, lambda: _state_reason(stage, s))
    verdicts["state_bytes_ratio"]["value_accelerator"] = s["state_bytes_ratio_accelerator"]
    verdicts["state_bytes_ratio"]["merge_master_device"] = rc["merge_master_device"]
    verdicts["state_bytes_ratio"]["stage"] = stage_name

    gbr = s["grad_bytes_ratio"]
    gap = 100 * abs(gbr - s["trainable_fraction"]) if gbr is not None else None
    verdicts["grad_bytes_ratio"] = _verdict(
        gap, TARGETS["grad_bytes_vs_trainable_pp"],
        f"within {TARGETS['grad_bytes_vs_trainable_pp']} pp of trainable_fraction", True,
        lambda: ("no gradient reduction in the full-rank phase (world size 1)" if gap is None else
                 "extra reductions (grad-norm / overflow scalars, bucket padding) weigh more than 1 pp at this size"))
    verdicts["grad_bytes_ratio"].update(value=gbr, trainable_fraction=s["trainable_fraction"], gap_pp=gap)

    ro = s["reset_over_step"]
    parts = s["reset_parts_over_step"]

    def reset_reason() -> str:
        reason = "parts/step: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
        if parts["merge"] > 0.5:
            reason += "; the merge (s*B*A on this rank's range of every W, then the cast into the compute copy) dominates"
        if parts["prune"] > 0.5:
            reason += "; the prune gathers each adapter moment in full and takes a k-th value per tensor"
        return reason + f"; the step it is compared with takes {s['step_time_relora_s']:.3f} s"

    verdicts["reset_over_step"] = _verdict(
        ro, TARGETS["reset_over_step"], f"<= {TARGETS['reset_over_step']} (350M, bf16, r=128, ZeRO-2 and ZeRO-3)",
        paper_350m, reset_reason)

    verdicts["post_reset_step_ratio"] = _verdict(
        s["post_reset_step_ratio"], TARGETS["post_reset_step_ratio"],
        f"<= {TARGETS['post_reset_step_ratio']} (world 1 and 2, tiny and 20m presets)",
        preset in ("tiny", "20m") and world in (1, 2), lambda: _post_reset_reason(s))

    cb = s["comm_bytes_ratio"]

    def comm_reason() -> str:
        if cb is None:
            return "no collective bytes counted in the full-rank phase"
        parts = s["comm_bytes_breakdown"]
        mib = 2 ** 20
        return (f"ZeRO-{rstage} ReLoRA vs ZeRO-{stage} full rank, MiB/step/rank: " + "; ".join(
            f"{k} {v['full_rank'] / mib:.2f} -> {v['relora'] / mib:.2f}" for k, v in parts.items())
            + " (ZeRO-3 all-gathers every parameter in forward and again in backward, frozen ones included)")

    verdicts["comm_bytes_ratio"] = _verdict(
        cb, TARGETS["comm_bytes_ratio_phase_stage3"],
        f"<= {TARGETS['comm_bytes_ratio_phase_stage3']} (ZeRO-2 run with relora.phase_stage=3)",
        stage == 2 and rstage == 3, comm_reason)

    if "train_extra_false" in s:
        te = s["train_extra_false"]
        verdicts["step_time_ratio_train_extra_false"] = _verdict(
            te["step_time_ratio"], TARGETS["step_time_ratio"], f"<= {TARGETS['step_time_ratio']} (20M-60M presets)",
            applicable, lambda: (f"matmul FLOPs alone give {te['flops_ratio_expected']:.2f}; CPU-time ratio "
                                 f"{te['step_cpu_time_ratio']:.2f}"))
    return verdicts


def _post_reset_reason(s: dict) -> str:
    rc, cs = s["run_config"], s["ctx_switches_per_step"]
    pre, post = cs["relora"]["voluntary"], cs["relora_post_reset"]["voluntary"]
    why = (f"median ReLoRA step {s['step_time_post_reset_s']:.3f} s after {s['resets_done']} "
           f"resets vs {s['step_time_relora_s']:.3f} s before (CPU-time ratio {s['post_reset_step_cpu_ratio']:.2f}); "
           f"voluntary context switches per step {pre:.0f} before, {post:.0f} after (involuntary "
           f"{cs['relora']['involuntary']:.0f} / {cs['relora_post_reset']['involuntary']:.0f}); "
           f"{rc['torch_threads']} torch threads per rank x {rc['world_size']} ranks on {os.cpu_count()} cores; "
           f"resets ran Trainer.reset()"
           + (" + Trainer.rank_stats(measure=True)" if s.get("rank_stats_measured") else "")
           + f"; step-time spread before {s['step_time_spread']['relora']:.0%}, after "
           f"{s['step_time_spread']['relora_post_reset']:.0%}; 1-min load average "
           f"{s['loadavg_1min']['relora_post_reset']:.1f}")
    throttled = post > 1.5 * max(pre, 1.0)
    if not throttled and s["post_reset_step_cpu_ratio"] - 1 < 0.5 * (s["post_reset_step_ratio"] - 1):
        why += ("; CPU time per step grew far less than wall time and voluntary switches did not rise: the extra "
                "wall time is waiting (other processes on the cores, or ranks waiting for each other), not "
                "slower compute")
    if throttled:
        why += ("; the rise in voluntary switches is the sign of OpenMP threads that sleep instead of spinning "
                "(libgomp throttles when it manages more threads than cores, e.g. after gloo threads ran OpenMP "
                "regions in a collective at the reset)")
    return why


def _step_reason(s: dict) -> str:
    m = s["model"]
    return (f"counting matmul FLOPs alone this shape gives {s['flops_ratio_expected']:.2f} "
            f"(freezing W drops only the weight-gradient GEMM of the wrapped linears; with train_extra the "
            f"{m['vocab_size']}x{m['hidden_size']} lm_head keeps all three GEMMs and the r={m['r']} adapters add "
            f"theirs); CPU-time ratio {s['step_cpu_time_ratio']:.2f}; step-time spread "
            f"{max(s['step_time_spread'].values()):.0%}, 1-min load average "
            f"{max(s['loadavg_1min'].values()):.1f} on {os.cpu_count()} cores")


def _state_reason(stage: int, s: dict) -> str:
    rl = s["state_bytes_per_rank"]["relora"]
    rstage = s["relora_stage"]
    frac = rl["params"] / rl["state"] if rl["state"] else 0
    why = (f"the frozen compute weights stay resident ({frac:.0%} of the ReLoRA-phase state; "
           f"{'replicated on every rank under ZeRO-2' if rstage == 2 else 'sharded under ZeRO-3'})")
    if rl["merge_masters"]:
        why += (f", plus {rl['merge_masters'] / 2**20:.0f} MiB of fp32 merge masters (this rank's range of every "
                f"frozen W, sharded under ZeRO-2 and ZeRO-3 alike; without them the ratio would be "
                f"{s['state_bytes_ratio_without_merge_masters']:.3f}"
                + (", and they sit in host memory with merge_master_device=cpu: accelerator ratio "
                   f"{s['state_bytes_ratio_accelerator']:.3f}" if s["run_config"]["merge_master_device"] == "cpu"
                   else "") + ")")
    why += "; ZeRO already shards grads, fp32 masters and Adam moments over the ranks, so freezing W saves less than without sharding"
    why += f"; trainable fraction {s['trainable_fraction']:.1%} (embeddings/lm_head with train_extra)"
    return why


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def format_table(result: dict) -> str:
    lines = []
    for stage, s in result["stages"].items():
        m = s["model"]
        rstage = s["relora_stage"]
        lines.append(f"ZeRO-{stage}" + (f" (ReLoRA phase ZeRO-{rstage})" if str(rstage) != stage else "")
                     + f" | preset {result['config']['preset']} ({s['params_full_rank']['total'] / 1e6:.1f}M "
                     f"params incl. adapters, hidden {m['hidden_size']}, {m['num_layers']} layers, vocab "
                     f"{m['vocab_size']}, r {m['r']}, {m['precision']}) | world {result['config']['world_size']}")
        lines.append(f"| metric | full-rank | ReLoRA | ratio | target | status |")
        lines.append("|---|---|---|---|---|---|")
        v = s["verdicts"]
        sb = s["state_bytes_per_rank"]
        cm = s["comm_bytes_per_step"]

        def row(name, a, b, ratio, key):
            t = v.get(key, {})
            lines.append(f"| {name} | {a} | {b} | {ratio} | {t.get('target', '')} | {t.get('status', '')} |")

        row("step time (median, s)", f"{s['step_time_full_rank_s']:.3f}", f"{s['step_time_relora_s']:.3f}",
            f"{s['step_time_ratio']:.3f}", "step_time_ratio")
        if "step_times_s" in s:
            row("step time (fastest step, s)", f"{min(s['step_times_s']['full_rank']):.3f}",
                f"{min(s['step_times_s']['relora']):.3f}", f"{s['step_time_min_ratio']:.3f}", "")
        row("step CPU time (median, s; ratio)", f"{s['step_cpu_time_full_rank_s']:.3f}",
            f"{s['step_cpu_time_relora_s']:.3f}", f"{s['step_cpu_time_ratio']:.3f}", "")
        row("matmul FLOPs ratio (analytic)", "", "", f"{s['flops_ratio_expected']:.3f}", "")
        row("state bytes / rank (MiB)", f"{sb['full_rank']['state'] / 2**20:.1f}", f"{sb['relora']['state'] / 2**20:.1f}",
            f"{s['state_bytes_ratio']:.3f}", "state_bytes_ratio")
        if s["run_config"]["merge_master_device"] == "cpu":
            row("  on the accelerator (MiB; masters on host)", f"{sb['full_rank']['state_accelerator'] / 2**20:.1f}",
                f"{sb['relora']['state_accelerator'] / 2**20:.1f}", f"{s['state_bytes_ratio_accelerator']:.3f}", "")
        for c in ("params", "grads", "fp32_master", "optimizer_state", "merge_masters"):
            row(f"  {c} (MiB)", f"{sb['full_rank'][c] / 2**20:.1f}", f"{sb['relora'][c] / 2**20:.1f}", "", "")
        pk = {ph: max((x["phase_peak_rss_mb"] or float('nan')) for x in s["rss_per_rank"][ph]) for ph in ("full_rank", "relora")}
        row("peak RSS / rank, phase (MiB)", f"{pk['full_rank']:.0f}", f"{pk['relora']:.0f}",
            f"{s.get('peak_rss_ratio', float('nan')):.3f}", "")
        row("grad bytes / step / rank (MiB)", f"{cm['full_rank']['grad_bytes'] / 2**20:.2f}",
            f"{cm['relora']['grad_bytes'] / 2**20:.2f}", _fmt(s['grad_bytes_ratio'], 4), "grad_bytes_ratio")
        row("trainable params", f"{s['params_full_rank']['trainable']:,}", f"{s['params_relora']['trainable']:,}",
            f"{s['trainable_fraction']:.4f}", "")
        row("param gather bytes / step / rank (MiB)", f"{cm['full_rank']['param_gather_bytes'] / 2**20:.2f}",
            f"{cm['relora']['param_gather_bytes'] / 2**20:.2f}",
            f"{s['param_gather_bytes_ratio']:.3f}" if s["param_gather_bytes_ratio"] else "", "")
        row("all collective bytes / step / rank (MiB)", f"{cm['full_rank']['total_bytes'] / 2**20:.2f}",
            f"{cm['relora']['total_bytes'] / 2**20:.2f}", _fmt(s["comm_bytes_ratio"]), "comm_bytes_ratio")
        cs = s["ctx_switches_per_step"]
        lines.append(f"| ReLoRA step after the last reset (median, s) | | {s['step_time_post_reset_s']:.3f} "
                     f"(before: {s['step_time_relora_s']:.3f}) | {s['post_reset_step_ratio']:.3f} | "
                     f"{v['post_reset_step_ratio']['target']} | {v['post_reset_step_ratio']['status']} |")
        lines.append(f"| voluntary ctx switches / step: full-rank, ReLoRA before / after resets | "
                     f"{cs['full_rank']['voluntary']:.0f} | {cs['relora']['voluntary']:.0f} / "
                     f"{cs['relora_post_reset']['voluntary']:.0f} | | | |")
        rs = s["reset_s"]
        row("reset (s): merge / re-init / prune / total", "",
            f"{rs['merge']:.3f} / {rs['reinit']:.3f} / {rs['prune']:.3f} / {rs['total']:.3f}",
            f"{s['reset_over_step']:.3f}", "reset_over_step")
        for name, mg in s["merge"].items():
            extra = (f" ({mg['time_vs_shard_local']:.2f}x time, {_fmt(mg['bytes_vs_shard_local'], 1)}x bytes of "
                     f"shard-local)"
                     if "time_vs_shard_local" in mg else "")
            lines.append(f"| merge {name} | | {mg['time_s']:.4f} s, {mg['bytes_per_rank'] / 2**20:.2f} MiB/rank{extra} | | | |")
        if "train_extra_false" in s:
            te = s["train_extra_false"]
            lines.append(f"| train_extra=false: step / CPU-time / FLOPs / state / grad ratio, trainable fraction | | | "
                         f"{te['step_time_ratio']:.3f} / {te['step_cpu_time_ratio']:.3f} / {te['flops_ratio_expected']:.3f} / "
                         f"{te['state_bytes_ratio']:.3f} / {te['grad_bytes_ratio']:.4f}, {te['trainable_fraction']:.4f} | | |")
        for key, t in v.items():
            if t["status"] == "missed":
                lines.append(f"missed {key}: {t['reason']}")
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the full-rank and ReLoRA phases side by side.")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--preset", default="20m", help="model preset (relora_dist/model.PRESETS); tiny for a smoke test")
    p.add_argument("--layers", type=int, default=0, help="override the preset's layer count (0 = preset)")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    p.add_argument("--world-size", type=int, default=2, help="processes per stage (1 works: one spawned rank)")
    p.add_argument("--steps", type=int, default=8, help="measured steps per phase")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per phase")
    p.add_argument("--resets", type=int, default=3, help="timed resets")
    p.add_argument("--merge-repeats", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (0 = 256; 64 for tiny)")
    p.add_argument("--micro-batch", type=int, default=0, help="sequences per rank and step (0 = 8; 4 for tiny)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--rank", type=int, default=32, help="ReLoRA rank r (config default 32; paper 128)")
    p.add_argument("--train-extra", type=lambda s: s.lower() == "true", default=True,
                   help="relora.train_extra of the main ReLoRA phase (true|false)")
    p.add_argument("--no-train-extra-false", dest="train_extra_false", action="store_false",
                   help="skip the extra ReLoRA measurement with train_extra=false")
    p.add_argument("--z3-bwd-hook-fix", action="store_true",
                   help="experiment: drop DeepSpeed's cached ZeRO-3 backward-hook functions at the switch "
                        "(see _patch_teardown_drop_bwd_fns); off = the engine as it is")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0 = cores / world)")
    p.add_argument("--base-quant", default="none", choices=["none", "nf4", "int8"],
                   help="relora.base_quant of the ReLoRA phase (ZeRO-2 only: pass --stages 2)")
    p.add_argument("--cache-dir", default=str(REPO_ROOT / ".cache" / "data"))
    p.add_argument("--override", action="append", help="extra config override, written --override=--section.key=value (e.g. --override=--relora.phase_stage=3)")
    return p


HEADLINE_KEYS = ("step_time_ratio", "state_bytes_ratio", "state_bytes_ratio_accelerator", "grad_bytes_ratio",
                 "trainable_fraction", "reset_over_step", "post_reset_step_ratio", "comm_bytes_ratio")


def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not a.threads:
        a.threads = max(1, (os.cpu_count() or 1) // a.world_size)
    small = a.preset == "tiny"  # the smoke test: keep it well under a minute
    a.seq_len = a.seq_len or (64 if small else 256)
    a.micro_batch = a.micro_batch or (4 if small else 8)
    from relora_dist.data import DEFAULT_CORPUS, DEFAULT_TOKENIZER, ensure_prepared

    data_dir = ensure_prepared([DEFAULT_CORPUS], DEFAULT_TOKENIZER, a.cache_dir, a.seq_len, 0.05, 0)
    t0 = time.perf_counter()
    import deepspeed

    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(a).items() if k not in ("out", "cache_dir")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                    "cuda": torch.cuda.is_available(), "loadavg_start": os.getloadavg()},
        "stages": {},
    }
    for stage in a.stages:
        ranks = run_stage(a, stage, data_dir)
        s = summarize_stage(ranks)
        s["verdicts"] = judge(stage, s, a.preset)
        result["stages"][str(stage)] = s
    result["wall_s"] = time.perf_counter() - t0
    result["machine"]["loadavg_end"] = os.getloadavg()
    # The run's engine settings as the ranks resolved them (overrides included).
    first = result["stages"][str(a.stages[0])]
    rc = first["run_config"]
    result["config"].update(
        world_size=rc["world_size"], precision=rc["precision"], merge_master_device=rc["merge_master_device"],
        phase_stage=rc["phase_stage"], effective_rank_every=rc["effective_rank_every"],
        relora_stage={k: s["relora_stage"] for k, s in result["stages"].items()},
        # ZeRO-2 keeps fp32 merge masters of its rank_slice of each frozen W only (not the whole W).
        zero2_merge_masters="sharded")
    # Headline keys (the first stage listed; per-stage values under "stages").
    for key in HEADLINE_KEYS:
        result[key] = first[key]
    result["by_stage"] = {k: {key: s[key] for key in HEADLINE_KEYS} for k, s in result["stages"].items()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=False))
    print(format_table(result))
    print(f"wrote {a.out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0 if main() else 1)
