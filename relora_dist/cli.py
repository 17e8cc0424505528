"""The pretraining launcher's logic: `relora-pretrain` (pyproject `[project.scripts]` points at
`main`) = `python launchers/pretrain.py` (the file deepspeed/torchrun run). `main(argv)` returns the
exit status. The other commands are relora_dist/tools/*.py, each with its own `main`.
"""

from __future__ import annotations

import argparse
import os
import sys

from relora_dist import resources
from relora_dist.config import Config, ConfigError, help_text, load_config
from relora_dist.runtime.faults import DEFAULT_GRACE_S, GRACE_ENV

PRETRAIN_DOC = """\
Pretrain with a full-rank ZeRO-2/3 warm start followed by ReLoRA phases.

    relora-pretrain                                               # 1 process, defaults
    python launchers/pretrain.py                                  # the same, from a checkout
    deepspeed --num_gpus 8 launchers/pretrain.py --ds_config ds_configs/zero2.json --config configs/60m_paper.yaml
    torchrun --nproc_per_node 2 launchers/pretrain.py --config configs/default.yaml --train.max_steps=150
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --master_addr HOST --master_port 29500 launchers/pretrain.py \
        --config 60m_paper --train.micro_batch_size=15
"""

TIMEOUT_ENV = "RELORA_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0  # = relora_dist.runtime.dist.init_distributed's default

ENV_HELP = f"""\
Environment:
  {TIMEOUT_ENV}  (default: {DEFAULT_TIMEOUT_S:g})
      seconds a rank waits for its peers: joining the process group (a rendezvous that
      can't be reached fails with a one-line error after this long) and any later collective,
      in every process group (a peer that stopped answering: exit 3, one line naming it)
  {GRACE_ENV}  (default: {DEFAULT_GRACE_S:g})
      after SIGTERM, seconds without a finished step (or save stage) before a rank that is
      blocked waiting for its peers exits 3 with one line instead of saving
  WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT  (default: set by deepspeed/torchrun;
      unset = one process on 127.0.0.1) the batch arithmetic is checked against WORLD_SIZE
  OMP_NUM_THREADS  (default: cores / local processes when WORLD_SIZE > 1) CPU threads per rank
  DS_ACCELERATOR  (default: auto-detected; cpu without CUDA) DeepSpeed's accelerator
Exit status: 0 done (or stopped by SIGTERM after saving a checkpoint), 2 bad input or an
unreachable rendezvous, 3 training aborted (non-finite values, a lost peer); one line
'error: ...' on stderr.
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become one-line ConfigErrors (printed as `error: ...`, exit 2)."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message}; see relora-pretrain --help (python launchers/pretrain.py --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        description=PRETRAIN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=ENV_HELP + "\nConfig keys (override any with --section.key=value; shown with their default):\n"
        + help_text())
    presets = ", ".join(resources.bundled("configs", ".yaml"))
    templates = ", ".join(resources.bundled("ds_configs", ".json"))
    parser.add_argument("--config", default=None,
                        help=f"YAML preset: a path, or a bundled preset's name ({presets}) "
                             "(default: none = the built-in defaults listed below)")
    parser.add_argument("--ds_config", default=None,
                        help=f"DeepSpeed JSON template: a path, or a bundled template's name ({templates}) "
                             "(default: the bundled zero2, = ds_configs/zero2.json in a checkout)")
    parser.add_argument("--init_from", default=None,
                        help="alias of --model.init_from: HF model folder to start from (default: none)")
    parser.add_argument("--dry_run", action="store_true",
                        help="validate arguments, config, data, tokenizer and the DeepSpeed batch arithmetic "
                             "against WORLD_SIZE, print a summary, the per-rank memory plan of both phases and "
                             "(data prepared) the passes over the training data, and exit without training "
                             "(default: off)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    args, rest = build_parser().parse_known_args(argv)
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


def _world_size() -> int:
    raw_world = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw_world)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw_world!r} is not an integer; unset it or launch with "
                          f"deepspeed/torchrun") from None
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={world} must be at least 1; unset it or launch with deepspeed/torchrun")
    return world


def rendezvous_timeout() -> float:
    """`RELORA_DIST_TIMEOUT_S` (default 300): how long a rank waits for its peers."""
    return _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, "")
    if not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{env}={raw!r} must be a positive number of seconds; unset it for the default {default:g}")
    return value


def _prepare(argv: list[str]) -> tuple[Config, dict, argparse.Namespace]:
    """Everything that can reject the run, before any process group, data preparation, model build
    or file write: arguments, config (keys, types, values, paths, prepared data, tokenizer, model,
    ReLoRA targets/rank) and the DeepSpeed template against this launch's WORLD_SIZE."""
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    # Imported once the arguments parse: validation reaches torch and transformers (~3 s), which a
    # mistyped key or value need not wait for (measured: its one-line error 4.0 -> 0.16 s).
    from relora_dist.validation import validate
    from relora_dist.backends.ds_config import build_ds_config, load_ds_template

    template = load_ds_template(args.ds_config)  # the file must exist even if the config is bad
    validate(cfg)
    rendezvous_timeout()
    build_ds_config(template, cfg, _world_size())  # batch arithmetic for this world size
    return cfg, template, args


def memory_plan(cfg: Config, template: dict, world: int) -> list[str]:
    """--dry_run's memory plan: relora_dist/memory/model.py's per-rank training state of this run's
    phases at this world size, engine (ZeRO stage or FSDP2) and precision, with a warning when the ReLoRA phase would
    hold more than the full-rank one."""
    from relora_dist.memory import model as mm
    from relora_dist.data import tokenizer_dir_of
    from relora_dist.backends.ds_config import resolve_backend, resolve_precision
    from relora_dist.data.tokenizer import load_tokenizer
    from relora_dist.model import check_model_config

    vocab = load_tokenizer(tokenizer_dir_of(cfg)).vocab_size
    mc = check_model_config(cfg, vocab)  # the LlamaConfig the run builds: preset + overrides, or init_from's
    shape = mm.Shape.of_config(mc, tuple(cfg.relora.targets))  # GQA k/v, biases and tying as config.json has them
    r = cfg.relora
    backend = resolve_backend(template, cfg)  # zero2, zero3 or fsdp2
    lines = mm.plan(shape, world, "fsdp2" if backend == "fsdp2" else int(backend[-1]), compute=resolve_precision(cfg.train.precision), r=r.r,
                    train_extra=r.train_extra, merge_precision=r.merge_precision,
                    master_device=r.merge_master_device, phase_stage=str(r.phase_stage), relora=r.enabled,
                    warm_start=r.warm_start_steps > 0)
    if r.enabled and r.base_quant != "none":  # FSDP2 refuses a quantized base before this
        from relora_dist.memory.quant import quant_plan

        stage = 3 if backend == "zero3" or r.phase_stage == "3" else 2
        lines += quant_plan(shape, world, stage, r.base_quant, compute=resolve_precision(cfg.train.precision), r=r.r,
                            train_extra=r.train_extra, master_device=r.merge_master_device,
                            optimizer=cfg.optimizer.name, double_quant=r.quant_double_quant)
    zero = template.get("zero_optimization", {})
    if any(isinstance(zero.get(k), dict) and zero[k].get("device", "none") != "none"
           for k in ("offload_optimizer", "offload_param")):
        lines.append("note: ZeRO offload is not modelled: these figures count the offloaded state as on the "
                     "accelerator")
    return lines


def data_passes(cfg: Config) -> list[str]:
    """--dry_run: how many passes over the training split train.max_steps implies, once the data is
    prepared (data.prepared_dir, or the first-use cache already holds these sources); nothing when
    its size is not known yet. A paper preset over a small folder otherwise repeated it ~21 times
    (configs/60m_paper.yaml over 61 M tokens) with no word."""
    from relora_dist.data import DEFAULT_CORPUS, read_meta, tokenizer_dir_of
    from relora_dist.data.first_use import _is_complete, cache_folder

    d, t = cfg.data, cfg.train
    folder = d.prepared_dir or cache_folder(d.sources or [str(DEFAULT_CORPUS)], tokenizer_dir_of(cfg), d.cache_dir,
                                            d.seq_len, d.val_fraction, t.seed)
    if not _is_complete(folder):
        return []
    meta = read_meta(folder)
    blocks = int(meta["num_blocks"]["train"]) * (int(meta["seq_len"]) // d.seq_len)  # validated: a divisor
    have, need = blocks * d.seq_len, t.max_steps * t.global_batch_size * d.seq_len
    if not have:
        return []
    passes = need / have
    lines = [f"{passes:.3g} passes over the training data ({have / 1e6:.3g} M tokens in {folder}): train.max_steps="
             f"{t.max_steps} x global batch {t.global_batch_size} x seq_len {d.seq_len} = {need / 1e6:.3g} M tokens"]
    if passes > 1:
        lines.append(f"warning: the run repeats its training data {passes:.3g} times; prepare more data "
                     f"(relora-prepare-data) or lower train.max_steps to {max(1, have // (t.global_batch_size * d.seq_len))} "
                     f"for one pass")
    return lines


def _rendezvous_error(e: BaseException, timeout_s: float) -> str:
    env = os.environ
    where = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    return (f"rank {env.get('RANK', '?')} of {env.get('WORLD_SIZE', '?')} could not join the process group at "
            f"{where} within {TIMEOUT_ENV}={timeout_s:g} s ({type(e).__name__}: {_one_line(e)[:300]}); "
            f"check that every node was started with the same --nnodes/--master_addr/--master_port, that "
            f"{where} is reachable from this host, and raise {TIMEOUT_ENV} if nodes start slowly")


def wait_for_master(timeout_s: float) -> None:
    """On a rank other than 0, wait (bounded) until MASTER_ADDR:MASTER_PORT accepts a TCP connection.

    torch's store client would also time out, but it retries past its timeout and logs C++ stack
    traces on the way; this probe keeps the bound at `timeout_s` and the failure at one line. The
    probe only connects and closes; rank 0's (or torchrun's) store ignores such a connection."""
    import socket
    import time

    env = os.environ
    if env.get("RANK", "0") == "0" or int(env.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in env:
        return
    addr, port = env["MASTER_ADDR"], int(env.get("MASTER_PORT", "29500"))
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(2.0, left))):
                return
        except OSError as e:
            if time.monotonic() + 0.5 >= deadline:
                raise TimeoutError(f"nothing accepted a connection at {addr}:{port} "
                                   f"({type(e).__name__}: {e})") from None
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, template, args = _prepare(sys.argv[1:] if argv is None else argv)
        timeout_s, grace_s = rendezvous_timeout(), _seconds(GRACE_ENV, DEFAULT_GRACE_S)
    except ValueError as e:  # ConfigError, DataError, ScheduleError, ReLoRAConfigError, ...
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.dry_run:
        if os.environ.get("RANK", "0") == "0":
            t = cfg.train
            print(f"ok: world size {world}, global batch {t.global_batch_size} = micro batch "
                  f"{t.micro_batch_size} x {world} ranks x {t.global_batch_size // (t.micro_batch_size * world)} "
                  f"accumulation steps; output {cfg.run.output_dir}")
            print("\n".join(memory_plan(cfg, template, world) + data_passes(cfg)))
        return 0
    if "OMP_NUM_THREADS" not in os.environ and world > 1:
        import torch

        # processes on this node: torchrun's LOCAL_WORLD_SIZE, the DeepSpeed launcher's LOCAL_SIZE
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    from relora_dist.runtime.dist import init_distributed, shutdown_and_exit
    from relora_dist.runtime.faults import EXIT_ABORTED, RunAborted, is_peer_failure, peer_failure_line, start_watchdog
    from relora_dist.trainer import Trainer

    watchdog = start_watchdog(int(os.environ.get("RANK", "0")), world, grace_s, lambda: _newest(cfg))
    try:
        wait_for_master(timeout_s)
        info = init_distributed(timeout_s=timeout_s)
    except Exception as e:  # noqa: BLE001 - DistStoreError, DistNetworkError, RuntimeError from gloo/nccl
        print(f"error: {_rendezvous_error(e, timeout_s)}", file=sys.stderr)
        shutdown_and_exit(2)  # os._exit: no half-initialised store thread keeps the process alive
        return 2
    watchdog.start_heartbeat()
    code = 0
    try:
        Trainer(cfg, template, info).train()
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if info.is_main or getattr(e, "every_rank", False):  # e.g. a rank that stopped waiting for data
            print(f"error: {_one_line(e)}", file=sys.stderr)
        code = 2
    except RunAborted as e:
        if info.is_main:
            print(f"error: {_one_line(e)}", file=sys.stderr)
        code = EXIT_ABORTED
    except Exception as e:
        if not (world > 1 and is_peer_failure(e)):
            raise
        # A peer died or stopped: no barrier (it would wait for the lost peer), one line per survivor.
        print(f"error: {peer_failure_line(e, info.rank, timeout_s, _newest(cfg))}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_ABORTED)
    shutdown_and_exit(code)
    return code


def _newest(cfg: Config) -> str:
    from relora_dist.checkpoint.format import find_latest
    from relora_dist.checkpoint.resume import checkpoint_root

    return str(find_latest(checkpoint_root(cfg), strict=False) or "none")


if __name__ == "__main__":
    sys.exit(main())
