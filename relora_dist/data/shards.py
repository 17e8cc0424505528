"""Token shards: the resumable writer of a preparation and the view that reads blocks across shards.

A prepared folder holds, per split, the documents' token ids (each document followed by EOS) in one
stream, cut into files:

  * one shard: ``train.bin`` / ``val.bin``, cut to whole blocks (format 1, the layout of every
    earlier version: such folders load as before);
  * more: ``train-00000.bin`` ... and ``val-00000.bin`` ... (format 2), listed in order with their
    token counts under ``meta["shards"]``; the split's blocks are the stream's first
    ``num_blocks x seq_len`` tokens, so a block may span two files.

While preparing, each shard (one unit of the inputs, stream.py) is written by a worker, fsynced and
renamed to its final name, then recorded in ``manifest.jsonl`` by the main process (first line: what
the preparation is; one line per shard after it, in the order they finish): that line is the shard's
done-marker. A rerun with the same header keeps the recorded shards and tokenizes the other units
only; a shard file without its line is rewritten. meta.json is written last.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from relora_dist.checkpoint.integrity import fsync_path

__all__ = ["SHARDED_FORMAT_VERSION", "MANIFEST", "SHARD_RE", "ShardLog", "TokenShards"]

SHARDED_FORMAT_VERSION = 2
MANIFEST = "manifest.jsonl"
SHARD_RE = re.compile(r"(train|val)-\d{5}\.bin(\.tmp)?")
SPLITS = ("train", "val")


def sha256_files(paths: list[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


class ShardLog:
    """The record of a preparation's finished shards. Shard k holds unit k of the inputs, written by a
    worker (stream.work) as ``{train,val}-k.bin``; once both files are durable this process appends the
    shard's line to the manifest. Shards finish in any order; a rerun with the same `header` keeps every
    recorded shard whose files are whole and removes the other shard files. `header` is everything that
    determines the bytes: a manifest with another header is not resumed."""

    def __init__(self, out_dir: str, header: dict, dtype: np.dtype):
        self.dir, self.header, self.dtype = out_dir, header, np.dtype(dtype)
        os.makedirs(out_dir, exist_ok=True)
        self.done: dict[int, dict] = {e["shard"]: e for e in self._recorded()}
        keep = {f"{s}-{k:05d}.bin" for k in self.done for s in SPLITS}
        for name in os.listdir(out_dir):  # partial shards of the interrupted run, or another preparation's
            if (SHARD_RE.fullmatch(name) and name not in keep) or name in ("train.bin", "val.bin", "meta.json"):
                os.remove(os.path.join(out_dir, name))
        self._write_manifest()

    def _path(self, split: str, k: int) -> str:
        return os.path.join(self.dir, f"{split}-{k:05d}.bin")

    def _recorded(self) -> list[dict]:
        """The manifest's shards whose files are still whole, when the header matches."""
        try:
            with open(os.path.join(self.dir, MANIFEST)) as f:
                lines = f.read().splitlines()
            if json.loads(lines[0]) != json.loads(json.dumps(self.header)):
                return []
        except (OSError, ValueError, IndexError):
            return []
        done = []
        for line in lines[1:]:
            try:
                e = json.loads(line)
                ok = all(os.path.getsize(self._path(s, e["shard"])) == e[s]["tokens"] * self.dtype.itemsize
                         for s in SPLITS)
            except (ValueError, KeyError, TypeError, OSError):  # a torn last line or a missing file
                ok = False
            if ok:
                done.append(e)
        return done

    def _write_manifest(self) -> None:
        path = os.path.join(self.dir, MANIFEST)
        with open(path + ".tmp", "w") as f:
            f.write("".join(json.dumps(x) + "\n" for x in [self.header, *self.entries()]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    def entries(self) -> list[dict]:
        return [self.done[k] for k in sorted(self.done)]

    def totals(self) -> dict:
        return {s: {"documents": sum(e[s]["documents"] for e in self.done.values()),
                    "tokens": sum(e[s]["tokens"] for e in self.done.values())} for s in SPLITS}

    def add(self, entry: dict) -> None:
        """Record a shard whose files the worker has fsynced and renamed."""
        fsync_path(self.dir)  # the renames are durable before the manifest says the shard is done
        with open(os.path.join(self.dir, MANIFEST), "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[entry["shard"]] = entry

    def finish(self, seq_len: int, n_shards: int) -> dict:
        """Lay out the folder once shards 0..n_shards-1 are recorded: the meta.json fields of the token files."""
        assert sorted(self.done) == list(range(n_shards)), "finish() before every shard was recorded"
        totals = self.totals()
        blocks = {s: totals[s]["tokens"] // seq_len for s in SPLITS}
        fields = {"num_documents": {s: totals[s]["documents"] for s in SPLITS},
                  "num_tokens": {s: totals[s]["tokens"] for s in SPLITS}, "num_blocks": blocks}
        if n_shards <= 1:  # one shard: the single-file layout, the tail cut off as it always was
            paths = [os.path.join(self.dir, f"{s}.bin") for s in SPLITS]
            for s, path in zip(SPLITS, paths):
                if self.done:
                    os.replace(self._path(s, 0), path)
                with open(path, "ab") as f:
                    f.truncate(blocks[s] * seq_len * self.dtype.itemsize)
            return {"format_version": 1, "data_sha256": sha256_files(paths), **fields}
        shards = {s: [[os.path.basename(self._path(s, e["shard"])), e[s]["tokens"], e[s]["sha256"]]
                      for e in self.entries()] for s in SPLITS}
        # Covers every byte of every shard through their recorded sha256 (no second read of the data).
        digest = hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()
        return {"format_version": SHARDED_FORMAT_VERSION, "data_sha256": digest, **fields, "shards": shards}


class TokenShards:
    """The first `n_tokens` tokens of the concatenation of token files [(path, tokens), ...], read as
    blocks of `seq_len` (memory-mapped; a block that spans files is joined)."""

    def __init__(self, files: list[tuple[str, int]], dtype: np.dtype, n_tokens: int):
        self.files, self.dtype, self.n_tokens = files, np.dtype(dtype), n_tokens
        self.starts = np.concatenate([[0], np.cumsum([n for _, n in files])]).astype(np.int64)
        self.maps = [np.memmap(p, dtype=self.dtype, mode="r") if n else np.zeros(0, self.dtype) for p, n in files]

    def read(self, start: int, length: int) -> np.ndarray:
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts, end = [], start + length
        while start < end:
            lo = start - int(self.starts[k])
            take = min(end - start, len(self.maps[k]) - lo)
            parts.append(self.maps[k][lo:lo + take])
            start, k = start + take, k + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def blocks(self, indices: np.ndarray, seq_len: int) -> np.ndarray:
        out = np.empty((len(indices), seq_len), dtype=self.dtype)
        for row, i in enumerate(indices):
            out[row] = self.read(int(i) * seq_len, seq_len)
        return out
