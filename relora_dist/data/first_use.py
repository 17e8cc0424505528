"""Preparing data on first use: the cache folder a run prepares its sources into when
data.prepared_dir is unset, and how the ranks of a launch share that preparation.

One process per node prepares (local rank 0: a cache_dir on node-local disk gets its own copy on
every node, a shared one is raced for and one copy wins by an atomic rename); the other ranks poll
the file system for the finished folder (its meta.json) instead of waiting in a collective. A
collective is bounded by RELORA_DIST_TIMEOUT_S (300 s), and preparing a large corpus takes longer:
a barrier here ended such runs with exit 3 and "lost its peers", which did not say that data was
being prepared. The waiting ranks have a bound of their own, data.prepare_timeout_s, and end with a
one-line error that says to prepare the data beforehand (relora-prepare-data).

This happens after the process group exists (so the rendezvous store is there) but uses no
collective: before the process group, the ranks other than 0 would wait at the rendezvous for rank
0's store instead, again bounded by RELORA_DIST_TIMEOUT_S. The preparer posts its outcome in the
rendezvous store, which lives exactly as long as the launch (a marker file would outlive a failed
launch and fail the next one's waiters at once): a failed preparation reaches every waiter within
a poll, and a preparer that died (the store it hosted is gone) too.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time

from relora_dist.data.blocks import FORMAT_VERSION, DataError
from relora_dist.data.tokenizer import tokenizer_checksum

__all__ = ["ensure_prepared", "cache_folder", "wait_for_prepared", "WaitError", "DEFAULT_PREPARE_TIMEOUT_S"]

DEFAULT_PREPARE_TIMEOUT_S = 1800.0  # = config.DataConfig.prepare_timeout_s
POLL_S = 1.0
PROGRESS_EVERY_S = 30.0


class WaitError(DataError):
    """A waiting rank stopped on its own (its bound ran out, or the preparer vanished): the launcher
    prints it on every rank, since rank 0 is busy preparing or gone and says nothing of it."""

    every_rank = True


def _cache_key(sources, tokenizer_dir, seq_len, val_fraction, seed, extra: dict) -> str:
    items = []
    for src in sources or []:
        if not os.path.isfile(src):
            raise DataError(f"data file {src!r} not found; check the path")
        st = os.stat(src)
        # path + size + mtime: cheap, and changes whenever the file is rewritten.
        items.append([os.path.abspath(src), st.st_size, st.st_mtime_ns])
    payload = {"format_version": FORMAT_VERSION, "sources": items,
               "tokenizer": tokenizer_checksum(tokenizer_dir), "seq_len": seq_len,
               "val_fraction": val_fraction, "seed": seed, **extra}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"L{seq_len}-{digest}"


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "meta.json"))


def _prepare_atomic(target: str, **kwargs) -> None:
    """Prepare into a temp dir beside ``target`` and rename it into place, so other
    processes never see a half-written directory; a lost race just discards our copy."""
    from relora_dist.data.prepare import prepare_dataset

    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.tmp-")
    try:
        prepare_dataset(out_dir=tmp, **kwargs)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _store():
    """The launch's rendezvous store (the process group's own, whatever its init method), or None
    where this torch has no such accessor (then a waiter learns only from the file system)."""
    from torch.distributed import distributed_c10d

    try:
        return distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - AttributeError (another torch) or no default group
        return None


def _hint(sources, tokenizer_dir: str, seq_len: int) -> str:
    what = f"--input {' '.join(sources)}" if sources else "--hf_dataset NAME"
    return (f"run relora-prepare-data {what} --tokenizer {tokenizer_dir} --seq_len {seq_len} --out DIR "
            f"first and pass --data.prepared_dir=DIR")


def wait_for_prepared(target: str, timeout_s: float, *, rank: int, preparer: int, hint: str = "",
                      store=None, key: str = "", announce: bool = True,
                      progress_every_s: float | None = None) -> str:
    """Poll until ``target`` holds a finished preparation (its meta.json) and return it. Raises a
    one-line DataError when the preparer posts a failure in ``store`` (under ``key``), when the
    store it hosts stops answering, or after ``timeout_s`` (recorded in the store under
    ``key + "/gave_up"`` so the preparer stops the run too rather than going on alone)."""
    progress_every_s = progress_every_s or PROGRESS_EVERY_S
    start = time.monotonic()
    next_note = start + progress_every_s
    while True:
        if _is_complete(target):
            return target
        if store is not None:
            try:
                status = store.get(key).decode() if store.check([key]) else ""
            except Exception as e:  # noqa: BLE001 - DistStoreError, RuntimeError: the store is gone
                raise WaitError(f"rank {rank}: rank {preparer}, which was preparing the data into {target}, "
                                f"stopped answering ({type(e).__name__}); see its output") from None
            if status.startswith("error"):
                raise DataError(f"rank {rank}: preparing the data failed on rank {preparer}: {status[6:]}")
        now = time.monotonic()
        waited = now - start
        if waited >= timeout_s:
            if store is not None:
                try:
                    store.add(key + "/gave_up", 1)
                except Exception:  # noqa: BLE001 - the preparer is gone as well; the error below stands
                    pass
            raise WaitError(f"rank {rank}: waited data.prepare_timeout_s={timeout_s:g} s for rank {preparer} to "
                            f"prepare the data into {target}; a corpus this large is prepared beforehand: "
                            + (hint or _hint(None, "TOKENIZER", 0)))
        if announce and now >= next_note:
            print(f"rank {rank}: waiting for rank {preparer} to prepare the data into {target} "
                  f"({waited:.0f} s of data.prepare_timeout_s={timeout_s:g})", flush=True)
            next_note += progress_every_s
        time.sleep(min(POLL_S, max(0.0, timeout_s - waited)))


def cache_folder(sources: list[str] | None, tokenizer_dir: str, cache_dir: str, seq_len: int,
                 val_fraction: float = 0.05, seed: int = 0, *, hf_dataset: str | None = None,
                 hf_split: str = "train", text_field: str = "text", txt_split: str = "paragraph") -> str:
    """The folder ensure_prepared uses for these inputs, prepared or not (complete once it holds
    meta.json)."""
    extra = {"hf_dataset": hf_dataset, "hf_split": hf_split, "text_field": text_field,
             "txt_split": txt_split}
    return os.path.join(os.path.abspath(cache_dir),
                        _cache_key(sources, tokenizer_dir, seq_len, val_fraction, seed, extra))


def ensure_prepared(sources: list[str] | None, tokenizer_dir: str, cache_dir: str, seq_len: int,
                    val_fraction: float = 0.05, seed: int = 0, *, hf_dataset: str | None = None,
                    hf_split: str = "train", text_field: str = "text",
                    txt_split: str = "paragraph", num_proc: int = 1,
                    timeout_s: float = DEFAULT_PREPARE_TIMEOUT_S, local_rank: int | None = None) -> str:
    """Return a directory of prepared data for these inputs, preparing it on first use.

    Cached under ``cache_dir/<key>`` where the key hashes source paths+sizes+mtimes, the
    tokenizer checksum, seq_len, val_fraction and seed. Under an initialized
    ``torch.distributed`` the local rank 0 of each node (``local_rank``, default $LOCAL_RANK)
    prepares and every other rank waits for the folder without a collective (module docstring),
    at most ``timeout_s`` seconds.
    """
    import torch

    extra = {"hf_dataset": hf_dataset, "hf_split": hf_split, "text_field": text_field,
             "txt_split": txt_split}
    target = cache_folder(sources, tokenizer_dir, cache_dir, seq_len, val_fraction, seed, **extra)
    key = os.path.basename(target)
    if _is_complete(target):
        return target
    kwargs = dict(sources=sources, tokenizer_dir=tokenizer_dir, seq_len=seq_len,
                  val_fraction=val_fraction, seed=seed, num_proc=num_proc, **extra)
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        _prepare_atomic(target, **kwargs)
        return target
    rank = dist.get_rank()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    # torchrun and the deepspeed launcher number a node's ranks contiguously from its local rank 0
    preparer = rank - local_rank
    store_key = f"relora/first_use/{key}/{preparer}"
    store = _store()
    hint = _hint(sources, tokenizer_dir, seq_len)
    if local_rank != 0:
        return wait_for_prepared(target, timeout_s, rank=rank, preparer=preparer, hint=hint,
                                 store=store, key=store_key, announce=local_rank == 1)
    print(f"rank {rank}: preparing the data into {target} (first use); the other ranks on this node wait "
          f"up to data.prepare_timeout_s={timeout_s:g} s", flush=True)
    try:
        _prepare_atomic(target, **kwargs)
    except Exception as e:  # noqa: BLE001 - every failure reaches the waiters, as one line
        line = _one_line(e) if isinstance(e, DataError) else f"{type(e).__name__}: {_one_line(e)}"
        if store is not None:
            try:
                store.set(store_key, "error " + line)
            except Exception:  # noqa: BLE001 - then the waiters see the store gone or wait out their bound
                pass
        if isinstance(e, DataError):
            raise
        raise DataError(f"preparing the data into {target} failed: {line}") from e
    if store is not None:
        store.set(store_key, "ok")
        gave_up = store.add(store_key + "/gave_up", 0)
        if gave_up:
            raise DataError(f"rank {rank}: the data is prepared in {target}, but {gave_up} rank(s) stopped "
                            f"waiting for it after data.prepare_timeout_s={timeout_s:g} s; rerun (the prepared "
                            f"folder is reused), or {hint}")
    return target
