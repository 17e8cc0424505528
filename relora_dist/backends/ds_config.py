"""DeepSpeed JSON as a template: "auto" values are filled from the training config, explicit
values must agree with it (the same convention as the Hugging Face DeepSpeed integration)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from relora_dist import resources
from relora_dist.config import Config, ConfigError

DEFAULT_DS_CONFIG = Path(resources.DS_CONFIG)


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"  # CPU: fp32 keeps the tests' single-process references exact


def load_ds_template(path: str | Path | None) -> dict[str, Any]:
    """The JSON template at ``path`` (relative to the working directory), a bundled template's name
    (``zero3``), or the bundled ``zero2`` when None."""
    path = Path(resources.resolve(str(path), "ds_configs", ".json")) if path else DEFAULT_DS_CONFIG
    if not path.is_file():
        names = ", ".join(resources.bundled("ds_configs", ".json"))
        raise ConfigError(f"--ds_config '{path}' not found; pass an existing file (in a checkout: "
                          f"ds_configs/zero3.json) or a bundled template's name: {names}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config '{path}' is not valid JSON ({e.msg} at line {e.lineno}); fix the file")
    if not isinstance(ds, dict):
        raise ConfigError(f"--ds_config '{path}' must be a JSON object, got {type(ds).__name__}; "
                          f"start from ds_configs/zero2.json")
    return ds


def _fill(ds: dict, key: str, value: Any, what: str, fix: str, name: str | None = None) -> None:
    """Set an "auto" (or absent) key; refuse an explicit value that contradicts the config."""
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        name = name or key
        raise ConfigError(f"DeepSpeed config sets {name}={json.dumps(current)} but {what} requires "
                          f"{json.dumps(value)}; set {name} to \"auto\" or {fix}")


def _section(ds: dict, key: str) -> dict:
    sec = ds.setdefault(key, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"DeepSpeed config '{key}' must be an object, got {json.dumps(sec)}; "
                          f"write \"{key}\": {{...}} as in ds_configs/zero2.json")
    return sec


BACKENDS = ("zero2", "zero3", "fsdp2")
# What FSDP2 takes from a template: batch sizes, clipping and bf16; ZeRO tuning knobs that only
# change DeepSpeed's communication are ignored. Any other key asks for a DeepSpeed-only feature.
_FSDP2_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "bf16", "fp16", "amp", "bfloat16", "optimizer", "scheduler",
               "zero_optimization", "steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer"}
_FSDP2_ZERO_KEYS = {"stage", "overlap_comm", "contiguous_gradients", "reduce_scatter", "allgather_partitions",
                    "reduce_bucket_size", "allgather_bucket_size", "stage3_param_persistence_threshold",
                    "stage3_gather_16bit_weights_on_model_save", "stage3_prefetch_bucket_size",
                    "stage3_max_live_parameters", "stage3_max_reuse_distance", "sub_group_size"}


def resolve_backend(template: dict, cfg: Config) -> str:
    """parallel.backend, with auto = the template's ZeRO stage; a one-line ConfigError for an
    unknown name, a ZeRO backend contradicting the template's stage, or an fsdp2 run whose template
    or config asks for something only DeepSpeed does."""
    name = cfg.parallel.backend
    zero = template.get("zero_optimization", {}) if isinstance(template.get("zero_optimization"), dict) else {}
    stage = zero.get("stage")
    if name == "auto":
        return f"zero{stage}" if stage in (2, 3) else "zero2"  # build_ds_config names a bad stage
    if name not in BACKENDS:
        raise ConfigError(f"parallel.backend={name!r} is unknown; use auto, {', '.join(BACKENDS)}")
    if name != "fsdp2":
        if stage in (2, 3) and name != f"zero{stage}":
            raise ConfigError(f"parallel.backend={name} but the DeepSpeed config sets zero_optimization.stage="
                              f"{stage}; pass ds_configs/{name}.json or parallel.backend=auto")
        return name
    for key, value in zero.items():
        offload_off = key.startswith("offload_") and isinstance(value, dict) and value.get("device", "none") == "none"
        if key not in _FSDP2_ZERO_KEYS and not offload_off:
            raise ConfigError(f"parallel.backend=fsdp2 cannot honour DeepSpeed config key 'zero_optimization.{key}' "
                              f"(DeepSpeed only); delete it or use parallel.backend=zero3")
    for key in template:  # after zero_optimization's keys: offload is the likeliest conflict
        if key not in _FSDP2_KEYS:
            raise ConfigError(f"parallel.backend=fsdp2 cannot honour DeepSpeed config key '{key}' (DeepSpeed only); "
                              f"delete it or use parallel.backend=zero2/zero3")
    r = cfg.relora
    for key, value, default in (("phase_stage", r.phase_stage, "same"), ("merge_precision", r.merge_precision, "fp32"),
                                ("merge_master_device", r.merge_master_device, "device")):
        if value != default:
            raise ConfigError(f"relora.{key}={value} is a ZeRO setting; under parallel.backend=fsdp2 every weight "
                              f"is sharded and its fp32 shard is the merge master; drop relora.{key}")
    # The quantized base and the 8-bit optimizer are built on ZeRO-2's replicated weights and flat
    # optimizer partitions; FSDP2's row shards have neither yet.
    if r.enabled and r.base_quant != "none":
        raise ConfigError(f"relora.base_quant={r.base_quant} is not supported under parallel.backend=fsdp2 yet; "
                          f"use parallel.backend=zero2 (ds_configs/zero2.json) or relora.base_quant=none")
    return name


def build_ds_config(template: dict, cfg: Config, world_size: int) -> dict:
    """Return a complete DeepSpeed config for this run and world size. Every contradiction between
    the template and the training config is a one-line ConfigError naming the key and the fix.
    Under parallel.backend=fsdp2 it is the resolved batch/clipping/precision settings FSDP2 uses."""
    resolve_backend(template, cfg)
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size {world_size!r} is invalid; the WORLD_SIZE environment variable must be "
                          f"a positive integer (set by deepspeed/torchrun)")
    ds = copy.deepcopy(template)
    t = cfg.train
    for forbidden in ("optimizer", "scheduler"):
        if forbidden in ds:
            raise ConfigError(
                f"DeepSpeed config has an '{forbidden}' section, but relora_dist owns the optimizer and "
                f"the (jagged) LR schedule; delete it and use the optimizer/schedule config sections"
            )
    for half, what in (("fp16", "fp16 (loss scaling breaks exact merges)"), ("amp", "apex amp")):
        sec = ds.get(half, {})
        enabled = sec.get("enabled", True) if isinstance(sec, dict) else sec
        if half in ds and enabled not in (False, "auto"):
            raise ConfigError(f"DeepSpeed config enables {what}, which relora_dist does not support; "
                              f"delete the '{half}' section and use train.precision=bf16 for mixed precision")
        ds.pop(half, None)
    if "bfloat16" in ds:
        raise ConfigError("DeepSpeed config has a 'bfloat16' section; rename it to 'bf16' (its enabled flag is "
                          "filled from train.precision)")

    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
            f"{t.micro_batch_size} x world size {world_size}; use a multiple of {per_step} or another "
            f"train.micro_batch_size"
        )
    grad_accum = t.global_batch_size // per_step
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size,
          f"train.micro_batch_size={t.micro_batch_size}", "change train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", grad_accum,
          f"train.global_batch_size={t.global_batch_size} / (train.micro_batch_size={t.micro_batch_size} "
          f"x world size {world_size})", "change train.global_batch_size (accumulation is derived)")
    _fill(ds, "train_batch_size", t.global_batch_size,
          f"train.global_batch_size (= micro batch {t.micro_batch_size} x grad accumulation {grad_accum} "
          f"x world size {world_size})", "change train.global_batch_size")
    _fill(ds, "gradient_clipping", float(t.grad_clip), f"train.grad_clip={t.grad_clip}",
          "change train.grad_clip")

    precision = resolve_precision(t.precision)
    bf16 = _section(ds, "bf16")
    _fill(bf16, "enabled", precision == "bf16", f"train.precision={t.precision} (resolved: {precision})",
          f"set train.precision={'fp32' if bf16.get('enabled') is False else 'bf16'}", name="bf16.enabled")

    zero = _section(ds, "zero_optimization")
    stage = zero.get("stage", 0)
    if stage not in (2, 3) or isinstance(stage, bool):
        raise ConfigError(f"DeepSpeed config zero_optimization.stage={json.dumps(stage)} is unsupported; set it "
                          f"to 2 or 3 (see ds_configs/zero2.json, zero3.json)")
    if cfg.optimizer.name == "adamw8bit" and (stage == 3 or (cfg.relora.enabled and cfg.relora.phase_stage == "3")):
        # ZeRO-3's per-parameter optimizer-state API (safe_get/set_local_optimizer_state) reads
        # full-size fp32 state by key; bitsandbytes keeps uint8 codes + per-block absmax instead.
        raise ConfigError("optimizer.name=adamw8bit under ZeRO-3: this system reads and prunes 8-bit state only "
                          "through ZeRO-2's flat partitions; use ds_configs/zero2.json (relora.phase_stage=same) "
                          "or optimizer.name=adamw")
    if stage == 3 and cfg.relora.enabled:
        # Params below the persistence threshold keep a full replica in p.data that the forward
        # uses, so a shard-local merge into ds_tensor would be silently ignored (checked on
        # DeepSpeed 0.19.8: stage3_param_persistence_threshold defaults to 1e5 elements).
        _fill(zero, "stage3_param_persistence_threshold", 0,
              "ReLoRA on ZeRO-3 (params under the threshold keep a full replica, so shard-local merges "
              "would be silently bypassed)", "0, or use ds_configs/zero2.json",
              name="zero_optimization.stage3_param_persistence_threshold")
    elif stage == 3:
        zero.setdefault("stage3_param_persistence_threshold", "auto")
        if zero["stage3_param_persistence_threshold"] == "auto":
            zero.pop("stage3_param_persistence_threshold")
    # We pass a torch optimizer (optimizer.name) as a client optimizer (decoupled decay, param groups).
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    # "auto" bucket sizes stay until the engine is built: they come from the model (model_buckets).
    leftovers = [k for k, v in _walk(ds) if v == "auto" and k.split(".")[-1] not in BUCKET_KEYS]
    if leftovers:
        raise ConfigError(f"DeepSpeed config keys {', '.join(leftovers)} are \"auto\" but relora_dist cannot "
                          f"fill them; set explicit values")
    return ds


def relora_phase_ds_config(ds: dict, cfg: Config) -> dict:
    """The DeepSpeed config of the ReLoRA phase: the warm start's, or with relora.phase_stage=3 the
    same under ZeRO-3 (frozen bf16 weights sharded 1/world instead of replicated; persistence
    threshold 0 for the reason build_ds_config gives)."""
    if cfg.relora.phase_stage != "3" or zero_stage(ds) == 3:
        return ds
    out = copy.deepcopy(ds)
    zero = out["zero_optimization"]
    for key in ("reduce_scatter", "allgather_partitions", "allgather_bucket_size"):  # ZeRO-1/2 keys
        zero.pop(key, None)
    zero.update(stage=3, stage3_param_persistence_threshold=0)
    return out


# DeepSpeed's default gradient-reduction bucket, in elements (deepspeed/runtime/zero/config.py).
DS_REDUCE_BUCKET = 500_000_000


BUCKET_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size")


def model_buckets(trainable_numel: int) -> dict[str, int]:
    """The bucket sizes a DeepSpeed config gets for "auto" (absent keys keep DeepSpeed's defaults).

    Both stages allocate a `reduce_bucket_size`-element gradient bucket in the compute dtype:
    ZeRO-2 at every backward (part of each step's peak), ZeRO-3 at engine start for good; at the
    default 5e8 it outgrows the model's gradients. "auto" caps it at the trainable elements, all
    the gradients one backward can put in it, so the engine reduces exactly as often as with the
    default: same collectives, less memory. Hugging Face's rule (hidden_size^2 elements,
    transformers' integrations/deepspeed.py) cuts ZeRO-3's bucket further but reduces in many small
    pieces, measurably slower; set the key explicitly to trade that way. The figures:
    docs/benchmarks.md, "DeepSpeed's reduction bucket".
    `stage3_prefetch_bucket_size` "auto" keeps DeepSpeed's default."""
    return {"reduce_bucket_size": max(1, min(DS_REDUCE_BUCKET, trainable_numel))}


def with_model_buckets(ds: dict, trainable_numel: int) -> dict:
    """`ds` with its "auto" bucket sizes filled by `model_buckets` (a copy); an "auto" key the stage
    does not use is dropped, and `ds` comes back as it is when nothing is "auto"."""
    zero = ds.get("zero_optimization", {})
    auto = [k for k in BUCKET_KEYS if zero.get(k) == "auto"]
    if not auto:
        return ds
    sizes = model_buckets(trainable_numel)
    out = copy.deepcopy(ds)
    for key in auto:
        if key in sizes:
            out["zero_optimization"][key] = sizes[key]
        else:
            del out["zero_optimization"][key]
    return out


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def zero_stage(ds: dict) -> int:
    return int(ds["zero_optimization"]["stage"])
