"""Tokenize and pack a corpus into train/val blocks (logic in relora_dist.data.prepare_dataset).

Example (bundled corpus and tokenizer):
    relora-prepare-data --out data/kjv-512 --seq_len 512
    python tools/prepare_data.py --out data/kjv-512 --seq_len 512     # same, from a checkout

The inputs are streamed (.jsonl, .jsonl.gz/.xz/.bz2/.zst, .txt, .parquet) and tokenized on --num_proc
processes into token shards of about --shard_tokens tokens (each worker reads, decompresses, tokenizes
and writes its own shard). It prepares in a folder beside --out named after the inputs and settings;
interrupted (Ctrl-C, SIGTERM, a killed job), the same command again keeps the finished shards and
tokenizes the others only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile

# Light imports only: the preparation's spawned workers import this module again (it is their
# __main__), and torch in each of them would cost ~220 MB and ~2 s (measured).
from relora_dist.data.shards import MANIFEST, SHARD_RE
from relora_dist.data.stream import usable_cores
from relora_dist.data.documents import DataError
from relora_dist.resources import CORPUS as DEFAULT_CORPUS
from relora_dist.resources import TOKENIZER as DEFAULT_TOKENIZER

DEFAULT_SHARD_TOKENS = 1 << 27  # = relora_dist.data.prepare.DEFAULT_SHARD_TOKENS (tested)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="*", default=None,
                    help=f"data files: .txt / .jsonl / .jsonl.xz / .parquet "
                         f"(default: the bundled corpus {DEFAULT_CORPUS}, unless --hf_dataset)")
    ap.add_argument("--hf_dataset", default=None,
                    help="Hugging Face dataset 'name' or 'name:config' instead of/besides files (default: none)")
    ap.add_argument("--hf_split", default="train", help="split of --hf_dataset (default: train)")
    ap.add_argument("--text_field", default="text", help="text column of json/parquet/HF data (default: text)")
    ap.add_argument("--txt_split", default="paragraph", choices=["paragraph", "line", "document"],
                    help="what one document is in .txt inputs (default: paragraph)")
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                    help=f"directory holding tokenizer.model or tokenizer.json (default: {DEFAULT_TOKENIZER})")
    ap.add_argument("--out", required=True,
                    help="output directory (train.bin, val.bin, meta.json) (default: none, required)")
    ap.add_argument("--seq_len", type=int, default=512, help="tokens per block (default: 512)")
    ap.add_argument("--val_fraction", type=float, default=0.05,
                    help="fraction of documents held out for validation (default: 0.05)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the train/val document split (default: 0)")
    ap.add_argument("--num_proc", type=int, default=usable_cores(),
                    help="tokenizing processes (default: the usable cores, here %(default)s)")
    ap.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                    help="tokens per output shard (~4 bytes of input text each): one process's unit of work and "
                         "what an interrupted run keeps; one shard is written as train.bin/val.bin (default: "
                         "%(default)s = 2^27)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an earlier preparation of other inputs in --out; a run reading it keeps "
                         "reading the old files (default: off = refuse)")
    args = ap.parse_args(argv)
    sources = args.input if args.input or args.hf_dataset else [DEFAULT_CORPUS]
    # SIGTERM (a job's time limit, kill) unwinds like Ctrl-C: the pool stops, finished shards stay.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        wanted = _wanted(args, sources)
        done = _existing(args.out, wanted, args.overwrite)
        if done is not None:
            print(f"note: {args.out} already holds this preparation (same inputs, tokenizer and settings); "
                  f"nothing done", file=sys.stderr)
            meta = done
        else:
            meta = _prepare_beside(args, sources, wanted)
    except (ValueError, FileNotFoundError) as e:  # DataError and a missing input or tokenizer: one line each
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps({k: meta[k] for k in ("num_documents", "num_tokens", "num_blocks", "dtype")}))
    return 0


# What identifies a preparation: a complete --out that records the same is not prepared again.
_SAME = ("source_identity", "tokenizer_checksum", "seq_len", "val_fraction", "seed", "text_field", "txt_split")
_OURS = {"train.bin", "val.bin", "meta.json", "meta.json.tmp", MANIFEST}


def _ours(name: str) -> bool:
    return name in _OURS or bool(SHARD_RE.fullmatch(name))


def _wanted(args, sources) -> dict:
    from relora_dist.data.prepare import source_identity
    from relora_dist.data.tokenizer import tokenizer_checksum

    return {"source_identity": source_identity(sources, args.hf_dataset, args.hf_split),
            "tokenizer_checksum": tokenizer_checksum(args.tokenizer),
            "seq_len": args.seq_len, "val_fraction": args.val_fraction, "seed": args.seed,
            "text_field": args.text_field, "txt_split": args.txt_split}


def _existing(out: str, wanted: dict, overwrite: bool) -> dict | None:
    """The meta of a complete earlier preparation of the same inputs in `out` (nothing to do), None
    when `out` is absent or empty or may be replaced, else DataError. Writing into a folder that a
    run has memory-mapped truncated train.bin under it: the run died of SIGBUS."""
    if not os.path.isdir(out):
        if os.path.exists(out):
            raise DataError(f"--out {out} is a file, not a folder; pass a new folder")
        return None
    names = set(os.listdir(out))
    if not names:
        return None
    meta = None
    if "meta.json" in names:
        try:
            with open(os.path.join(out, "meta.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = None
    if not isinstance(meta, dict) or not all(map(_ours, names)):
        raise DataError(f"--out {out} is not empty and not a complete earlier preparation (it holds "
                        f"{', '.join(sorted(names)[:5])}); pass an empty or new folder")
    differ = [k for k in _SAME if meta.get(k) != wanted[k]]
    if not differ:
        return meta
    if overwrite:
        return None
    raise DataError(f"--out {out} holds a preparation of other inputs ({', '.join(differ)} differ); pass "
                    f"--overwrite to replace it (a run reading it keeps the old files), or another --out")


def _prepare_beside(args, sources, wanted) -> dict:
    """Prepare into a folder beside --out, then swap it in by renames: a run that has the old files
    memory-mapped keeps their inodes (unlinked, not truncated). The folder is named after what is
    prepared, so an interrupted run's finished shards are found and resumed by the same command;
    it is removed when the inputs are bad (a fixed input is another preparation)."""
    from relora_dist.data.prepare import prepare_dataset

    out = os.path.abspath(args.out)
    parent, name = os.path.dirname(out), os.path.basename(out)
    os.makedirs(parent, exist_ok=True)
    key = hashlib.sha256(json.dumps({**wanted, "shard_tokens": args.shard_tokens}, sort_keys=True).encode())
    tmp = os.path.join(parent, f".{name}.tmp-{key.hexdigest()[:16]}")
    os.makedirs(tmp, exist_ok=True)
    old, keep = None, False
    try:
        try:
            meta = prepare_dataset(sources, args.tokenizer, tmp, args.seq_len, val_fraction=args.val_fraction,
                                   seed=args.seed, hf_dataset=args.hf_dataset, hf_split=args.hf_split,
                                   text_field=args.text_field, num_proc=args.num_proc, txt_split=args.txt_split,
                                   shard_tokens=args.shard_tokens)
        except DataError:
            raise
        except BaseException:  # interrupted, or a machine problem (disk full): the finished shards stay
            keep = os.path.isfile(os.path.join(tmp, MANIFEST))
            if keep:
                print(f"note: interrupted; the finished shards are kept in {tmp}: run the same command again to "
                      f"continue after them", file=sys.stderr)
            raise
        os.chmod(tmp, 0o755)
        if os.path.isdir(out) and os.listdir(out):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-")
            os.rename(out, os.path.join(old, name))
        try:
            os.rename(tmp, out)  # onto an absent or empty folder
        except OSError:
            if old:
                os.rename(os.path.join(old, name), out)
            raise
    finally:
        for leftover in ((old,) if keep else (tmp, old)):
            if leftover and os.path.isdir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
    return meta
