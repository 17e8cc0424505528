"""DeepSpeed JSON as a template: "auto" values are filled from the training config, explicit
values must agree with it (the same convention as the Hugging Face DeepSpeed integration)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from relora_dist.config import Config, ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DS_CONFIG = REPO_ROOT / "ds_configs" / "zero2.json"


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"  # CPU: fp32 keeps the tests' single-process references exact


def load_ds_template(path: str | Path | None) -> dict[str, Any]:
    path = Path(path) if path else DEFAULT_DS_CONFIG
    if not path.is_file():
        raise ConfigError(f"--ds_config '{path}' not found; pass one of ds_configs/*.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config '{path}' is not valid JSON ({e.msg} at line {e.lineno})")


def _fill(ds: dict, key: str, value: Any, what: str) -> None:
    """Set an "auto" (or absent) key; refuse an explicit value that contradicts the config."""
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise ConfigError(
            f"DeepSpeed config sets {key}={current!r} but the training config gives {value!r} "
            f"({what}); set it to \"auto\" or change the training config"
        )


def build_ds_config(template: dict, cfg: Config, world_size: int) -> dict:
    """Return a complete DeepSpeed config for this run and world size."""
    ds = copy.deepcopy(template)
    t = cfg.train
    for forbidden in ("optimizer", "scheduler"):
        if forbidden in ds:
            raise ConfigError(
                f"DeepSpeed config has an '{forbidden}' section, but relora_dist owns the optimizer and "
                f"the (jagged) LR schedule; delete it and use the optimizer/schedule config sections"
            )
    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError("fp16 is not supported (loss scaling breaks exact merges); use train.precision=bf16")
    ds.pop("fp16", None)

    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size "
            f"{t.micro_batch_size} x world size {world_size}; pick a multiple of {per_step}"
        )
    grad_accum = t.global_batch_size // per_step
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", grad_accum,
          f"train.global_batch_size / (micro_batch_size x world size {world_size})")
    _fill(ds, "train_batch_size", t.global_batch_size, "train.global_batch_size")
    _fill(ds, "gradient_clipping", float(t.grad_clip), "train.grad_clip")

    precision = resolve_precision(t.precision)
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", precision == "bf16", f"train.precision={precision}")

    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (2, 3):
        raise ConfigError(f"zero_optimization.stage={stage} unsupported; use ds_configs/zero2.json or zero3.json")
    if stage == 3 and cfg.relora.enabled:
        # Params below the persistence threshold keep a full replica in p.data that the forward
        # uses, so a shard-local merge into ds_tensor would be silently ignored
        # (shared/notes/deepspeed-on-cpu.md, "ZeRO-3 trap").
        _fill(zero, "stage3_param_persistence_threshold", 0,
              "ReLoRA's shard-local merge needs every frozen weight partitioned")
    elif stage == 3:
        zero.setdefault("stage3_param_persistence_threshold", "auto")
        if zero["stage3_param_persistence_threshold"] == "auto":
            zero.pop("stage3_param_persistence_threshold")
    # We pass torch.optim.AdamW as a client optimizer (decoupled decay, param groups).
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    leftovers = [k for k, v in _walk(ds) if v == "auto"]
    if leftovers:
        raise ConfigError(f"DeepSpeed config keys {leftovers} are \"auto\" but relora_dist cannot fill them; set values")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def zero_stage(ds: dict) -> int:
    return int(ds["zero_optimization"]["stage"])
