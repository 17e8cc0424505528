"""Start-up validation of a run config: every check that needs no process group, world size or
DeepSpeed config, run before any work so a bad input costs nothing. Each failure is a one-line
ConfigError that names the key and the fix.

Each rule lives in the module that applies it at run time, and this module only runs them in
order (the import order is config -> owners -> validation -> cli/trainer):

    model.py              model.* and model.init_from            -> the LlamaConfig the run builds
    relora/rules.py       relora.r/alpha/dropout, the optimizer reset, relora.targets against the model
    runtime/compile.py    train.compile against what it cannot compile
    relora/quant.py       relora.base_quant / quant_merge / quant_compute_dtype (+ bitsandbytes packing)
    relora/schedule.py    schedule.*, relora.warm_start_schedule and the jagged cosine over the ReLoRA phase
    checkpoint/resume.py  checkpoint.*, and never training over another run's checkpoints
    data/check.py         data.*: tokenizer, sources, prepared blocks vs seq_len / tokenizer / batch sizes

What is left here are the value rules of keys that no other module checks.
"""

from __future__ import annotations

import os
from pathlib import Path

from relora_dist.runtime.compile import check_compile_config
from relora_dist.config import Config, ConfigError, check_choices
from relora_dist.data.check import check_data_config, check_data_values
from relora_dist.model import check_model_config
from relora_dist.relora.quant import check_quant_config
from relora_dist.relora.rules import check_relora_config, check_relora_targets
from relora_dist.checkpoint.resume import check_checkpoint_config
from relora_dist.relora.schedule import check_schedule_config


def validate(cfg: Config) -> None:
    """Every check that needs no process group, world size or DeepSpeed config, before any work:
    values, checkpoint settings, data/tokenizer/model paths, prepared blocks vs seq_len and
    tokenizer, and ReLoRA targets and rank against the model's shapes (built on the meta device).
    Raises a one-line ConfigError that names the key and the fix."""
    # Cheap value rules first, then what reads files (checkpoints, data), then what builds the model.
    check_choices(cfg)  # every word-valued key holds one of its words (their Literal types)
    check_data_values(cfg)  # first: the eval_tokens rule below divides by data.seq_len
    check_run_values(cfg)
    check_compile_config(cfg)
    check_writable_dirs(cfg)
    if cfg.relora.enabled:
        check_relora_config(cfg)
        check_quant_config(cfg)
    check_schedule_config(cfg)
    check_checkpoint_config(cfg)
    vocab_size = check_data_config(cfg)
    model_config = check_model_config(cfg, vocab_size)
    if cfg.relora.enabled:
        check_relora_targets(cfg, model_config)


def check_run_values(cfg: Config) -> None:
    """The keys no other module checks: train.*, optimizer.*, logging.*, and the relora.* phase
    options (warm start, merges, carried state, ZeRO stage)."""
    t, r, o = cfg.train, cfg.relora, cfg.optimizer
    if t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps} must be >= 1")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ConfigError(
            f"train.micro_batch_size={t.micro_batch_size} and train.global_batch_size={t.global_batch_size} "
            f"must be >= 1")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}; change one of them"
        )
    if t.grad_clip < 0:
        raise ConfigError(f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    if t.max_skipped_steps < 1:
        raise ConfigError(f"train.max_skipped_steps={t.max_skipped_steps} must be >= 1")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every={t.eval_every} must be >= 0 (0 = only at the end)")
    if max(1, t.eval_tokens // cfg.data.seq_len) < t.micro_batch_size:
        raise ConfigError(
            f"train.eval_tokens={t.eval_tokens} is fewer than one micro-batch (train.micro_batch_size="
            f"{t.micro_batch_size} x data.seq_len={cfg.data.seq_len}); raise train.eval_tokens to at least "
            f"{t.micro_batch_size * cfg.data.seq_len} (x world size)")
    if o.lr <= 0:
        raise ConfigError(f"optimizer.lr={o.lr} must be > 0")
    if o.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(o, key) < 1:
            raise ConfigError(f"optimizer.{key}={getattr(o, key)} must be in [0, 1) (e.g. 0.9)")
    if o.eps <= 0:
        raise ConfigError(f"optimizer.eps={o.eps} must be > 0 (e.g. 1e-8)")
    if cfg.logging.peak_flops < 0:
        raise ConfigError(f"logging.peak_flops={cfg.logging.peak_flops} must be >= 0 (0 = guess from the hardware)")
    if cfg.logging.log_every < 1:
        raise ConfigError(f"logging.log_every={cfg.logging.log_every} must be >= 1")
    if not r.enabled:
        return
    if r.warm_start_steps < 0:
        raise ConfigError(f"relora.warm_start_steps={r.warm_start_steps} must be >= 0 (0 = no warm start)")
    if r.resets and r.optimizer_reset != "none" and o.name == "sgd":
        raise ConfigError(
            f"relora.optimizer_reset={r.optimizer_reset} with optimizer.name={o.name}: the optimizer reset "
            f"prunes Adam moments; use optimizer.name=adamw or relora.optimizer_reset=none"
        )
    if r.merge_master_device == "cpu" and r.merge_precision == "bf16":
        raise ConfigError("relora.merge_master_device=cpu with relora.merge_precision=bf16: bf16 merges keep "
                          "no fp32 master to place; use merge_precision=fp32 or merge_master_device=device")
    if r.carry_optimizer_state == "true" and o.name != "adamw":  # adamw8bit: 8-bit state is per flat partition
        raise ConfigError(f"relora.carry_optimizer_state=true with optimizer.name={o.name}: there are no Adam "
                          f"moments to carry; use optimizer.name=adamw or relora.carry_optimizer_state=false")
    if r.carry_optimizer_state == "true" and r.warm_start_steps == 0:
        raise ConfigError("relora.carry_optimizer_state=true with relora.warm_start_steps=0 (e.g. starting from "
                          "--init_from): this run has no warm-start optimizer state to carry; use "
                          "relora.carry_optimizer_state=false or auto")
    if r.lr < 0:
        raise ConfigError(f"relora.lr={r.lr} must be >= 0 (0 = 2 x optimizer.lr)")
    if r.effective_rank_every < -1:
        raise ConfigError(f"relora.effective_rank_every={r.effective_rank_every} must be >= -1 "
                          f"(0 = at resets, -1 = never)")


def check_writable_dirs(cfg: Config) -> None:
    """The folders a run writes (run.output_dir, checkpoint.dir, and data.cache_dir when it prepares
    data.sources) can be created and written: otherwise the first write, after the model is built,
    fails with a traceback. os.access reports a read-only file system even to root."""
    dirs = {"run.output_dir": cfg.run.output_dir, "checkpoint.dir": cfg.checkpoint.dir}
    if not cfg.data.prepared_dir:
        dirs["data.cache_dir"] = cfg.data.cache_dir
    for key, value in dirs.items():
        if not value:
            continue
        fix = f"point {key} at a writable folder"
        path = Path(value).absolute()
        while not path.exists():  # the nearest existing folder is where mkdir starts
            if path.is_symlink():
                raise ConfigError(f"{key}={value}: {path} is a symlink to {os.readlink(path)}, which does not "
                                  f"exist; create its target or {fix}")
            path = path.parent
        if not path.is_dir():
            raise ConfigError(f"{key}={value}: {path} is a file, not a folder; move it away or {fix}")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={value}: {path} is not writable (a read-only file system, or no "
                              f"permission for uid {os.getuid()}); {fix}{_container_hint(path)}")


def _container_hint(path: Path) -> str:
    """In the image (which runs as uid 1000), the usual cause is a mounted host folder owned by
    another user: `docker run -v "$PWD/runs:/opt/relora_dist/runs"` as documented."""
    try:
        owner = path.stat().st_uid
    except OSError:
        return ""
    if owner == os.getuid() or not (Path("/.dockerenv").exists() or Path("/run/.containerenv").exists()
                                    or str(path).startswith("/opt/relora_dist")):
        return ""
    return (f", or run the container as the folder's owner (docker run --user \"$(id -u):$(id -g)\" ...; "
            f"it is uid {owner}) or build the image with --build-arg UID=$(id -u) GID=$(id -g)")
