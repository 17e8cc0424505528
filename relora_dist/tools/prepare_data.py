"""Tokenize and pack a corpus into train/val blocks (logic in relora_dist.data.prepare_dataset).

Example (bundled corpus and tokenizer):
    relora-prepare-data --out data/kjv-512 --seq_len 512
    python tools/prepare_data.py --out data/kjv-512 --seq_len 512     # same, from a checkout
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from relora_dist.data import DEFAULT_CORPUS, DEFAULT_TOKENIZER, prepare_dataset
from relora_dist.data.blocks import DataError


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
    ap.add_argument("--num_proc", type=int, default=1, help="tokenizer threads (default: 1)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an earlier preparation of other inputs in --out; a run reading it keeps "
                         "reading the old files (default: off = refuse)")
    args = ap.parse_args(argv)
    sources = args.input if args.input or args.hf_dataset else [DEFAULT_CORPUS]
    try:
        wanted = _wanted(args, sources)
        done = _existing(args.out, wanted, args.overwrite)
        if done is not None:
            print(f"note: {args.out} already holds this preparation (same inputs, tokenizer and settings); "
                  f"nothing done", file=sys.stderr)
            meta = done
        else:
            meta = _prepare_beside(args, sources)
    except (ValueError, FileNotFoundError) as e:  # DataError and a missing input or tokenizer: one line each
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps({k: meta[k] for k in ("num_documents", "num_tokens", "num_blocks", "dtype")}))
    return 0


# What identifies a preparation: a complete --out that records the same is not prepared again.
_SAME = ("source_identity", "tokenizer_checksum", "seq_len", "val_fraction", "seed", "text_field", "txt_split")
_OURS = {"train.bin", "val.bin", "meta.json", "meta.json.tmp"}


def _wanted(args, sources) -> dict:
    from relora_dist.data.prepare import source_identity
    from relora_dist.tokenizer import tokenizer_checksum

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
    if not isinstance(meta, dict) or not names <= _OURS:
        raise DataError(f"--out {out} is not empty and not a complete earlier preparation (it holds "
                        f"{', '.join(sorted(names)[:5])}); pass an empty or new folder")
    differ = [k for k in _SAME if meta.get(k) != wanted[k]]
    if not differ:
        return meta
    if overwrite:
        return None
    raise DataError(f"--out {out} holds a preparation of other inputs ({', '.join(differ)} differ); pass "
                    f"--overwrite to replace it (a run reading it keeps the old files), or another --out")


def _prepare_beside(args, sources) -> dict:
    """Prepare into a temporary folder beside --out, then swap it in by renames: a run that has the
    old files memory-mapped keeps their inodes (unlinked, not truncated)."""
    out = os.path.abspath(args.out)
    parent, name = os.path.dirname(out), os.path.basename(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
    old = None
    try:
        meta = prepare_dataset(sources, args.tokenizer, tmp, args.seq_len, val_fraction=args.val_fraction,
                               seed=args.seed, hf_dataset=args.hf_dataset, hf_split=args.hf_split,
                               text_field=args.text_field, num_proc=args.num_proc, txt_split=args.txt_split)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
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
        for leftover in (tmp, old):
            if leftover and os.path.isdir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
    return meta
