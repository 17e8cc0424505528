"""What keeps one run's output from being changed under it: an exclusive lock per output folder,
fingerprints of the data and tokenizer a run was started with, and the timeline of its checkpoints
(which ones a resume abandons, which ones retention keeps).

Without these, measured with a tiny config: two launches into one output_dir both exited
0 and every kept checkpoint held the second run's weights; data or a tokenizer replaced at the same
path resumed silently (the eval loss jumped); resuming an older step_N let retention delete the
checkpoint just written while `latest` named a removed folder; a skip streak or a collapsed model
(relora.lr=1e4: ppl 8000, grad norm 0) pushed the last good checkpoint out of retention.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from relora_dist.checkpoint.integrity import fsync_path as _fsync

LOCK_FILE = ".relora.lock"
_HELD: dict[str, int] = {}  # realpath of a locked folder -> the open lock file (one per process)


class LockHeld(ValueError):
    """Another live process owns the output folder (a one-line bad-input error: exit 2)."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"


def _refusal(folder: Path, lock: Path) -> LockHeld:
    return LockHeld(f"{folder} is in use by another run ({_holder(lock)}, lock {lock}); wait for it to finish, "
                    f"stop it, or use another --run.output_dir")


def check_unlocked(folder: str | Path) -> None:
    """Before the process group: refuse a folder whose lock a live process holds. Takes a shared
    lock for an instant (so probes of the ranks of one launch never refuse each other) and creates
    nothing: a folder without a lock file is free."""
    import fcntl

    folder = Path(folder)
    lock = folder / LOCK_FILE
    if os.path.realpath(folder) in _HELD or not lock.is_file():
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _refusal(folder, lock) from None
    finally:
        os.close(fd)  # closing releases the shared lock


def acquire(folder: str | Path, tries: int = 20) -> None:
    """Hold an exclusive flock on <folder>/.relora.lock for the rest of this process (rank 0). The
    kernel releases it when the process dies, however it dies, so a lock is never stale; the file
    records the holder's pid and host for the refusal line. A few retries absorb another launch's
    instant probe (check_unlocked). flock is per node on most network filesystems: two launches of
    one output_dir from different nodes are not caught."""
    import fcntl

    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _HELD:
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or attempt == tries - 1:
                os.close(fd)
                raise _refusal(folder, lock) from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())
    os.fsync(fd)
    _HELD[key] = fd


def locked_folders(cfg) -> list[Path]:
    """run.output_dir, and checkpoint.dir when it lies elsewhere."""
    folders = [Path(cfg.run.output_dir)]
    if cfg.checkpoint.dir and os.path.realpath(cfg.checkpoint.dir) != os.path.realpath(folders[0]):
        folders.append(Path(cfg.checkpoint.dir))
    return folders


def lock_output(cfg, info) -> None:
    """Rank 0 owns the output folders for the process's lifetime (acquire); a second run into them
    stops here, on every rank, before anything is written (ConfigError: exit 2, one line)."""
    import torch.distributed as dist

    from relora_dist.config import ConfigError

    error = None
    if info.is_main:
        try:
            for folder in locked_folders(cfg):
                acquire(folder)
        except LockHeld as e:
            error = str(e)
    errors = [None] * info.world_size
    dist.all_gather_object(errors, error)
    if errors[0]:
        raise ConfigError(errors[0])


# --- fingerprints of the inputs ----------------------------------------------------------------------
def data_fingerprint(data_dir: str | Path) -> str:
    """The prepared data's content: the sha256 of train.bin and val.bin that prepare_dataset records
    in meta.json, else (data prepared by an older version or by hand) the sha256 of meta.json."""
    meta_path = Path(data_dir) / "meta.json"
    raw = meta_path.read_bytes()
    try:
        recorded = json.loads(raw).get("data_sha256")
    except (ValueError, AttributeError):
        recorded = None
    return recorded or "meta:" + hashlib.sha256(raw).hexdigest()


def run_fingerprints(cfg, tokenizer_dir: str | None = None) -> dict[str, str]:
    """{"data": ..., "tokenizer": ...} of this config's inputs. data.prepared_dir: its content
    fingerprint; otherwise the data cache's key (sources' paths, sizes and mtimes, the tokenizer,
    seq_len, val_fraction, seed), the same key that names the prepared folder."""
    from relora_dist.data.check import tokenizer_dir_of
    from relora_dist.data.first_use import _cache_key
    from relora_dist.data.prepare import DEFAULT_CORPUS
    from relora_dist.data.tokenizer import tokenizer_fingerprint

    d = cfg.data
    tokenizer_dir = tokenizer_dir or tokenizer_dir_of(cfg)  # the init_from folder's own, when it has one
    if d.prepared_dir:
        data = data_fingerprint(d.prepared_dir)
    else:  # the arguments Trainer gives ensure_prepared
        data = "cache:" + _cache_key(d.sources or [str(DEFAULT_CORPUS)], tokenizer_dir, d.seq_len, d.val_fraction,
                                     cfg.train.seed, {"hf_dataset": None, "hf_split": "train", "text_field": "text",
                                                      "txt_split": "paragraph"})
    return {"data": data, "tokenizer": tokenizer_fingerprint(tokenizer_dir)}


def fingerprint_changes(cfg, manifest: dict) -> dict[str, tuple]:
    """{"data.prepared_dir" | "data.sources" | "data.tokenizer_dir": (checkpoint's, this run's)} for
    inputs whose content changed since the checkpoint was written (same path or not); allowed like
    any other identity change with --checkpoint.allow_changes=<that key>."""
    saved = manifest.get("fingerprints")  # absent in checkpoints of older versions
    if not isinstance(saved, dict) or not saved:
        return {}
    try:
        ours = run_fingerprints(cfg)
    except OSError:  # missing data or tokenizer: validation names it
        return {}
    keys = {"data": "data.prepared_dir" if cfg.data.prepared_dir else "data.sources", "tokenizer": "data.tokenizer_dir"}
    return {keys[k]: (f"contents {saved[k][:16]}", f"contents {ours[k][:16]}") for k in keys
            if k in saved and saved[k] != ours[k]}


# --- the timeline of checkpoints ----------------------------------------------------------------------
def step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])




def abandon_newer(root: str | Path, resumed_from: Path, checkpoints: list[Path],
                  latest: str = "latest") -> tuple[list[str], Path | None]:
    """Resuming step_N with newer step_M present starts a new timeline: the newer ones belong to the
    abandoned one. They move into <root>/abandoned-<UTC time>/ (kept for inspection, never picked by
    a plain relaunch or by retention) and the `latest` pointer names step_N again. Rank 0, at
    start-up. (checkpoint/format.py imports this module, so nothing here imports it.)"""
    root = Path(root)
    newer = [p for p in checkpoints if step_of(p) > step_of(resumed_from)]
    if not newer:
        return [], None
    aside = root / f"abandoned-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    aside.mkdir(exist_ok=True)
    for p in newer:
        os.replace(p, aside / p.name)
    if resumed_from.parent.resolve() == root.resolve():
        tmp = root / f".{latest}.tmp"
        tmp.write_text(resumed_from.name)
        _fsync(tmp)
        os.replace(tmp, root / latest)
    _fsync(root)
    return [p.name for p in newer], aside


def _manifest(path: Path) -> dict:
    try:
        m = json.loads((path / "manifest.json").read_text())
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def to_keep(checkpoints: list[Path], keep_last: int, just_written: Path) -> set[Path]:
    """Retention: the newest `keep_last` by step, the one just written, the one with the lowest eval
    loss recorded at its own step, and the newest one saved outside a non-finite skip streak (one
    saved during a streak holds the last finite model, but the run may be about to stop)."""
    ordered = sorted(checkpoints, key=step_of)
    keep = set(ordered[-keep_last:]) | {just_written}
    manifests = {p: _manifest(p) for p in ordered}
    evaluated = [(m["eval_loss"], -step_of(p), p) for p, m in manifests.items()
                 if isinstance(m.get("eval_loss"), (int, float))]
    if evaluated:
        keep.add(min(evaluated)[2])
    clean = [p for p in ordered if not manifests[p].get("skipped_in_a_row")]
    if clean:
        keep.add(clean[-1])
    return keep


def remove_checkpoint(path: Path) -> None:
    """Rename to .del-<name> first (listing and `latest` ignore it at once), then delete: a kill
    midway leaves a .del- folder that the next start-up removes, never a half-deleted step_N."""
    gone = path.parent / f".del-{path.name}"
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)
