"""Preparing data: documents -> token ids -> packed fixed-length blocks on disk (the format is
described in :mod:`relora_dist.data.blocks`). The cache that prepares a corpus on first use is in
first_use.py.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import warnings

import numpy as np

from relora_dist import resources
from relora_dist.data.blocks import FORMAT_VERSION, SPLITS, DataError, check_seq_len
from relora_dist.data.tokenizer import load_tokenizer, tokenizer_checksum

__all__ = ["DEFAULT_CORPUS", "DEFAULT_TOKENIZER", "prepare_dataset"]

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = resources.CORPUS
DEFAULT_TOKENIZER = resources.TOKENIZER

# ----------------------------------------------------------------------------- preparing
DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MB uint16 files: 6.9B tokens of C4 make ~50 shards (one fd each when read)
# Recorded in meta.json: how documents are assigned to val (_val_mask; folders without the key used it too).
SPLIT_RULE = "permutation(seed)[:round(n * val_fraction)]"
# Recorded in the manifest's header: a manifest of the earlier layout (shards cut by token count) is
# not resumed into this one.
SHARD_RULE = "one shard per unit of shard_tokens * 4 bytes of text"


def _dtype_for(vocab_size: int) -> np.dtype:
    # ids are < vocab_size, so uint16 holds every id when vocab_size - 1 <= 65535.
    return np.dtype(np.uint16 if vocab_size - 1 <= np.iinfo(np.uint16).max else np.uint32)


def _val_mask(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation documents: a seeded random subset, so both splits span
    the whole corpus (the bundled one is ordered by book)."""
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)  # keep at least one doc on each side
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return mask


def prepare_dataset(sources: list[str] | None, tokenizer_dir: str, out_dir: str, seq_len: int,
                    val_fraction: float = 0.05, seed: int = 0, hf_dataset: str | None = None,
                    hf_split: str = "train", text_field: str = "text", num_proc: int = 1,
                    txt_split: str = "paragraph", shard_tokens: int | None = None, progress: bool = True) -> dict:
    """Tokenize documents, split train/val by document, pack into ``seq_len`` blocks.

    Reads the inputs as a stream (relora_dist.data.stream) on ``num_proc`` processes and writes token
    shards of about ``shard_tokens`` tokens (relora_dist.data.shards): ``out_dir/{train,val}.bin`` when
    one shard holds everything, else ``{train,val}-NNNNN.bin``, then ``out_dir/meta.json`` (written
    last: its presence marks a complete directory). An ``out_dir`` holding the finished shards of an
    interrupted run with the same arguments is resumed. The bytes depend on the arguments only, never
    on ``num_proc``. Returns the meta dict.
    """
    from tqdm.auto import tqdm

    from relora_dist.data.shards import MANIFEST, ShardLog
    from relora_dist.data.pool import Pool
    from relora_dist.data.stream import BYTES_PER_TOKEN, count, hf_units, plan_tasks, work

    check_seq_len(seq_len)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1); e.g. 0.05")
    if txt_split not in ("paragraph", "line", "document"):
        raise DataError(f"txt_split={txt_split!r} is invalid; use paragraph, line or document")
    shard_tokens = int(shard_tokens or DEFAULT_SHARD_TOKENS)
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens} must be positive; e.g. {DEFAULT_SHARD_TOKENS}")
    sources = list(sources or [])
    if not sources and not hf_dataset:
        raise DataError("no data given; pass source files (e.g. DEFAULT_CORPUS) or hf_dataset")
    tok = load_tokenizer(tokenizer_dir)  # here, not first in a worker: a bad tokenizer is one error
    dtype = _dtype_for(tok.vocab_size)
    # One shard per unit of input text: ~shard_tokens tokens at ~4 bytes of text per token.
    unit_bytes = max(1 << 14, shard_tokens * BYTES_PER_TOKEN)
    identity = source_identity(sources, hf_dataset, hf_split)
    header = {"source_identity": identity, "tokenizer_checksum": tokenizer_checksum(tokenizer_dir),
              "dtype": dtype.name, "val_fraction": val_fraction, "seed": seed, "text_field": text_field,
              "txt_split": txt_split, "split_rule": SPLIT_RULE, "shard_tokens": shard_tokens,
              "unit_bytes": unit_bytes, "shard_rule": SHARD_RULE}
    log = ShardLog(out_dir, header, dtype)
    if log.done:
        logger.warning("resuming %s: %d finished shards kept", out_dir, len(log.done))
    # A Hugging Face unit travels to its worker as text: 16 MB at most, so the 2 x num_proc units in
    # flight stay ~1 GB at 32 processes (more, smaller shards: prefer downloaded files at scale).
    hf = (len(sources), (hf_dataset, hf_split), text_field, min(unit_bytes, 16 << 20)) if hf_dataset else None

    with Pool((tokenizer_dir, dtype.name, text_field), max(1, num_proc)) as pool:
        # Counting pass, on the workers: they decompress and cut the inputs into units.
        calls = [(t, unit_bytes) for t in plan_tasks(sources, txt_split, unit_bytes)] if sources else []
        found = {id(args): r for args, r in pool.run(count, calls)}
        units = [u for args in calls for u in found[id(args)]]
        del found
        per_unit = [n for _, n in units]
        if hf:  # read here, once to count and once to tokenize (no file a worker could open)
            per_unit += [len(u[2][1]) for u in hf_units(*hf)]
        mask = _val_mask(sum(per_unit), val_fraction, seed).view(np.uint8)
        starts = np.concatenate([[0], np.cumsum(per_unit)]).astype(np.int64)
        todo = itertools.chain((u for u, _ in units), hf_units(*hf) if hf else ())
        work_calls = ((u, mask[starts[k]:starts[k + 1]].tobytes(), out_dir, k)
                      for k, u in enumerate(todo) if k not in log.done)
        done = sum(v["tokens"] for v in log.totals().values())
        pool.progress.value = done
        with tqdm(unit="tok", unit_scale=True, desc="tokenizing", initial=done, mininterval=1.0,
                  disable=not progress) as bar:
            def tick():
                bar.update(pool.progress.value - bar.n)
                bar.set_postfix(shards=f"{len(log.done)}/{len(per_unit)}", refresh=False)

            for _args, entry in pool.run(work, work_calls, tick):
                log.add(entry)
            tick()
    files = log.finish(seq_len, len(per_unit))
    docs = files["num_documents"]
    n = docs["train"] + docs["val"]
    if n == 0:
        raise DataError("the sources contain no non-empty documents; check --input / --text_field")
    if n == 1 and docs["val"]:  # as before: a single document is training data (then warned about below)
        files = _swap_splits(out_dir, files)
    if val_fraction > 0 and files["num_blocks"]["val"] == 0:
        fix = ("the sources are a single document and the split takes whole documents, so no val_fraction "
               "helps: split the text into documents (blank lines between paragraphs, txt_split='line', or one "
               "jsonl record each)" if n == 1 else "raise val_fraction to evaluate")
        warnings.warn(f"validation split has {files['num_tokens']['val']} tokens, fewer than "
                      f"one block of {seq_len}; {fix}")
    meta = {
        "format_version": files["format_version"],
        # what a resume compares (run_guard.data_fingerprint): the bytes a run reads, every shard
        "data_sha256": files["data_sha256"],
        "source_identity": identity,
        "tokenizer_checksum": header["tokenizer_checksum"],
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "seq_len": seq_len,
        "dtype": dtype.name,
        "num_documents": files["num_documents"],
        "num_tokens": files["num_tokens"],
        "num_blocks": files["num_blocks"],
        "val_fraction": val_fraction,
        "seed": seed,
        "split_rule": SPLIT_RULE,
        "shard_tokens": shard_tokens,
        "sources": [os.path.abspath(s) for s in sources]
                   + ([f"hf:{hf_dataset}[{hf_split}]"] if hf_dataset else []),
        "text_field": text_field,
        "txt_split": txt_split,
        **({"shards": files["shards"]} if "shards" in files else {}),
    }
    tmp = os.path.join(out_dir, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out_dir, "meta.json"))
    os.remove(os.path.join(out_dir, MANIFEST))
    logger.info("prepared %s: %s", out_dir, meta["num_blocks"])
    return meta


def _swap_splits(out_dir: str, files: dict) -> dict:
    """The single-file layout with train and val exchanged (one document: one unit, one shard)."""
    from relora_dist.data.shards import sha256_files

    t, v = (os.path.join(out_dir, f"{s}.bin") for s in SPLITS)
    os.replace(t, t + ".swap")
    os.replace(v, t)
    os.replace(t + ".swap", v)
    swapped = {k: {"train": files[k]["val"], "val": files[k]["train"]}
               for k in ("num_documents", "num_tokens", "num_blocks")}
    return {**files, **swapped, "data_sha256": sha256_files([t, v])}


def _sha256_files(paths: list[str]) -> str:
    from relora_dist.data.shards import sha256_files

    return sha256_files(paths)


_DIGESTS: dict = {}  # (path, size, mtime_ns) -> sha256 of the file, for this process


def source_identity(sources, hf_dataset=None, hf_split="train") -> list:
    """What the inputs are, by content: [size, sha256] per local file in order, then "hf:name[split]".
    relora-prepare-data compares it to tell whether --out already holds this preparation. Content,
    not paths: the same corpus reached through an installed package or a checkout is the same input.
    Hashing ran at 785 MB/s here, against ~3 MB/s of text tokenized per process (726k tok/s at
    ~4.2 bytes per token, benchmarks/data/bench_prepare_100mb_workers.json). One process hashes each file once:
    the CLI's check of --out and the preparation's header ask for the same identity."""
    ids = []
    for src in sources or []:
        if os.path.isfile(src):
            st = os.stat(src)
            key = (os.path.abspath(src), st.st_size, st.st_mtime_ns)
            if key not in _DIGESTS:
                _DIGESTS[key] = _sha256_files([src])
            ids.append([st.st_size, _DIGESTS[key]])
    return ids + ([f"hf:{hf_dataset}[{hf_split}]"] if hf_dataset else [])

