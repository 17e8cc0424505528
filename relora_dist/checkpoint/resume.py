"""Resuming a run from the project's sharded checkpoints (checkpoint/format.py): which checkpoint, whether
it belongs to this run (the run identity), and loading it into a run's components (checkpoint/state.py) at any
world size and ZeRO stage. Loading reads safetensors and JSON only: nothing is unpickled."""

from __future__ import annotations

import shutil
from pathlib import Path

from relora_dist.checkpoint.format import (
    LATEST,
    MANIFEST,
    OLDER,
    CheckpointError,
    ShardReader,
    find_latest,
    list_checkpoints,
    read_manifest,
    shard_path,
)
from relora_dist.config import SECTIONS, ConfigError, suggest, to_dict
from relora_dist.runtime.run_guard import LockHeld, abandon_newer, check_unlocked, fingerprint_changes, locked_folders
from relora_dist.checkpoint.state import CheckpointState

# --- loading ---------------------------------------------------------------------------------------
MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def check_compatible(manifest: dict, state: CheckpointState, ckpt_dir: Path) -> None:
    """Refuse a checkpoint of another model or adapter layout (before anything is written)."""
    ours = state.model_config.to_dict()
    for key in MODEL_KEYS:
        if manifest["model_config"].get(key) != ours.get(key):
            raise CheckpointError(
                f"{ckpt_dir / MANIFEST}: model {key}={manifest['model_config'].get(key)} but this run has "
                f"{ours.get(key)}; resume with the checkpoint's config ({ckpt_dir / 'config.yaml'}) or use a new output_dir")
    problem = state.relora.compatibility_problem(manifest)
    if problem:
        raise CheckpointError(f"{ckpt_dir / MANIFEST}: {problem}")


def load_checkpoint(state: CheckpointState, ckpt_dir: str | Path) -> dict:
    """Restore every component of `state` (built for the checkpoint's phase) from a checkpoint
    written at any world size and ZeRO stage: the sharded tensors, then Adam's step, the data
    position, the counters and this rank's RNG. Returns the manifest."""
    ckpt_dir = Path(ckpt_dir)
    reader = ShardReader(ckpt_dir)
    m = reader.manifest
    check_compatible(m, state, ckpt_dir)
    state.model.load_fragments(reader, m.get("adam_step"), lambda: _say_quant_change(state, ckpt_dir))
    state.loader.load_state_dict(m["data_loader"])
    state.progress.load_state_dict(m)
    # A resume at another world size: a rank with no shard of its own takes rank 0's generators.
    state.rng.load_state_dict({key: reader.rng_state(state.rank, key) for key in ("rng/cpu", "rng/cuda")})
    return m


def _say_quant_change(state: CheckpointState, ckpt_dir: Path) -> None:
    """One line when the checkpoint's relora.base_quant differs from this run's: allowed, because the
    checkpoint holds the fp32 masters, not quantized bytes."""
    theirs = (saved_config(ckpt_dir).get("relora") or {}).get("base_quant", "none")
    ours = state.cfg.relora.base_quant
    if theirs != ours and state.is_main and state.progress.phase == "relora":
        print(f"note: {ckpt_dir} was written with relora.base_quant={theirs}, this run uses {ours}: the frozen "
              f"weights come from the checkpoint's fp32 masters" + (f" and are quantized to {ours} from them"
                                                                    if ours != "none" else ""), flush=True)


# Every setting that changes the trajectory of a run (what it computes, not where or how fast):
# a resume with any of them changed is refused unless checkpoint.allow_changes lists it. Not here:
# train.max_steps (extends or shortens the run), micro_batch_size, the world size and the ZeRO
# stage (the same math in another reduction order: resumes within 1e-4), relora.phase_stage and
# relora.merge_master_device (where state lives), relora.effective_rank_every, train.compile (the same
# math compiled: losses within 1e-5), eval, logging,
# relora.base_quant / quant_compute_dtype / quant_merge / quant_double_quant (they change the trajectory, but the
# checkpoint holds fp32 masters, so a run may resume with or without quantization: one note line),
# checkpoint and output settings. None = every key of the section.
RUN_IDENTITY = {
    "model": None,
    "data": ("sources", "prepared_dir", "tokenizer_dir", "seq_len", "val_fraction"),
    "train": ("global_batch_size", "seed", "precision", "grad_clip"),
    "optimizer": None,
    "schedule": None,
    "relora": ("enabled", "warm_start_steps", "r", "alpha", "dropout", "targets", "train_extra", "cycle_length",
               "first_warmup", "restart_warmup", "lr", "resets", "min_reset_lr_ratio", "optimizer_reset", "prune_ratio",
               "prune_threshold", "merge_precision", "warm_start_schedule", "carry_optimizer_state", "lr_restarts",
               "reinit", "reinit_micro_batches"),
}
# Of those, the ones that change tensor shapes or the set of trained tensors: never allowed.
STRUCTURAL = ("model.*", "relora.enabled", "relora.r", "relora.targets")


def is_structural(key: str) -> bool:
    return key in STRUCTURAL or f"{key.split('.')[0]}.*" in STRUCTURAL


def identity_changes(ours: dict, theirs: dict) -> dict[str, tuple]:
    """{"section.key": (checkpoint's value, this run's value)} for every run-identity setting that
    differs; a key the checkpoint's config lacks (written by an older version) is not compared."""
    changes = {}
    for section, keys in RUN_IDENTITY.items():
        saved = theirs.get(section) or {}
        for key in keys or ours.get(section, {}).keys():
            if key in saved and saved[key] != ours.get(section, {}).get(key):
                changes[f"{section}.{key}"] = (saved[key], ours[section][key])
    return changes


def saved_config(ckpt_dir: Path) -> dict:
    """The config.yaml a checkpoint was written with, as a dict (a one-line error if it is damaged)."""
    import yaml

    path = ckpt_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        data = e
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        why = f"{type(data).__name__}: {' '.join(str(data).split())[:80]}" if isinstance(data, Exception) else \
            f"not a mapping of sections, got {type(data).__name__}"
        raise CheckpointError(f"{path} is damaged ({why}); {OLDER.format(root=ckpt_dir.parent)}")
    return data


def verifies(ckpt_dir: Path) -> bool:
    try:
        ShardReader(ckpt_dir, verify=True)
        saved_config(ckpt_dir)
        return True
    except CheckpointError:
        return False


def resume_target(cfg, checkpoint_root: str | Path) -> Path | None:
    """The checkpoint this launch continues from: checkpoint.resume=auto -> `latest`;
    previous -> the newest that verifies (manifest, every sha256, config); a path -> that path."""
    ck = cfg.checkpoint
    if not ck.resume or ck.overwrite:
        return None
    if ck.resume == "auto":
        return find_latest(checkpoint_root)
    if ck.resume == "previous":
        for candidate in reversed(list_checkpoints(checkpoint_root)):
            if verifies(candidate):
                return candidate
        raise CheckpointError(f"checkpoint.resume=previous: no checkpoint under {checkpoint_root} verifies; "
                              f"start over with --checkpoint.overwrite=true or use another --run.output_dir")
    return Path(ck.resume)


def check_output_dir(cfg, checkpoint_root: str | Path) -> None:
    """Refuse to train over another run's checkpoints: with checkpoint.resume='' any existing
    checkpoint; otherwise one whose run-identity settings differ from this launch's, unless
    checkpoint.allow_changes lists every changed key (torchtitan-style auto-resume of the same run
    is what a preempted cluster job needs). checkpoint.overwrite lifts both."""
    ck = cfg.checkpoint
    if ck.overwrite:
        return
    if ck.resume and ck.resume not in ("auto", "previous") and not (Path(ck.resume) / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint.resume={ck.resume}: no {MANIFEST} there; pass a step_* directory, "
                              f"auto or previous")
    if not ck.resume:
        latest = find_latest(checkpoint_root)
        if latest is not None:
            raise CheckpointError(
                f"{checkpoint_root} already holds checkpoints ({latest.name}); pass --checkpoint.resume=auto to "
                f"continue that run, --checkpoint.overwrite=true to replace it, or another --run.output_dir")
        return
    target = resume_target(cfg, checkpoint_root)
    if target is None:
        return
    manifest = read_manifest(target)  # a damaged manifest is a one-line error here, before any work
    for entry in manifest["files"]:  # a shard named outside the checkpoint, too
        shard_path(target, entry)
    changes = identity_changes(to_dict(cfg), saved_config(target))
    for key, change in fingerprint_changes(cfg, manifest).items():  # same path, other contents
        changes.setdefault(key, change)
    listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
    structural = [k for k in changes if is_structural(k)]
    if structural:
        raise CheckpointError(
            f"{target} belongs to another run ({listed}); {', '.join(structural)} cannot change within a run; "
            f"use another --run.output_dir, or --checkpoint.overwrite=true to replace it")
    refused = [k for k in changes if k not in ck.allow_changes]
    if refused:
        raise CheckpointError(
            f"{target} was written with other settings ({listed}); to continue this run with them pass "
            f"--checkpoint.allow_changes={','.join(refused)}, else use another --run.output_dir (or "
            f"--checkpoint.overwrite=true to replace it)")


def checkpoint_root(cfg) -> Path:
    """checkpoint.dir, or run.output_dir/checkpoints."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run.output_dir) / "checkpoints"


def check_checkpoint_config(cfg) -> None:
    """The checkpoint.* settings, and never train over another run's checkpoints (losing nothing):
    check_output_dir's refusals as ConfigError, before any work."""
    ck = cfg.checkpoint
    if ck.save_every < 0 or ck.keep_last < 0:
        raise ConfigError(f"checkpoint.save_every={ck.save_every} and checkpoint.keep_last={ck.keep_last} "
                          f"must be >= 0 (0 = only at the end / keep all)")
    for key in ck.allow_changes:
        section, _, name = key.partition(".")
        if section not in SECTIONS or name not in vars(getattr(cfg, section)):
            known = [f"{s}.{k}" for s in SECTIONS for k in vars(getattr(cfg, s))]
            raise ConfigError(f"checkpoint.allow_changes: unknown key '{key}': {suggest(key, known)}")
        if is_structural(key):
            raise ConfigError(f"checkpoint.allow_changes: {key} changes the model's tensors and cannot change "
                              f"within a run; drop it (use another run.output_dir for a new run)")
    try:
        # A live run's folder first: its checkpoints are not ours to judge. Every rank probes before
        # the process group; once it exists (a Trainer validating again) rank 0's lock decides,
        # since a rank probing then would see its own run's lock.
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            for folder in locked_folders(cfg):
                check_unlocked(folder)
        check_output_dir(cfg, checkpoint_root(cfg))
    except (CheckpointError, LockHeld) as e:
        raise ConfigError(str(e)) from None


def abandon_on_resume(cfg, root: Path) -> None:
    """Rank 0, at start-up: the checkpoint this launch resumes, if older than others in `root`,
    starts a new timeline (run_guard.abandon_newer), with a note."""
    target = resume_target(cfg, root)
    if target is None or Path(target).parent.resolve() != Path(root).resolve():
        return
    target = Path(target)
    moved, aside = abandon_newer(root, target, list_checkpoints(root), LATEST)
    if moved:
        print(f"note: resuming {target.name} abandons the newer {', '.join(moved)}: moved into {aside} "
              f"(never resumed or deleted by this run); `latest` names {target.name}", flush=True)


def remove_checkpoints(checkpoint_root: str | Path) -> None:
    """checkpoint.overwrite: a new run replaces the old checkpoints (rank 0 only)."""
    root = Path(checkpoint_root)
    for path in list_checkpoints(root):
        shutil.rmtree(path, ignore_errors=True)
    (root / LATEST).unlink(missing_ok=True)
