#!/usr/bin/env python
"""Pretrain with a full-rank ZeRO-2/3 warm start followed by ReLoRA phases.

    python launchers/pretrain.py                                  # 1 process, defaults
    deepspeed --num_gpus 8 launchers/pretrain.py --ds_config ds_configs/zero2.json
    torchrun --nproc_per_node 2 launchers/pretrain.py --config configs/default.yaml --train.max_steps=20
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from relora_dist.config import ConfigError, help_text, load_config  # noqa: E402


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config keys (override any with --section.key=value):\n" + help_text())
    parser.add_argument("--config", default=None, help="YAML preset (see configs/); default: built-in defaults")
    parser.add_argument("--ds_config", default=None, help="DeepSpeed JSON template (default: ds_configs/zero2.json)")
    parser.add_argument("--init_from", default=None, help="alias of --model.init_from: HF model folder")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):  # accept --a.b=v and --a.b v
        item = rest[i]
        if not item.startswith("--"):
            parser.error(f"unexpected argument '{item}'; overrides look like --train.max_steps=20")
        if "=" not in item and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    if args.init_from:
        overrides.append(f"--model.init_from={args.init_from}")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, overrides)
        from relora_dist.config import validate
        from relora_dist.ds_config import load_ds_template

        validate(cfg)  # before any process group or data work
        template = load_ds_template(args.ds_config)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "OMP_NUM_THREADS" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    from relora_dist.dist import init_distributed, shutdown_and_exit
    from relora_dist.trainer import Trainer

    info = init_distributed()
    code = 0
    try:
        Trainer(cfg, template, info).train()
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if info.is_main:
            print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        code = 2
    shutdown_and_exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
