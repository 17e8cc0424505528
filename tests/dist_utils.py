"""Run a scenario in N real processes (gloo, DeepSpeed CPU accelerator) and collect per-rank results.

Each rank runs `scenarios.<name>(trainer_factory, out)` and writes a dict with torch.save to
`<out_dir>/rank<r>.pt`; the test process loads them back with weights_only=True.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from relora_dist.runtime.dist import free_port

REPO = Path(__file__).resolve().parent.parent


def _worker(rank: int, world_size: int, port: int, scenario: str, overrides: list[str], ds_config: str,
            out_dir: str, kwargs: dict, env: dict, timeout_s: float = 240) -> None:
    os.environ.clear()  # the forkserver's environment is the one of its start: take the test's own
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    import torch.distributed as dist

    from relora_dist.config import load_config
    from relora_dist.runtime.dist import init_distributed
    from relora_dist.backends.ds_config import load_ds_template
    from tests import scenarios

    info = init_distributed(timeout_s=timeout_s)
    cfg = load_config(None, overrides)
    template = load_ds_template(REPO / ds_config)
    result = getattr(scenarios, scenario)(cfg, template, info, **kwargs)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# Ranks start from a forkserver that has imported torch, DeepSpeed, transformers and the trainer once
# per test session: each spawned rank spent ~3 s of CPU importing them again (tests/test_adam8bit.py:
# 41.7 s with spawn, 28.8 s from the forkserver, same loaded machine, one after the other). Forking from that server is safe: it holds no threads, process group or
# open files (multiprocessing's own forkserver protocol), and each rank takes the test's environment.
PRELOAD = ["torch", "deepspeed", "transformers", "relora_dist.trainer", "tests.scenarios"]


def _start_method() -> str:
    if os.environ.get("RELORA_TEST_START_METHOD") == "spawn":
        return "spawn"
    mp.set_forkserver_preload(PRELOAD)
    return "forkserver"


def run_world(world_size: int, scenario: str, overrides: list[str], out_dir: Path,
              ds_config: str = "ds_configs/zero2.json", pg_timeout_s: float = 240, **kwargs) -> list[dict]:
    """`pg_timeout_s`: every process group's timeout (RELORA_DIST_TIMEOUT_S of a launch)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(world_size, free_port(), scenario, overrides, ds_config, str(out_dir), kwargs,
                                      dict(os.environ), pg_timeout_s),
                       nprocs=world_size, join=True, start_method=_start_method())
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


# The launchers as modules of the running interpreter: `deepspeed` and `torchrun` on PATH exist only
# while the venv is activated, and a test must pass in one that is not (`venv/bin/python -m pytest`).
LAUNCHERS = {"deepspeed": [sys.executable, "-m", "deepspeed.launcher.runner"],
             "torchrun": [sys.executable, "-m", "torch.distributed.run"],
             "python": [sys.executable]}


def engine(backend: str) -> tuple[str, dict]:
    """(--ds_config, overrides) that run `backend` (zero2, zero3, fsdp2): FSDP2 takes the batch,
    clipping and precision settings of the default ZeRO-2 template."""
    if backend == "fsdp2":
        return "ds_configs/zero2.json", {"parallel.backend": "fsdp2"}
    return f"ds_configs/{backend}.json", {}


def tiny_overrides(data_dir: Path, out_dir: Path, **extra) -> list[str]:
    """A ~0.6M-param LLaMA on 32-token blocks: a few seconds per run on 2 CPU cores."""
    base = {
        "model.preset": "tiny", "model.hidden_size": 64, "model.intermediate_size": 172,
        "model.num_layers": 2, "model.num_heads": 4,
        "data.prepared_dir": str(data_dir), "data.seq_len": 32,
        "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.eval_every": 0,
        "train.eval_tokens": 512, "train.precision": "fp32",
        "optimizer.lr": 3e-3, "schedule.warmup_steps": 2,
        "logging.progress_bar": False, "logging.log_every": 1000, "run.output_dir": str(out_dir),
        "run.export_warm_start": False,
    }
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


def fake_checkpoint(root: Path, step: int, cfg) -> Path:
    """A minimal well-formed checkpoint (one 4-element tensor) written with `cfg`, for the tests
    of what happens before any tensor is loaded."""
    import hashlib
    import json

    from safetensors.torch import save_file

    from relora_dist.config import dump_config

    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    save_file({"w/weight": torch.zeros(4)}, str(d / "rank00000.safetensors"))
    sha = hashlib.sha256((d / "rank00000.safetensors").read_bytes()).hexdigest()
    manifest = {"format_version": 1, "global_step": step, "phase": "full_rank", "restart_index": 0,
                "tokens_seen": 0, "world_size": 1, "zero_stage": 2, "adapters_active": False,
                "relora": {"r": 8, "alpha": 16, "wrapped_modules": []}, "model_config": {}, "data_loader": {},
                "tensors": {"w": {"shape": [4], "fields": {"weight": [[0, 0, 4]]}}},
                "files": [{"rank": 0, "file": "rank00000.safetensors", "sha256": sha}]}
    (d / "manifest.json").write_text(json.dumps(manifest))
    dump_config(cfg, d / "config.yaml")
    (root / "latest").write_text(d.name)
    return d
