"""Export a relora_dist checkpoint to a Hugging Face folder, on CPU, without a process group.

    relora-convert runs/default/checkpoints/step_00000300 hf_out [--dtype bf16]
    relora-convert runs/default/checkpoints hf_nf4 --quantize nf4   # bitsandbytes 4-bit HF folder
    python tools/convert_ckpt.py runs/default/checkpoints hf_out      # same, from a checkout

Consolidates every rank's shards (fp32 masters where they exist), merges live adapters
(W + s*B*A in fp32), and writes config.json, model.safetensors (sharded above --max_shard_size),
generation_config.json and the tokenizer files. CKPT_DIR may also be a checkpoints/ folder: its
`latest` checkpoint is used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relora_dist.checkpoint import CheckpointError

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def convert(ckpt_dir: str | Path, out_dir: str | Path, dtype: str = "fp32", max_shard_size: str = "2GB",
            overwrite: bool = False, quantize: str = "none") -> Path:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from relora_dist.checkpoint import MANIFEST, ShardReader, consolidated_state_dict, find_latest

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not (ckpt_dir / MANIFEST).is_file():
        latest = find_latest(ckpt_dir)
        if latest is None:
            raise CheckpointError(f"{ckpt_dir} holds no {MANIFEST} and no checkpoints: pass a step_* directory")
        ckpt_dir = latest
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} is not empty: pass an empty or new directory, or --overwrite")
    reader = ShardReader(ckpt_dir)
    state_dict = consolidated_state_dict(reader, merge_adapters=True)
    torch_dtype = getattr(torch, DTYPES[dtype])
    try:
        config = LlamaConfig(**reader.manifest["model_config"])
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model.load_state_dict({k: v.to(torch_dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    except (TypeError, ValueError, RuntimeError) as e:  # the manifest's model_config does not fit its tensors
        raise CheckpointError(f"{ckpt_dir / MANIFEST}: model_config does not describe the saved tensors "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); the checkpoint is damaged") from None
    model.config.torch_dtype = torch_dtype
    if quantize == "none":
        model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    else:
        quantize_hf(model, out_dir, quantize, max_shard_size)
    for f in (ckpt_dir / "tokenizer").iterdir():
        if f.is_file():
            shutil.copy2(f, out_dir / f.name)
    return out_dir


def nf4_unpackable(model) -> list[str]:
    """Linear layers bitsandbytes' CPU 4-bit inference layout cannot hold (it packs rows in groups
    of 32 and needs in_features a multiple of the 64-element block: functional.
    _convert_weight_packed_for_cpu asserts both in bitsandbytes 0.50.2)."""
    import torch

    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  and (m.out_features % 32 or m.in_features % 64))


def quantize_hf(model, out_dir: Path, kind: str, max_shard_size: str) -> None:
    """The merged full-precision model re-loaded by transformers with a bitsandbytes config (nf4:
    4-bit NF4, bf16 compute; int8: LLM.int8) and saved: a folder AutoModelForCausalLM.from_pretrained
    loads with its quantization config. lm_head stays unquantized (transformers' default), and for
    nf4 so does every layer nf4_unpackable lists (one line says which)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from relora_dist.quant import bnb

    bnb()  # silences its import-time log
    skip = ["lm_head"] + (nf4_unpackable(model) if kind == "nf4" else [])
    if kind == "nf4":
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                llm_int8_skip_modules=skip)
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    kept = [n for n in skip if n != "lm_head"]
    if kept:
        print(f"note: {len(kept)} linear layers stay in full precision (shape not packable by bitsandbytes' "
              f"4-bit CPU layout: out % 32 or in % 64): {', '.join(kept[:4])}{' ...' if len(kept) > 4 else ''}")
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qc)
        quantized.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt_dir", help="a checkpoint (step_*/) or a checkpoints/ folder (its latest is used); required")
    ap.add_argument("out_dir", help="output Hugging Face folder (new or empty); required")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights dtype (default: fp32)")
    ap.add_argument("--max_shard_size", default="2GB", help="safetensors shard size (default: 2GB)")
    ap.add_argument("--overwrite", action="store_true", help="write into a non-empty out_dir (default: off)")
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
