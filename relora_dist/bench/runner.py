"""One stage of tools/bench.py: `world` spawned ranks, each building ONE Trainer and measuring both
phases with the same model, batch and engine code (the order is in relora_dist/bench/__init__.py).

A stage is an engine: "2" (ZeRO-2), "3" (ZeRO-3) or "fsdp2" (parallel.backend=fsdp2, from the
ZeRO-2 template, which gives FSDP2 its batch, clipping and precision). Everything engine-specific
goes through the engine's Probe (backends/probe.py): its tensors (`held_tensors`), its bound collectives
(`collective_bindings`), the gather-based merge (`gathered_update`, ZeRO-3 only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from relora_dist.backends.base import release_memory
from relora_dist.backends.probe import probe
from relora_dist.bench.comm import CommCounter, track_engine
from relora_dist.bench.memory import engine_tensor_bytes, reset_peak_rss, rss_report
from relora_dist.bench.ops import count_steps

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = ("2", "3", "fsdp2")
ENGINES = {"2": "zero2", "3": "zero3", "fsdp2": "fsdp2"}


def stage_label(backend_name: str) -> int | str:
    """How the JSON names the engine of a phase: the ZeRO stage (2, 3, as before FSDP2 existed)
    or the backend's name."""
    return int(backend_name[4:]) if backend_name.startswith("zero") else backend_name


# ------------------------------------------------------------------------------------------------
# Merges compared
# ------------------------------------------------------------------------------------------------

def gathered_params_merge(trainer: Any) -> None:
    """The reference-style merge on ZeRO-3: gather each W (modifier rank 0), rank 0 adds s*B*A,
    the engine broadcasts W and every rank keeps its partition."""
    backend = trainer.backend
    for m in trainer.modules.values():
        A, B = backend.shards.gather_fp32(m.lora_A), backend.shards.gather_fp32(m.lora_B)
        probe(backend).gathered_update(m.weight, lambda w, m=m, A=A, B=B: w.add_((m.scale * (B @ A)).to(w.dtype)))


def allgather_merge(trainer: Any) -> None:
    """Gather-based merge that keeps fp32: all-gather each W's fp32 master slices, add s*B*A to the
    full W on every rank, write back this rank's master slice and its part of the compute copy.

    Each rank's fp32 merge master holds `backend.shards.owned_range(W)` (ZeRO-3: its own shard, =
    local_range; ZeRO-2: its `rank_slice` of the replicated W), which `gather_owned` reassembles.
    Without a separate master (fp32 compute: `alias`; merge_precision=bf16) the same slice of the
    compute copy is gathered instead."""
    backend, masters = trainer.backend, trainer.masters
    for name, m in trainer.modules.items():
        A, B = backend.shards.gather_fp32(m.lora_A), backend.shards.gather_fp32(m.lora_B)
        target = backend.shards.local_view(m.weight)
        keep_master = masters is not None and not masters.alias and name in masters.shards
        owned = masters.shards[name] if keep_master else backend.shards.owned_view(m.weight)
        full = backend.shards.gather_owned(m.weight, owned.float().to(target.device))
        full += (m.scale * (B @ A)).reshape(-1).to(full.device)
        if keep_master:
            mstart, mend = backend.shards.owned_range(m.weight)
            owned.copy_(full[mstart:mend].to(owned.device))
        start, end = backend.shards.local_range(m.weight)
        target.copy_(full[start:end].to(target.dtype))


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def _timed(fn, counter: CommCounter | None = None, region: str = "other") -> tuple[float, Any]:
    dt, _, result = _timed_cpu(fn, counter, region)
    return dt, result


def _timed_cpu(fn, counter: CommCounter | None = None, region: str = "other") -> tuple[float, float, Any]:
    """(wall s, this process's CPU s, result) of a collective-aligned call (barrier first)."""
    import torch.distributed as dist

    dist.barrier()
    _sync()
    t0, c0 = time.perf_counter(), time.process_time()
    if counter is not None:
        with counter.region_as(region):
            result = fn()
    else:
        result = fn()
    _sync()  # on a GPU the kernels a call queued belong to its time
    return time.perf_counter() - t0, time.process_time() - c0, result


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cuda_memory(at_state: int | None = None) -> dict | None:
    """The CUDA caching allocator's figures for this rank in MiB (None on CPU): bytes allocated now
    and at the state snapshot (after the last backward: the state plus buffers, no activations),
    and the phase's peak allocated and reserved (activations, buckets and workspaces included)."""
    if not torch.cuda.is_available():
        return None
    mib = 1 << 20
    return {"allocated_mb": torch.cuda.memory_allocated() / mib,
            "allocated_at_state_mb": at_state / mib if at_state is not None else None,
            "peak_allocated_mb": torch.cuda.max_memory_allocated() / mib,
            "peak_reserved_mb": torch.cuda.max_memory_reserved() / mib}


def _reset_cuda_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _ctx_switches() -> tuple[int, int]:
    """(voluntary, involuntary) context switches of this process so far, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_nvcsw, ru.ru_nivcsw


def _run_steps(trainer: Any, counter: CommCounter, warmup: int, steps: int, snapshot: bool = True,
               count_ops: int = 0) -> dict:
    """warmup + measured steps (timed, collectives counted), then `count_ops` untimed steps whose
    operator launches are counted (relora_dist/bench/ops.py; apart, so that counting costs no
    measured time), then (with `snapshot`) one untimed step that reads the engine's tensors right
    after its last backward.

    Also the process's context switches over the measured steps (getrusage, every thread of the
    process: torch's OpenMP pool, gloo's threads): voluntary switches per step are the diagnostic
    of libgomp's throttled spinning (threads that sleep in futex waits instead of spinning)."""
    times, cpu_times = [], []
    counter.reset()
    _reset_cuda_peak()
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
    ops = count_steps(trainer, count_ops) if count_ops else None
    snap: dict = {}
    at_state: list[int] = []
    if snapshot:
        def read_state():
            snap.update(engine_tensor_bytes(trainer))
            if torch.cuda.is_available():
                at_state.append(torch.cuda.memory_allocated())
        trainer.train_step(trainer.loader.next_batch(), before_update=read_state)
    ctx = {"voluntary_per_step": (ctx1[0] - ctx0[0]) / steps if ctx0 else float("nan"),
           "involuntary_per_step": (ctx1[1] - ctx0[1]) / steps if ctx0 else float("nan")}
    return {"step_times": times, "step_cpu_times": cpu_times, "comm": comm, "state": snap,
            "ctx_switches": ctx, "loadavg": os.getloadavg(),
            "cuda": _cuda_memory(at_state[0] if at_state else None), "ops": ops}


def _param_counts(trainer: Any) -> dict:
    numel = trainer.backend.shards.numel  # whole params, however they are sharded
    mods = trainer.modules.values()
    adapters = {id(p) for m in mods for p in (m.lora_A, m.lora_B)}
    wrapped = {id(m.weight) for m in mods}
    params = list(trainer.model.parameters())
    return {"total": sum(numel(p) for p in params),
            "adapters": sum(numel(p) for p in params if id(p) in adapters),
            "wrapped": sum(numel(p) for p in params if id(p) in wrapped),
            "trainable": sum(numel(p) for p in params if p.requires_grad)}


def _patch_teardown_drop_bwd_fns(trainer: Any) -> None:
    """Experiment (--z3-bwd-hook-fix), measured before ZeroBackend.teardown_engine did the same:
    DeepSpeed 0.19.8 caches the autograd Functions of its ZeRO-3 backward hooks on each submodule
    (`module.pre_bwd_fn`, `module.post_bwd_fn`, closed over the engine that registered them) and a
    later engine reuses them. Dropping them at teardown lets the ReLoRA engine build its own."""
    original = trainer.backend.teardown_engine

    def teardown(engine):
        original(engine)
        for m in trainer.model.modules():
            for attr in ("pre_bwd_fn", "post_bwd_fn"):
                m.__dict__.pop(attr, None)
        release_memory()

    trainer.backend.teardown_engine = teardown


# ------------------------------------------------------------------------------------------------
# One rank of one stage
# ------------------------------------------------------------------------------------------------

def rank_main(args: dict, info: Any, out_path: Path) -> dict:
    """Everything one rank measures for one stage (see relora_dist/bench/__init__.py)."""
    import torch.distributed as dist

    from relora_dist.relora import steps
    from relora_dist.config import load_config
    from relora_dist.backends.ds_config import load_ds_template
    from relora_dist.relora.layer import freeze_for_relora_phase
    from relora_dist.trainer import Trainer, param_groups

    counter = CommCounter().install()
    cfg = load_config(None, args["overrides"])
    if args.get("count_ops") and cfg.train.compile:
        from relora_dist.bench.ops import count_compiled_kernels

        count_compiled_kernels()  # before the first compilation (see ops.py)
    # FSDP2 takes its batch, clipping and precision from the ZeRO-2 template, as the tests run it.
    template = load_ds_template(REPO_ROOT / "ds_configs" / f"zero{3 if args['stage'] == '3' else 2}.json")
    res: dict[str, Any] = {"rank": info.rank, "stage": args["stage"]}
    t0 = time.perf_counter()
    trainer = Trainer(cfg, template, info)
    res["build_s"] = time.perf_counter() - t0
    counter.install_bindings(probe(trainer.backend).collective_bindings())
    mc = trainer.model_config
    res["seq_len"], res["train_extra"] = cfg.data.seq_len, cfg.relora.train_extra
    res["tokens_per_step"] = trainer.tokens_per_step  # all ranks, all micro-batches of one step
    res["model"] = {"hidden_size": mc.hidden_size, "intermediate_size": mc.intermediate_size,
                    "num_layers": mc.num_hidden_layers, "num_heads": mc.num_attention_heads,
                    "vocab_size": mc.vocab_size, "r": cfg.relora.r, "precision": trainer.precision}
    res["run_config"] = {"world_size": info.world_size, "precision": trainer.precision,
                         "merge_master_device": cfg.relora.merge_master_device,
                         "phase_stage": str(cfg.relora.phase_stage),
                         "effective_rank_every": cfg.relora.effective_rank_every,
                         "quant_double_quant": cfg.relora.quant_double_quant,
                         "torch_threads": torch.get_num_threads(), "backend": trainer.backend.name}
    warmup, n, nops = args["warmup"], args["steps"], args.get("count_ops", 0)

    if args.get("z3_bwd_hook_fix") and trainer.backend.name == "zero3":
        _patch_teardown_drop_bwd_fns(trainer)

    # --- full rank ------------------------------------------------------------------------------
    track_engine(trainer.engine, counter)
    res["params_full_rank"] = _param_counts(trainer)
    reset_ok = reset_peak_rss()
    res["full_rank"] = _run_steps(trainer, counter, warmup, n, count_ops=nops)
    res["full_rank"]["rss"] = rss_report(reset_ok)

    # --- switch ---------------------------------------------------------------------------------
    dt, _ = _timed(trainer.switch_to_relora)
    res["switch_s"] = dt
    # The W_switch snapshot only serves the effective-rank diagnostic (not called here); it is not
    # training state. Record its size, then drop it so the phase's RSS shows the training state.
    res["snapshot_bytes"] = trainer.masters.snapshot_nbytes()
    # With relora.phase_stage=3 the switch replaced trainer.backend (ZeRO-2 -> ZeRO-3): from here on
    # every backend call goes through trainer.backend as it is now.
    res["relora_stage"] = stage_label(trainer.backend.name)
    at_switch, trainer.masters.at_switch = trainer.masters.at_switch, {}
    release_memory()
    track_engine(trainer.engine, counter)
    res["params_relora"] = _param_counts(trainer)
    res["wrapped_linears"] = len(trainer.modules)
    reset_ok = reset_peak_rss()
    res["relora"] = _run_steps(trainer, counter, warmup, n, count_ops=nops)
    res["relora"]["rss"] = rss_report(reset_ok)

    # --- resets, as Trainer.train does them ------------------------------------------------------
    # The step at LR 0, then Trainer.reset() and Trainer.rank_stats(measure=effective_rank_every >= 0)
    # (the effective-rank diagnostic: an all-gather of each W's delta, SVDs on rank 0), which needs
    # the W_switch snapshot dropped above for the ReLoRA phase's RSS: put it back.
    trainer.masters.at_switch = at_switch
    del at_switch
    measure = cfg.relora.effective_rank_every >= 0
    resets = []
    sketched = []  # relora.reinit=gradient/project: the step before a reset also sketches W's gradient
    for _ in range(args["resets"]):
        if cfg.relora.reinit != "random":
            trainer.sketch_next_step()
            sketched.append(_timed(lambda: trainer.train_step(trainer.loader.next_batch()))[0])
        _timed(lambda: None)
        total, timings = _timed(trainer.reset)
        # The parts are host timings (on a GPU, kernels queued in one part may finish in the next);
        # the total waits for the device.
        timings["total"] = total
        timings["rank_stats"], _ = _timed(lambda: trainer.rank_stats(measure=measure))
        resets.append(timings)
        trainer.train_step(trainer.loader.next_batch())
    res["resets"] = resets
    if sketched:
        res["sketched_step_s"] = sketched
    res["rank_stats_measured"] = measure

    # --- ReLoRA steps after the last reset: same measure as before the first ----------------------
    # A collective at a reset can leave the process slower for good (at world 1, gloo threads that
    # run OpenMP regions make libgomp manage more threads than cores and throttle its spinning).
    res["relora_post_reset"] = _run_steps(trainer, counter, warmup, n, snapshot=False, count_ops=nops)

    # --- merge alone: shard-local vs gather-based (right after a reset: B = 0, weights unchanged)
    if cfg.relora.reinit != "random":
        trainer.sketch_next_step()
        trainer.train_step(trainer.loader.next_batch())
    _timed(trainer.reset)
    merges: dict[str, dict] = {}
    variants = {"shard_local": lambda: steps.merge_adapters(trainer.backend, trainer.modules, trainer.masters)}
    quantized = any(m.qweight is not None for m in trainer.modules.values())  # no compute-dtype W to gather
    if trainer.backend.name == "zero3" and not quantized:  # the gather-based merges it replaced (ZeRO-3 partitions)
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
        release_memory()
        freeze_for_relora_phase(trainer.model, False)
        trainer.engine = trainer.backend.build_engine(trainer.model,
                                                      param_groups(trainer.model, cfg, cfg.relora_lr, trainer.backend.shards.shape))
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
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # The same thread count for every stage (--threads, default cores / world), so that ZeRO and
    # FSDP2 step times compare like with like.
    torch.set_num_threads(args["threads"])
    import torch.distributed as dist

    from relora_dist.runtime.dist import init_distributed

    info = init_distributed(timeout_s=600)
    try:
        rank_main(args, info, Path(out_dir) / f"rank{rank}.json")
    finally:
        dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

def _overrides(a: argparse.Namespace, stage: str, data_dir: str, out_dir: str) -> list[str]:
    world = a.world_size
    # Only train_step / switch_to_relora / reset are called, never train(): the schedule keys just
    # have to validate. Long phases keep the LR away from 0 during the measured steps.
    o = {"model.preset": a.preset, "data.prepared_dir": data_dir, "data.seq_len": a.seq_len,
         "train.micro_batch_size": a.micro_batch, "train.global_batch_size": a.micro_batch * world * a.grad_accum,
         "train.precision": a.precision, "train.eval_every": 0, "relora.r": a.rank,
         "relora.train_extra": str(a.train_extra).lower(), "relora.warm_start_steps": 1000,
         "relora.cycle_length": 1000, "train.max_steps": 2000, "logging.progress_bar": "false",
         "logging.tensorboard": "false", "run.output_dir": out_dir, "run.export_warm_start": "false",
         "checkpoint.resume": "", "train.seed": 0, "parallel.backend": ENGINES[stage]}
    if a.layers:
        o["model.num_layers"] = a.layers
    if a.base_quant != "none":
        o["relora.base_quant"] = a.base_quant
    return [f"--{k}={v}" for k, v in o.items()] + list(a.override or [])


def run_stage(a: argparse.Namespace, stage: str, data_dir: str) -> list[dict]:
    import torch.multiprocessing as mp

    from relora_dist.runtime.dist import free_port

    with tempfile.TemporaryDirectory(prefix=f"bench_{ENGINES[stage]}_") as tmp:
        args = {"stage": stage, "overrides": _overrides(a, stage, data_dir, str(Path(tmp) / "run")),
                "warmup": a.warmup, "steps": a.steps, "resets": a.resets, "merge_repeats": a.merge_repeats,
                "train_extra_false": a.train_extra_false, "threads": a.threads,
                "z3_bwd_hook_fix": a.z3_bwd_hook_fix, "count_ops": a.count_ops}
        mp.spawn(_worker, args=(a.world_size, free_port(), args, tmp), nprocs=a.world_size, join=True)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(a.world_size)]
