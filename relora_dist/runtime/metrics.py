"""TensorBoard scalars, a tqdm bar and a compact console line, all on rank 0 only."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on GPU; peak resident set size on CPU (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_peak_flops(device: torch.device, precision: str) -> float:
    """Dense peak FLOP/s per device for MFU when logging.peak_flops is 0 (a labelled guess)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if "H100" in name or "H200" in name:
            return 989e12 if precision == "bf16" else 67e12
        if "A100" in name:
            return 312e12 if precision == "bf16" else 19.5e12
        return 100e12
    return 1e12  # CPU: order of magnitude of a few AVX-512 cores; set logging.peak_flops to be exact


class MetricsLogger:
    def __init__(self, enabled: bool, log_dir: str | Path, tensorboard: bool, progress_bar: bool,
                 total_steps: int, initial_step: int = 0):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True,
                            file=sys.stderr, leave=True)
        self._t0 = time.time()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, float(value), step)

    def advance(self, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(postfix, refresh=False)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def step(self, step: int, record: dict, *, phase: str, restart_index: int, skipped_steps: int,
             peaks: list[float], log_every: int) -> None:
        """One optimizer step's record to TensorBoard (every step), the progress bar, and the
        console (every `log_every` steps and at each eval); `peaks`: every rank's peak memory."""
        tb = {"train/loss": record["loss"], "train/lr": record["lr"], "train/grad_norm": record["grad_norm"],
              "train/tokens_seen": record["tokens_seen"], "train/skipped_steps": skipped_steps,
              "perf/tokens_per_s": record["tokens_per_s"],
              "perf/mfu": record["mfu"], **{f"mem/peak_mb_rank{r}": float(v) for r, v in enumerate(peaks)}}
        if "eval_loss" in record:
            tb.update({"eval/loss": record["eval_loss"], "eval/ppl": record["eval_ppl"]})
        if phase == "relora":
            tb["relora/restart_index"] = restart_index
        for key in ("cumulative_rank_mean", "cumulative_rank_total", "effective_rank_mean", "effective_rank_min",
                    "reset_total_s", "reset_merge_s", "reset_reinit_s", "reset_prune_s"):
            if key in record:
                tb[f"relora/{key}"] = record[key]
        self.scalars(step, tb)
        self.advance({"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.2e}", "phase": phase})
        if step % log_every == 0 or "eval_loss" in record:
            line = (f"step {step} | {phase} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                    f"gnorm {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s")
            if phase == "relora":
                line += f" | restart {restart_index}"
            if "eval_loss" in record:
                line += f" | eval loss {record['eval_loss']:.4f} ppl {record['eval_ppl']:.2f}"
            self.print(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
