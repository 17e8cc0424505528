"""Export a relora_dist checkpoint to a Hugging Face folder, on CPU, without a process group.

    relora-convert runs/default/checkpoints/step_00000300 hf_out [--dtype bf16]
    relora-convert runs/default/checkpoints hf_nf4 --quantize nf4   # bitsandbytes 4-bit HF folder
    python tools/convert_ckpt.py runs/default/checkpoints hf_out --overwrite   # the same, from a checkout

Consolidates every rank's shards (fp32 masters where they exist), merges live adapters
(W + s*B*A in fp32), and writes config.json, model.safetensors (sharded above --max_shard_size),
generation_config.json and the tokenizer files. CKPT_DIR may also be a checkpoints/ folder: its
`latest` checkpoint is used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relora_dist.checkpoint.format import CheckpointError

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def read_checkpoint(ckpt_dir: str | Path):
    """(the step_* folder, its ShardReader, its merged fp32 HF-named state dict) of a checkpoint or of
    a checkpoints/ folder's latest, shards and tokenizer/ verified: what an export (and relora-eval)
    is made from."""
    from relora_dist.checkpoint.format import MANIFEST, ShardReader, check_tokenizer, consolidated_state_dict, find_latest

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / MANIFEST).is_file():
        latest = find_latest(ckpt_dir)
        if latest is None:
            raise CheckpointError(f"{ckpt_dir} holds no {MANIFEST} and no checkpoints: pass a step_* directory")
        ckpt_dir = latest
    reader = ShardReader(ckpt_dir)
    check_tokenizer(ckpt_dir)
    return ckpt_dir, reader, consolidated_state_dict(reader, merge_adapters=True)


def damaged(ckpt_dir: Path, e: Exception) -> CheckpointError:
    """A manifest whose model_config does not fit its tensors (export.ModelConfigMismatch)."""
    from relora_dist.checkpoint.format import MANIFEST

    return CheckpointError(f"{ckpt_dir / MANIFEST}: {e}; the checkpoint is damaged")


def convert(ckpt_dir: str | Path, out_dir: str | Path, dtype: str = "fp32", max_shard_size: str = "2GB",
            overwrite: bool = False, quantize: str = "none") -> Path:
    import torch

    from relora_dist.checkpoint.format import MANIFEST, find_latest
    from relora_dist.checkpoint.export import ModelConfigMismatch, foreign_files, write_hf

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not (ckpt_dir / MANIFEST).is_file() and find_latest(ckpt_dir) is None:
        raise CheckpointError(f"{ckpt_dir} holds no {MANIFEST} and no checkpoints: pass a step_* directory")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise CheckpointError(f"{out_dir} is not a directory: pass a new or empty directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out_dir} is not empty: pass an empty or new directory, or --overwrite")
        # --overwrite replaces the folder whole, so only an earlier export (or an empty folder) may go.
        foreign = foreign_files(out_dir)
        if foreign:
            raise CheckpointError(f"{out_dir} holds {foreign[0]!r}, which an export does not write: --overwrite "
                                  f"replaces only an earlier export; pass a new or empty directory")
    ckpt_dir, reader, state_dict = read_checkpoint(ckpt_dir)
    try:
        return write_hf(state_dict, reader.manifest["model_config"], ckpt_dir / "tokenizer", out_dir,
                        getattr(torch, DTYPES[dtype]), max_shard_size, quantize)
    except ModelConfigMismatch as e:  # the manifest's model_config does not fit its tensors
        raise damaged(ckpt_dir, e) from None
    except OSError as e:  # a read-only or full target
        raise CheckpointError(f"cannot write {out_dir} ({type(e).__name__}: {e.strerror or e}); pass a "
                              f"writable directory (nothing was written there)") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt_dir", help="a checkpoint (step_*/) or a checkpoints/ folder (its latest is used); required")
    ap.add_argument("out_dir", help="output Hugging Face folder (new or empty); required")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights dtype (default: fp32)")
    ap.add_argument("--max_shard_size", default="2GB", help="safetensors shard size (default: 2GB)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace out_dir when it holds an earlier export (default: off)")
    ap.add_argument("--quantize", choices=["none", "nf4", "int8"], default="none",
                    help="write a bitsandbytes-quantized HF folder from the merged fp32 weights (default: none)")
    args = ap.parse_args(argv)
    try:
        out = convert(args.ckpt_dir, args.out_dir, args.dtype, args.max_shard_size, args.overwrite, args.quantize)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
