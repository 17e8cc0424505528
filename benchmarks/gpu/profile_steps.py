"""Where a training step's time goes, full-rank vs ReLoRA phase, on one process (torch.profiler).

Builds the Trainer tools/bench.py builds (same overrides) at world size 1, profiles `--steps` steps
of each phase after warm-up, and prints per phase: wall time per step, device-busy time per step
(sum of kernel times), kernel launches per step, and the operators with the most host and device
time. A step whose wall time is far above its device-busy time is bound by the host (Python,
autograd, launches), not by the accelerator. Usage (from the repository root):
    python benchmarks/gpu/profile_steps.py --preset 350m --seq-len 512 --micro-batch 16 --rank 128
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def profile_phase(trainer, steps: int, warmup: int, label: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        trainer.train_step(trainer.loader.next_batch())
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    batches = [trainer.loader.next_batch() for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for b in batches:
            trainer.train_step(b)
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / steps if kernels else float("nan")
    print(f"\n=== {label}: wall {wall * 1e3:.1f} ms/step, device busy {busy * 1e3:.1f} ms/step, "
          f"{len(kernels) / steps:.0f} kernels/step")
    avg = prof.key_averages()
    print(avg.table(sort_by="self_cpu_time_total", row_limit=rows))
    if cuda:
        print(avg.table(sort_by="self_device_time_total", row_limit=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared-dir", required=True)
    p.add_argument("--preset", default="350m")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--stage", default="2", choices=["2", "3", "fsdp2"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=18)
    a = p.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from relora_dist.backends.ds_config import load_ds_template
    from relora_dist.bench import build_parser
    from relora_dist.bench.runner import REPO_ROOT, _overrides
    from relora_dist.config import load_config
    from relora_dist.runtime.dist import init_distributed
    from relora_dist.trainer import Trainer

    info = init_distributed()
    b = build_parser().parse_args(["--out", "-", "--preset", a.preset, "--world-size", "1", "--seq-len", str(a.seq_len),
                                   "--micro-batch", str(a.micro_batch), "--rank", str(a.rank),
                                   "--precision", a.precision, "--override=--relora.effective_rank_every=-1"])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, _overrides(b, a.stage, a.prepared_dir, tmp))
        template = load_ds_template(REPO_ROOT / "ds_configs" / f"zero{3 if a.stage == '3' else 2}.json")
        trainer = Trainer(cfg, template, info)
        profile_phase(trainer, a.steps, a.warmup, "full rank", a.rows)
        trainer.switch_to_relora()
        profile_phase(trainer, a.steps, a.warmup, "ReLoRA", a.rows)
        trainer.reset()
        profile_phase(trainer, a.steps, a.warmup, "ReLoRA after a reset", a.rows)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
