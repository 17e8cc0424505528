"""Resuming a run from the project's sharded checkpoints (checkpoint.py): which checkpoint, whether
it belongs to this run (the run identity), and loading it into a Trainer at any world size and ZeRO
stage. Loading reads safetensors and JSON only: nothing is unpickled."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from relora_dist.checkpoint import (
    ADAM_KEYS,
    LATEST,
    MANIFEST,
    CheckpointError,
    ShardReader,
    find_latest,
    list_checkpoints,
)

# --- loading ---------------------------------------------------------------------------------------
MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def check_compatible(manifest: dict, trainer, ckpt_dir: Path) -> None:
    """Refuse a checkpoint of another model or adapter layout (before anything is written)."""
    ours = trainer.model_config.to_dict()
    for key in MODEL_KEYS:
        if manifest["model_config"].get(key) != ours.get(key):
            raise CheckpointError(
                f"{ckpt_dir / MANIFEST}: model {key}={manifest['model_config'].get(key)} but this run has "
                f"{ours.get(key)}; resume with the checkpoint's config ({ckpt_dir / 'config.yaml'}) or use a new output_dir")
    if manifest["phase"] == "relora":
        theirs = manifest["relora"]
        if theirs["r"] != trainer.cfg.relora.r or theirs["wrapped_modules"] != sorted(trainer.modules):
            raise CheckpointError(
                f"{ckpt_dir / MANIFEST}: adapters r={theirs['r']} over {len(theirs['wrapped_modules'])} modules but "
                f"this run has r={trainer.cfg.relora.r} over {len(trainer.modules)}; keep relora.r and relora.targets")


def load_checkpoint(trainer, ckpt_dir: str | Path) -> dict:
    """Restore params, fp32 masters, merge masters, Adam moments and step, data position, RNG and
    counters into a Trainer built for the checkpoint's phase, at any world size and ZeRO stage.
    Every rank reads the full tensors it needs from all files and keeps only its own shard."""
    ckpt_dir = Path(ckpt_dir)
    reader = ShardReader(ckpt_dir)
    m = reader.manifest
    check_compatible(m, trainer, ckpt_dir)
    backend, engine, masters = trainer.backend, trainer.engine, trainer.masters
    frozen_fields = ("merge_master", "weight", "master")
    for name, p in trainer.model.named_parameters():
        if p.requires_grad and engine is not None:
            field = "master" if reader.has(name, "master") else "merge_master" if reader.has(name, "merge_master") else "weight"
            backend.write_trainable(p, reader.full(name, field).float())
        else:
            field = next(f for f in frozen_fields if reader.has(name, f) or f == "master")
            backend.write_frozen(p, reader.full(name, field))
    if masters is not None:
        for module, mod in trainer.modules.items():
            name = f"{module}.weight"
            # Fields hold full tensors whatever layout wrote them (replicated or sharded masters, any
            # world size): each rank copies out its own slice, in place (keeps pinned host memory).
            if masters.kept:
                field = "merge_master" if reader.has(name, "merge_master") else "weight"
                masters.shards[module].copy_(backend.master_slice_of(mod.weight, reader.full(name, field).float()))
            if reader.has(name, "w_switch") and masters.at_switch:
                masters.at_switch[module] = backend.master_slice_of(
                    mod.weight, reader.full(name, "w_switch").float()).clone()
    if engine is not None and m.get("adam_step") is not None:
        backend.init_optimizer_state(engine, int(m["adam_step"]))
        for name, p in trainer.model.named_parameters():
            if p.requires_grad:
                for key in ADAM_KEYS:
                    if reader.has(name, key):
                        backend.write_optimizer_state(p, key, reader.full(name, key))
    trainer.loader.load_state_dict(m["data_loader"])
    st = trainer.state
    st.step, st.tokens_seen, st.restart_index, st.phase = (
        m["global_step"], m["tokens_seen"], m["restart_index"], m["phase"])
    st.skipped_steps = int(m.get("skipped_steps", 0))
    rng = reader.rng_state(trainer.info.rank)
    if rng is not None:
        torch.set_rng_state(rng)
    cuda_rng = reader.rng_state(trainer.info.rank, "rng/cuda")
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    return m


# Settings that make a checkpoint another run's when they differ (train.max_steps may change: it
# extends or shortens the same run).
RUN_IDENTITY = {"model": None, "data": ("seq_len",), "train": ("global_batch_size", "seed"),
                "relora": ("enabled", "warm_start_steps", "r", "alpha", "targets", "cycle_length")}


def _identity_diff(ours: dict, theirs: dict) -> str | None:
    for section, keys in RUN_IDENTITY.items():
        for key in keys or ours.get(section, {}).keys():
            a, b = ours.get(section, {}).get(key), theirs.get(section, {}).get(key)
            if a != b:
                return f"{section}.{key} {b!r} there vs {a!r} here"
    return None


def check_output_dir(cfg, checkpoint_root: str | Path) -> None:
    """Refuse to train over another run's checkpoints: with checkpoint.resume='' any existing
    checkpoint, with 'auto' one whose run-defining settings differ (torchtitan-style auto-resume
    of the same run is what a preempted cluster job needs). checkpoint.overwrite lifts both."""
    import yaml

    from relora_dist.config import to_dict

    ck = cfg.checkpoint
    if ck.resume and ck.resume != "auto":
        if not (Path(ck.resume) / MANIFEST).is_file():
            raise CheckpointError(f"checkpoint.resume={ck.resume}: no {MANIFEST} there; pass a step_* directory or auto")
        return
    latest = find_latest(checkpoint_root)
    if latest is None or ck.overwrite:
        return
    if not ck.resume:
        raise CheckpointError(
            f"{checkpoint_root} already holds checkpoints ({latest.name}); pass --checkpoint.resume=auto to "
            f"continue that run, --checkpoint.overwrite=true to replace it, or another --run.output_dir")
    saved = latest / "config.yaml"
    theirs = yaml.safe_load(saved.read_text()) if saved.is_file() else {}
    diff = _identity_diff(to_dict(cfg), theirs or {})
    if diff:
        raise CheckpointError(
            f"{latest} belongs to another run ({diff}); use another --run.output_dir, or "
            f"--checkpoint.overwrite=true to replace it")


def remove_checkpoints(checkpoint_root: str | Path) -> None:
    """checkpoint.overwrite: a new run replaces the old checkpoints (rank 0 only)."""
    root = Path(checkpoint_root)
    for path in list_checkpoints(root):
        shutil.rmtree(path, ignore_errors=True)
    (root / LATEST).unlink(missing_ok=True)
