"""Tokenize and pack a corpus into train/val blocks (logic in relora_dist.data.prepare_dataset).

Example (bundled corpus and tokenizer):
    relora-prepare-data --out data/kjv-512 --seq_len 512
    python tools/prepare_data.py --out data/kjv-512 --seq_len 512     # same, from a checkout
"""
from __future__ import annotations

import argparse
import json
import sys

from relora_dist.data import DEFAULT_CORPUS, DEFAULT_TOKENIZER, prepare_dataset


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
    args = ap.parse_args(argv)
    sources = args.input if args.input or args.hf_dataset else [DEFAULT_CORPUS]
    try:
        meta = prepare_dataset(sources, args.tokenizer, args.out, args.seq_len,
                               val_fraction=args.val_fraction, seed=args.seed,
                               hf_dataset=args.hf_dataset, hf_split=args.hf_split,
                               text_field=args.text_field, num_proc=args.num_proc,
                               txt_split=args.txt_split)
    except (ValueError, FileNotFoundError) as e:  # DataError and a missing input or tokenizer: one line each
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps({k: meta[k] for k in ("num_documents", "num_tokens", "num_blocks", "dtype")}))
    return 0
