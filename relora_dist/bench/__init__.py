"""Side-by-side benchmark of the two phases of a ReLoRA run (`tools/bench.py`).

For each stage (an engine: ZeRO-2, ZeRO-3 or FSDP2), one run of `world` real processes (gloo;
DeepSpeed's CPU accelerator on CPU) builds ONE Trainer and measures, in this order and with the
same model, batch and engine code (relora_dist/bench/runner.py):

1. full-rank steps (`Trainer.train_step`): step times, collective bytes, engine tensors, RSS;
2. `Trainer.switch_to_relora()` (timed; with `--override=--relora.phase_stage=3` a ZeRO-2 run
   continues under ZeRO-3 and `trainer.backend` is the new backend from here on);
3. ReLoRA steps: the same measurements;
4. resets as `Trainer.train` does them: a step, `Trainer.reset()` (merge, re-init, prune, each
   timed), then `Trainer.rank_stats(measure=effective_rank_every >= 0)` (timed apart);
4b. ReLoRA steps again after the last reset, measured like 3: `post_reset_step_ratio` (a collective
   at a reset can leave every later step slower: at world size 1 a gloo all-gather makes libgomp
   throttle its spinning threads, seen as more voluntary context switches per step);
5. the merge alone: shard-local (`relora.steps.merge_adapters`) against gather-based merges
   (ZeRO-3 only: `Probe.gathered_update` over each W, and an all-gather of each W's fp32 shard,
   full add, keep own slice), time and bytes moved; run right after a reset, where B = 0, so they
   leave the weights unchanged;
6. optionally the ReLoRA phase again with `relora.train_extra=false` (a third engine over the
   adapters only, built the way the switch builds the second one).

The parts: comm.py (collective bytes by region), memory.py (engine tensor bytes, RSS), runner.py
(ranks and stages), summary.py (one stage's figures), report.py (verdicts, tables). How things are
counted is documented in docs/benchmarks.md and in each module. With more than one stage the
result also compares the engines (`engines`: tok/s per phase, state_bytes_ratio per engine, FSDP2
full-rank tok/s / ZeRO-2's against its target).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from relora_dist.bench.comm import CommCounter, _payload, track_engine  # noqa: F401  (tests use them)
from relora_dist.bench.memory import engine_tensor_bytes, reset_peak_rss, rss_report  # noqa: F401
from relora_dist.bench.report import TARGETS, compare_engines, engine_label, format_table, judge  # noqa: F401
from relora_dist.bench.runner import REPO_ROOT, STAGES, rank_main, run_stage  # noqa: F401
from relora_dist.bench.summary import expected_flops_ratio, summarize_stage  # noqa: F401


def _stage(name: str) -> str:
    """"2", "3", "fsdp2"; zero2 / zero3 are accepted for 2 / 3."""
    name = name.lower()
    name = name[4:] if name in ("zero2", "zero3") else name
    if name not in STAGES:
        raise argparse.ArgumentTypeError(f"unknown stage {name!r}: use 2, 3 (ZeRO) or fsdp2")
    return name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the full-rank and ReLoRA phases side by side.")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--preset", default="20m", help="model preset (relora_dist/model.PRESETS); tiny for a smoke test")
    p.add_argument("--layers", type=int, default=0, help="override the preset's layer count (0 = preset)")
    p.add_argument("--stages", type=_stage, nargs="+", default=["2", "3"], metavar="STAGE",
                   help="engines to run, in order: 2 / 3 (ZeRO-2 / ZeRO-3; also zero2 / zero3) and fsdp2")
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
                        "(see runner._patch_teardown_drop_bwd_fns); off = the engine as it is")
    p.add_argument("--count-ops", type=int, nargs="?", const=1, default=0, metavar="N",
                   help="also count operator launches per step (aten ops below autograd, views excluded) in N "
                        "untimed steps per phase (default 1 when given; see relora_dist/bench/ops.py)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per rank, the same for every stage (0 = cores / world)")
    p.add_argument("--base-quant", default="none", choices=["none", "nf4", "int8"],
                   help="relora.base_quant of the ReLoRA phase (ZeRO-2 and ZeRO-3; FSDP2 refuses it)")
    p.add_argument("--cache-dir", default=str(REPO_ROOT / ".cache" / "data"))
    p.add_argument("--prepared-dir", default="",
                   help="data already prepared for --seq-len (tools/prepare_data.py's folder), e.g. copied to a "
                        "machine without the `datasets` package; default: prepare into --cache-dir")
    p.add_argument("--override", action="append", help="extra config override, written --override=--section.key=value (e.g. --override=--relora.phase_stage=3)")
    return p


HEADLINE_KEYS = ("step_time_ratio", "state_bytes_ratio", "state_bytes_ratio_accelerator", "grad_bytes_ratio",
                 "trainable_fraction", "reset_over_step", "post_reset_step_ratio", "comm_bytes_ratio")


def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not a.threads:
        a.threads = max(1, (os.cpu_count() or 1) // a.world_size)
    small = a.preset == "tiny"  # the smoke test: keep it well under a minute
    a.seq_len = a.seq_len or (64 if small else 256)
    a.micro_batch = a.micro_batch or (4 if small else 8)
    from relora_dist.data import DEFAULT_CORPUS, DEFAULT_TOKENIZER, ensure_prepared

    data_dir = a.prepared_dir or ensure_prepared([DEFAULT_CORPUS], DEFAULT_TOKENIZER, a.cache_dir, a.seq_len, 0.05, 0)
    t0 = time.perf_counter()
    import deepspeed

    config = {k: v for k, v in vars(a).items() if k not in ("out", "cache_dir", "prepared_dir")}
    config["stages"] = [int(s) if s.isdigit() else s for s in a.stages]  # ZeRO stages stay numbers
    result: dict[str, Any] = {
        "config": config,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                    "cuda": torch.cuda.is_available(), "loadavg_start": os.getloadavg(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "stages": {},
    }
    for stage in a.stages:
        ranks = run_stage(a, stage, data_dir)
        s = summarize_stage(ranks)
        s["verdicts"] = judge(int(stage) if stage.isdigit() else stage, s, a.preset)
        result["stages"][stage] = s
    result["wall_s"] = time.perf_counter() - t0
    result["machine"]["loadavg_end"] = os.getloadavg()
    # The run's engine settings as the ranks resolved them (overrides included).
    first = result["stages"][a.stages[0]]
    rc = first["run_config"]
    result["config"].update(
        world_size=rc["world_size"], precision=rc["precision"], merge_master_device=rc["merge_master_device"],
        phase_stage=rc["phase_stage"], effective_rank_every=rc["effective_rank_every"],
        quant_double_quant=rc["quant_double_quant"],
        relora_stage={k: s["relora_stage"] for k, s in result["stages"].items()},
        # ZeRO-2 keeps fp32 merge masters of its rank_slice of each frozen W only (not the whole W).
        zero2_merge_masters="sharded")
    # Headline keys (the first stage listed; per-stage values under "stages").
    for key in HEADLINE_KEYS:
        result[key] = first[key]
    result["by_stage"] = {k: {key: s[key] for key in HEADLINE_KEYS} for k, s in result["stages"].items()}
    if len(result["stages"]) > 1:
        result["engines"] = compare_engines(result["stages"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=False))
    print(format_table(result))
    print(f"wrote {a.out} ({result['wall_s']:.0f} s)")
    return result
