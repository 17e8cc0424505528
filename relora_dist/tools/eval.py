"""Perplexity of a checkpoint or a Hugging Face model folder on prepared data or a text file.

    relora-eval runs/default/checkpoints my.jsonl --max_blocks 64 --out eval.json   # latest checkpoint, raw text
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m relora_dist.tools.eval runs/default/checkpoints my.jsonl --max_blocks 64

(From a checkout, `python tools/eval.py` is relora-eval.)

MODEL: a checkpoint (<output_dir>/checkpoints/step_N, or <output_dir>/checkpoints: its latest) run
as its export (relora-convert's merged fp32 weights, in memory), or a Hugging Face folder that
model.init_from accepts, with its tokenizer. DATA: a prepared folder (relora-prepare-data; --split)
or a .txt/.jsonl file, tokenized with the model's tokenizer and packed into --seq_len blocks by
relora-prepare-data's code (an EOS after each document; the tail shorter than a block dropped).

The loss is the mean next-token cross-entropy over every predicted token (seq_len - 1 per block) of
the first --max_blocks blocks, in fp32; perplexity is exp(loss). A run's evaluation averages the
same way over the first train.eval_tokens // data.seq_len val blocks, rounded down to a multiple of
world_size x train.micro_batch_size: `--max_blocks run` takes exactly those for a checkpoint, which
then repeats the run's eval at that step on the data it was trained with (the manifest's eval_loss,
printed beside the result); its export with --max_blocks N gives the same. Launched by torchrun or
deepspeed, the blocks are split across ranks and the sums all-reduced: one process's result.
Exit status 0, or 2 with one line 'error: ...' on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from relora_dist.checkpoint.format import CheckpointError
from relora_dist.config import ConfigError
from relora_dist.data.documents import DataError

HF_BATCH = 8  # a Hugging Face folder has no run config to take train.micro_batch_size from


@dataclass
class Model:
    """The model to evaluate and what its source says about evaluating it (run: a checkpoint's)."""
    net: object
    tokenizer_dir: str
    name: str
    seq_len: int | None
    batch_size: int
    run: dict | None = None


def load_model(path: Path) -> Model:
    from relora_dist.checkpoint.format import MANIFEST, find_latest

    where = ("pass a checkpoint (<output_dir>/checkpoints or a step_N in it) or a Hugging Face model folder "
             "(relora-convert writes one)")
    if not path.is_dir():
        raise DataError(f"model '{path}' {'is not a folder' if path.exists() else 'does not exist'}; {where}")
    if (path / MANIFEST).is_file() or find_latest(path) is not None:
        return _checkpoint(path)
    if (path / "config.json").is_file():
        return _hf_folder(path)
    if (path / "checkpoints").is_dir():  # a run's output_dir
        where = f"pass its checkpoints: {path / 'checkpoints'}"
    raise DataError(f"model '{path}' is neither a checkpoint (no {MANIFEST}, no step_* checkpoints) nor a Hugging "
                    f"Face model folder (no config.json); {where}")


def _checkpoint(path: Path) -> Model:
    """The export's code path, in memory: convert_ckpt.read_checkpoint's merged fp32 state dict in
    the model its manifest describes (export.hf_model, on CPU so that the rotary buffers exist)."""
    import torch
    import yaml

    from relora_dist.config import Config
    from relora_dist.checkpoint.export import ModelConfigMismatch, hf_model
    from relora_dist.tools.convert_ckpt import damaged, read_checkpoint

    ckpt, reader, state_dict = read_checkpoint(path)
    try:
        net = hf_model(state_dict, reader.manifest["model_config"], torch.float32, device="cpu")
    except ModelConfigMismatch as e:
        raise damaged(ckpt, e) from None
    # The run's settings, read as plain YAML (never executed): the defaults when a key is absent.
    saved = yaml.safe_load((ckpt / "config.yaml").read_text()) if (ckpt / "config.yaml").is_file() else {}
    data, train, c = (saved or {}).get("data", {}), (saved or {}).get("train", {}), Config()
    m = reader.manifest
    run = {"step": m["global_step"], "eval_loss": m.get("eval_loss"), "world_size": m["world_size"],
           "micro_batch_size": int(train.get("micro_batch_size", c.train.micro_batch_size)),
           "eval_tokens": int(train.get("eval_tokens", c.train.eval_tokens))}
    return Model(net, str(ckpt / "tokenizer"), str(ckpt), int(data.get("seq_len", c.data.seq_len)),
                 run["micro_batch_size"], run)


def _hf_folder(path: Path) -> Model:
    """model.init_from's own checks (model type, weights, vocabulary, tying) and loading."""
    from relora_dist.config import Config
    from relora_dist.model import build_model, check_model_config
    from relora_dist.data.tokenizer import has_tokenizer, load_tokenizer

    if not has_tokenizer(path):
        raise DataError(f"model '{path}' holds no tokenizer (tokenizer.model or tokenizer.json), which relora-eval "
                        f"tokenizes with; copy the model's tokenizer files into it (relora-convert exports them)")
    cfg = Config()
    cfg.model.init_from = str(path)
    try:
        config = check_model_config(cfg, load_tokenizer(str(path)).vocab_size)
    except ConfigError as e:  # worded for the config key; here the folder is the MODEL argument
        raise ConfigError(str(e).replace("model.init_from '", "model '")) from None
    return Model(build_model(config, 0, str(path)), str(path), str(path), None, HF_BATCH)


def load_blocks(data: str, split: str, model: Model, seq_len: int | None, tmp: str):
    """(PackedBlocks, seq_len, description): the prepared folder's split after the checks a run
    applies to it (relora_dist.data: format, block length, tokenizer checksum), or the text file
    prepared into `tmp` by prepare_dataset with no validation split."""
    from relora_dist.data import PackedBlocks, check_tokenizer_matches, prepare_dataset, read_meta
    from relora_dist.data.blocks import Wording, check_blocks, check_seq_len
    from relora_dist.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(model.tokenizer_dir).vocab_size
    tok = model.tokenizer_dir.replace("{", "{{").replace("}", "}}")
    if os.path.isdir(data):
        w = Wording(dir="prepared data folder", seq_len="--seq_len", tokenizer="the model's tokenizer",
                    model=f"the model's tokenizer ('{model.tokenizer_dir}')",  # not format()ed, unlike hint
                    hint=f"prepare it with the model's tokenizer: relora-prepare-data --input FILES --tokenizer {tok} "
                         f"--out NEW_DIR --seq_len {{seq_len}}",
                    reprepare=f"relora-prepare-data --tokenizer {tok} --seq_len {{seq_len}}")
        meta = read_meta(data, w)
        seq_len = seq_len or model.seq_len or int(meta["seq_len"])
        check_seq_len(seq_len, "--seq_len")
        check_blocks(data, meta, split, seq_len, w)
        check_tokenizer_matches(data, vocab, model.tokenizer_dir, w)
        return PackedBlocks(data, split, seq_len), seq_len, f"{data} [{split}]"
    if not os.path.isfile(data):
        raise DataError(f"data '{data}' does not exist; pass a prepared data folder (relora-prepare-data --out) or "
                        f"a .txt/.jsonl file")
    # A Hugging Face folder records no training length: its context length is the default block.
    seq_len = seq_len or model.seq_len or int(model.net.config.max_position_embeddings)
    check_seq_len(seq_len, "--seq_len")
    prepare_dataset([data], model.tokenizer_dir, tmp, seq_len, val_fraction=0.0)
    return PackedBlocks(tmp, "train", seq_len), seq_len, data


def block_count(blocks, max_blocks: str | None, model: Model) -> int:
    """How many of the first blocks to read: all, --max_blocks N, or (`run`) the trainer's rule."""
    from relora_dist.data.loader import check_eval_blocks

    if max_blocks == "run":
        if model.run is None:
            raise DataError("--max_blocks run needs a checkpoint (its config.yaml holds the run's eval settings); "
                            "pass a number of blocks")
        r = model.run
        return check_eval_blocks(len(blocks), r["micro_batch_size"], r["world_size"],
                                 max(1, r["eval_tokens"] // blocks.seq_len), f"split '{blocks.split}'",
                                 "pass a number of blocks instead of run")
    n = len(blocks) if max_blocks is None else min(int(max_blocks), len(blocks))
    if n == 0:
        raise DataError(f"the data holds no block of {blocks.seq_len} tokens; pass more text or a smaller --seq_len")
    return n


def evaluate(net, blocks, n: int, batch_size: int, rank: int, world_size: int, device):
    """(loss sum, predicted tokens, blocks) of this rank's contiguous share of the first n blocks,
    summed over ranks with SUM (gloo's AVG is wrong on some versions; the ratio is taken after)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for s in range(lo, hi, batch_size):
            batch = blocks.get_batch(np.arange(s, min(s + batch_size, hi))).to(device)
            # The trainer's loss (labels = inputs: the mean over the batch's predicted tokens),
            # weighted by those tokens: every block predicts seq_len - 1, so this is its average.
            loss = net(input_ids=batch, labels=batch).loss
            predicted = batch.shape[0] * (batch.shape[1] - 1)
            sums += torch.tensor([float(loss) * predicted, predicted, batch.shape[0]], dtype=torch.float64)
    if world_size > 1:
        sums = sums.to(device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums.cpu()


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="relora-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a checkpoint (step_*/), a checkpoints/ folder (its latest) or a Hugging Face "
                                  "model folder; required")
    ap.add_argument("data", help="a prepared data folder or a .txt/.jsonl file; required")
    ap.add_argument("--split", choices=["train", "val"], default="val",
                    help="split of a prepared folder (default: val)")
    ap.add_argument("--max_blocks", type=lambda v: v if v == "run" else str(_positive(v)), default=None,
                    help="evaluate the first N blocks, or `run`: those a checkpoint's run evaluated (default: all)")
    ap.add_argument("--batch_size", type=_positive, default=None,
                    help=f"blocks per forward (default: a checkpoint's train.micro_batch_size, else {HF_BATCH})")
    ap.add_argument("--seq_len", type=_positive, default=None,
                    help="block length (default: a checkpoint's data.seq_len, else the prepared one, else the "
                         "model's max_position_embeddings)")
    ap.add_argument("--out", default=None, help="also write the result as JSON to this file (default: none)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by deepspeed
    args = ap.parse_args(argv)
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    try:
        with tempfile.TemporaryDirectory(prefix="relora-eval-") as tmp:
            result = run(args, rank, world_size, tmp)
    except (CheckpointError, ConfigError, DataError, FileNotFoundError) as e:
        if rank == 0:  # every rank meets the same input: one line, not one per rank
            print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        ref = result.get("run_eval_loss")
        print(f"loss {result['loss']:.6f} ppl {result['perplexity']:.4f} | {result['blocks']} blocks of "
              f"{result['seq_len']} ({result['tokens']} predicted tokens) of {result['source']} | {result['model']}"
              f" | world size {world_size}" + (f" | run's eval at step {result['step']}: loss {ref:.6f}"
                                               if ref is not None and args.max_blocks == "run" else ""))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if world_size > 1:
        from relora_dist.runtime.dist import shutdown_and_exit

        shutdown_and_exit(0)  # gloo may abort a rank at interpreter exit without it
    return 0


def run(args, rank: int, world_size: int, tmp: str) -> dict:
    import torch

    # Inputs are checked before the process group exists: a bad one fails every rank alike, at once.
    model = load_model(Path(args.model))
    blocks, seq_len, source = load_blocks(args.data, args.split, model, args.seq_len, tmp)
    n = block_count(blocks, args.max_blocks, model)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if world_size > 1:
        import datetime

        import torch.distributed as dist

        from relora_dist.cli import DEFAULT_TIMEOUT_S, TIMEOUT_ENV

        if cuda:
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    batch_size, r = args.batch_size or model.batch_size, model.run or {}
    total, tokens, count = evaluate(model.net.to(device).eval(), blocks, n, batch_size, rank, world_size, device)
    loss = float(total / tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(tokens), "blocks": int(count),
            "seq_len": seq_len, "source": source, "split": args.split if os.path.isdir(args.data) else None,
            "model": model.name, "step": r.get("step"), "run_eval_loss": r.get("eval_loss"),
            "batch_size": batch_size, "world_size": world_size}


if __name__ == "__main__":  # python -m relora_dist.tools.eval: what torchrun and deepspeed launch
    sys.exit(main())
