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

from relora_dist.config import Config, ConfigError, help_text, load_config  # noqa: E402


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become one-line ConfigErrors (printed as `error: ...`, exit 2)."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message}; see python launchers/pretrain.py --help")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = _Parser(
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
        if not item.startswith("--") or item == "--":
            raise ConfigError(f"unexpected argument '{item}'; overrides look like --train.max_steps=20")
        if "=" not in item:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                raise ConfigError(f"override '{item}' needs a value: write {item}=VALUE or {item} VALUE")
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    if args.init_from:
        overrides.append(f"--model.init_from={args.init_from}")
    return args, overrides


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")).strip() or type(e).__name__


def prepare(argv: list[str]) -> tuple[Config, dict]:
    """Everything that can reject the run, before any process group, data preparation, model build
    or file write: arguments, config (keys, types, values, paths, prepared data, tokenizer, model,
    ReLoRA targets/rank) and the DeepSpeed template against this launch's WORLD_SIZE."""
    from relora_dist.config import validate
    from relora_dist.ds_config import build_ds_config, load_ds_template

    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    template = load_ds_template(args.ds_config)  # the file must exist even if the config is bad
    validate(cfg)
    raw_world = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw_world)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw_world!r} is not an integer; unset it or launch with "
                          f"deepspeed/torchrun") from None
    build_ds_config(template, cfg, world)  # batch arithmetic for this world size
    return cfg, template


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, template = prepare(sys.argv[1:] if argv is None else argv)
    except ValueError as e:  # ConfigError, DataError, ScheduleError, ReLoRAConfigError, ...
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {_one_line(e)}", file=sys.stderr)
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
            print(f"error: {_one_line(e)}", file=sys.stderr)
        code = 2
    shutdown_and_exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
