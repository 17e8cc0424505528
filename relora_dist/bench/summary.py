"""The figures of one stage, from its ranks' measurements (tools/bench.py).

Step time: `dist.barrier()` before each step, wall time per rank, max over ranks, median over the
measured steps (after warm-up steps). State bytes: max over ranks. Collective bytes: mean over
ranks. Ratios are ReLoRA phase / full-rank phase of the same run, so the machine's load (shared,
recorded as `loadavg_1min`) weighs on both sides alike.
"""

from __future__ import annotations

import statistics
from typing import Any

from relora_dist.bench.memory import CATEGORY_ORDER


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
    # Throughput of the whole run (all ranks): what a ZeRO-2 vs FSDP2 comparison reads.
    if "tokens_per_step" in r0:
        out["tokens_per_step"] = r0["tokens_per_step"]
        out["tokens_per_s"] = {"full_rank": r0["tokens_per_step"] / fr, "relora": r0["tokens_per_step"] / rl}
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
    cats = list(CATEGORY_ORDER) + ["merge_masters", "state", "state_accelerator"]
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
    # On a GPU: the CUDA allocator's own figures per phase (max over ranks), the memory a user sees.
    if r0["full_rank"].get("cuda"):
        cu = {ph: {k: max(r[ph]["cuda"][k] or 0.0 for r in ranks) for k in r0[ph]["cuda"]}
              for ph in phases if r0[ph].get("cuda")}
        out["cuda_memory_mb"] = cu
        out["cuda_peak_allocated_ratio"] = cu["relora"]["peak_allocated_mb"] / cu["full_rank"]["peak_allocated_mb"]
        out["cuda_allocated_at_state_ratio"] = (cu["relora"]["allocated_at_state_mb"]
                                                / cu["full_rank"]["allocated_at_state_mb"])
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
    if "sketched_step_s" in r0:  # relora.reinit=gradient/project: the step before a reset also sketches
        out["sketched_step_s"] = _median([max(r["sketched_step_s"][i] for r in ranks)
                                          for i in range(len(r0["sketched_step_s"]))])
        out["sketched_step_ratio"] = out["sketched_step_s"] / rl
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
    if r0["full_rank"].get("ops"):
        out.update(summarize_ops(ranks))
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


def summarize_ops(ranks: list[dict]) -> dict:
    """Operator launches per step (relora_dist/bench/ops.py) of each phase on rank 0, by source,
    the ratios ReLoRA / full rank, and every rank's per-step total (equal on both ranks in the
    committed runs, benchmarks/ops_*.json: ZeRO and FSDP2 give each rank the same work on its own
    slices)."""
    r0 = ranks[0]
    phases = ("full_rank", "relora", "relora_post_reset")
    ops = {ph: r0[ph]["ops"] for ph in phases}
    full = ops["full_rank"]["total"]
    out = {"ops_per_step": {ph: ops[ph]["total"] for ph in phases},
           "ops_by_source": {ph: ops[ph]["by_source"] for ph in phases},
           "ops_top": {ph: ops[ph]["top_ops"] for ph in phases},
           "ops_per_step_per_rank": {ph: [r[ph]["ops"]["total"] for r in ranks] for ph in phases},
           "ops_ratio": ops["relora"]["total"] / full,
           "ops_ratio_post_reset": ops["relora_post_reset"]["total"] / full,
           "ops_source_ratio": {src: _ratio(ops["relora"]["by_source"][src], ops["full_rank"]["by_source"][src])
                                for src in ops["full_rank"]["by_source"]},
           "ops_steps_counted": ops["full_rank"]["steps"]}
    if "wrapped_linears" in r0:
        out["wrapped_linears"] = r0["wrapped_linears"]
    return out
