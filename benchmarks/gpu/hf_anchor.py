#!/usr/bin/env python
"""The anchor: what users would otherwise run, a plain Hugging Face `Trainer` + DeepSpeed ZeRO-2
loop, on the same model and batch as relora_dist's bench, so that a GPU run can report this
project's full-rank tok/s / the anchor's tok/s, and both MFUs with one formula.

    python benchmarks/gpu/hf_anchor.py --preset tiny --seq-len 64 --micro-batch 4 --steps 4 --warmup 1 --out hf_anchor_tiny.json

The same model: `relora_dist.model.llama_config(preset, vocab, seq_len)` + `build_model(seed 0)`, the
functions the project's Trainer builds it with (the bench's full-rank phase trains these weights;
its frozen, bypassed adapters are not trained there). The same tokens: the prepared folder the bench
reads (`--prepared-dir`, or the bundled corpus prepared into `--cache-dir` as the bench does), split
`train`, as {input_ids, labels} blocks in the sampler order HF's Trainer draws. The same batch:
`--micro-batch` sequences of `--seq-len` tokens per rank and step, no accumulation.

The loop is HF's own: `TrainingArguments(deepspeed=ds_configs/zero2.json, bf16=...,
per_device_train_batch_size, gradient_accumulation_steps=1, max_steps=warmup+steps)` with logging,
saving and evaluation off, HF's default optimizer (adamw_torch_fused on torch >= 2.8) with the
project's AdamW hyper-parameters and clipping; the template's "auto" values are filled by
transformers' DeepSpeed integration (bucket sizes by its hidden_size^2 rule), as for any HF user.
A TrainerCallback times each optimizer step from on_step_begin to on_step_end (after fetching the
batch, as the bench times `Trainer.train_step`), synchronizing CUDA at both ends; the first
`--warmup` steps are not timed. MFU = tokens/s x `relora_dist.model.flops_per_token` / the peak of
`relora_dist.runtime.metrics.default_peak_flops` (or `--peak-flops`), the formula and peak the bench
and the training log use.

Runs as plain `python` at world size 1 (it sets the variables a launcher would: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and under `torchrun`/`deepspeed` at any world size. On CPU it
runs DeepSpeed's CPU accelerator with gloo; `--no-deepspeed` runs HF's plain loop instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without install


def _bucket(value: str) -> str:
    if value in ("auto", "trainable") or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: use auto, trainable or a positive number of elements")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Plain HF Trainer + DeepSpeed ZeRO-2 on the bench's model and batch.")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--preset", default="20m", help="model preset (relora_dist/model.PRESETS), as the bench's")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per rank and step")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: DeepSpeed's bf16 mode")
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero2.json"), help="DeepSpeed JSON template")
    p.add_argument("--no-deepspeed", dest="deepspeed", action="store_false", help="HF's plain loop, no DeepSpeed")
    p.add_argument("--reduce-bucket-size", default="auto", type=_bucket,
                   help="zero_optimization.reduce_bucket_size: auto (transformers fills hidden_size^2), trainable "
                        "(relora_dist's rule: the trainable elements, capped at DeepSpeed's default) or a number")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per rank (0 = cores / world, the bench's default: like for like on CPU)")
    p.add_argument("--peak-flops", type=float, default=0.0,
                   help="peak FLOP/s of one device for MFU (0 = relora_dist's guess: 989e12 on H100/H200 bf16)")
    p.add_argument("--prepared-dir", default="", help="prepared data (tools/prepare_data.py's folder for --seq-len)")
    p.add_argument("--cache-dir", default=".cache/data", help="where the bundled corpus is prepared without it")
    return p


def launcher_env(deepspeed: bool) -> None:
    """What `torchrun` would set, for a plain `python` start of DeepSpeed (its MPI discovery
    otherwise wants mpi4py), and on CPU the CPU accelerator."""
    import torch

    from relora_dist.runtime.dist import free_port

    if deepspeed and ("RANK" not in os.environ or "WORLD_SIZE" not in os.environ):
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if "RANK" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _finite(d):
    """A JSON-safe copy: transformers fills steps_per_print with inf."""
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    return None if isinstance(d, float) and not math.isfinite(d) else d


def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    launcher_env(a.deepspeed)
    import torch
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from relora_dist.config import Config
    from relora_dist.data import DEFAULT_CORPUS, DEFAULT_TOKENIZER, PackedBlocks, ensure_prepared, read_meta
    from relora_dist.model import build_model, flops_per_token, llama_config
    from relora_dist.runtime.metrics import default_peak_flops

    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 1) // world))
    if a.deepspeed and not cuda:
        # The op serves DeepSpeed's inference all-reduce only; its first-launch JIT build takes a
        # minute on CPU (relora_dist.runtime.dist.skip_cpu_shm_comm_build). No effect on CUDA.
        from relora_dist.runtime.dist import skip_cpu_shm_comm_build

        skip_cpu_shm_comm_build()
    data_dir = a.prepared_dir or ensure_prepared([DEFAULT_CORPUS], DEFAULT_TOKENIZER, a.cache_dir, a.seq_len, 0.05, 0)
    vocab = int(read_meta(data_dir)["vocab_size"])
    blocks = PackedBlocks(data_dir, "train", a.seq_len)
    config = llama_config(a.preset, vocab, a.seq_len)
    model = build_model(config, seed=0)
    n_params = sum(p.numel() for p in model.parameters())

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            x = blocks[i]
            return {"input_ids": x, "labels": x}

    times: list[float] = []

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step: forward, backward, clipping, optimizer step."""

        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    defaults = Config()  # the project's AdamW settings and clipping
    opt = defaults.optimizer
    if a.deepspeed and not Path(a.ds_config).is_file():
        raise FileNotFoundError(f"--ds-config '{a.ds_config}' not found; pass a DeepSpeed JSON such as "
                                f"ds_configs/zero2.json")
    ds = json.loads(Path(a.ds_config).read_text()) if a.deepspeed else None
    if ds is not None and a.reduce_bucket_size != "auto":
        from relora_dist.backends.ds_config import model_buckets

        size = (model_buckets(n_params)["reduce_bucket_size"] if a.reduce_bucket_size == "trainable"
                else int(a.reduce_bucket_size))
        ds.setdefault("zero_optimization", {})["reduce_bucket_size"] = size
    with tempfile.TemporaryDirectory(prefix="hf_anchor_") as tmp:
        args = TrainingArguments(
            output_dir=tmp, deepspeed=ds, bf16=a.precision == "bf16", use_cpu=not cuda,
            per_device_train_batch_size=a.micro_batch, gradient_accumulation_steps=1,
            max_steps=a.warmup + a.steps, learning_rate=opt.lr, weight_decay=opt.weight_decay,
            adam_beta1=opt.beta1, adam_beta2=opt.beta2, adam_epsilon=opt.eps, max_grad_norm=defaults.train.grad_clip,
            lr_scheduler_type="constant", logging_strategy="no", save_strategy="no", eval_strategy="no",
            report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[StepTimer()])
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        engine = trainer.model_wrapped
        params = list(trainer.model.parameters())  # the module the engine trained
        counts = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
        resolved = _finite(args.hf_deepspeed_config.config) if a.deepspeed else None
        dtype = str(params[0].dtype).replace("torch.", "")

    timed = times[a.warmup:]
    step = statistics.median(timed)
    tok_s = a.micro_batch * a.seq_len * world / step  # all ranks
    device = torch.device("cuda" if cuda else "cpu")
    peak = a.peak_flops or default_peak_flops(device, a.precision)
    fpt = flops_per_token(config, a.seq_len)
    import deepspeed

    result = {
        "tokens_per_s": tok_s, "step_time_s": step, "step_times_s": timed, "warmup_steps": a.warmup,
        "mfu": tok_s * fpt / (peak * world), "flops_per_token": fpt, "peak_flops": peak,
        "tokens_per_step": a.micro_batch * a.seq_len * world, "wall_s": wall,
        "params": counts[0], "trainable_params": counts[1], "param_dtype": dtype, "engine": type(engine).__name__,
        "torch_threads": torch.get_num_threads(),
        "config": {"preset": a.preset, "seq_len": a.seq_len, "micro_batch": a.micro_batch, "world_size": world,
                   "precision": a.precision, "deepspeed": a.deepspeed, "optim": str(args.optim),
                   "vocab_size": vocab, "prepared_dir": data_dir, "ds_config": resolved},
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
                     "cuda": torch.version.cuda},
        "command": [sys.executable, *sys.argv],
        "loadavg": os.getloadavg(),
    }
    if int(os.environ.get("RANK", 0)) == 0:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(f"HF Trainer{' + DeepSpeed' if a.deepspeed else ''} {a.preset} seq {a.seq_len} mb {a.micro_batch} "
              f"world {world} {a.precision}: {tok_s:,.0f} tok/s, step {step * 1e3:.1f} ms (median of {len(timed)}), "
              f"MFU {result['mfu']:.1%} of {peak:.3g} FLOP/s; wrote {a.out}", flush=True)
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # DataError and bad presets are ValueErrors: one line
        sys.exit(f"hf_anchor: {e}")
