"""The memory model's command line (`python tools/memory_model.py`): tables, the quantized-base
table, and validation against tools/bench.py measurements. The formulas are in memory/model.py
(and memory/quant.py for a quantized base); this module only reads bench JSONs and prints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from relora_dist.memory.model import CATEGORIES, ENGINES, MASTER_DEVICES, MIB, Shape, per_rank_bytes
from relora_dist.memory.quant import relora_quant_bytes
from relora_dist.memory.tables import detail, options_table, quant_table, table
from relora_dist.model import PRESETS


# ------------------------------------------------------------------------------------------------
# Validation against tools/bench.py measurements
# ------------------------------------------------------------------------------------------------

def bench_relora_options(config: dict) -> dict:
    """The ReLoRA settings of a bench run: its resolved `merge_master_device` / `phase_stage` (else its
    `--override --relora.key=value` entries, else the defaults) and the ZeRO-2 merge-master layout of
    the engine that ran it (`zero2_merge_masters`; JSONs written before the engine sharded them lack
    the key and were measured with replicated masters)."""
    opts = {"merge_precision": "fp32", "master_device": "device", "phase_stage": "same"}
    names = {"relora.merge_precision": "merge_precision", "relora.merge_master_device": "master_device",
             "relora.phase_stage": "phase_stage", "relora.base_quant": "base_quant", "optimizer.name": "optimizer"}
    for item in config.get("override") or []:
        key, _, value = item.lstrip("-").partition("=")
        if key in names:
            opts[names[key]] = value
    if config.get("base_quant", "none") != "none":  # tools/bench.py --base-quant
        opts["base_quant"] = config["base_quant"]
    opts["master_device"] = config.get("merge_master_device", opts["master_device"])
    opts["phase_stage"] = str(config.get("phase_stage", opts["phase_stage"]))
    opts["shard_merge_masters"] = config.get("zero2_merge_masters", "replicated") == "sharded"
    # NF4 double quantization (relora.quant_double_quant) is recorded since it became the default;
    # older JSONs were measured without it.
    opts["double_quant"] = bool(config.get("quant_double_quant", False))
    return opts


def predict_for_bench(model: dict, world: int, stage: int, phase: str, train_extra: bool,
                      options: dict | None = None) -> dict[str, float]:
    """Prediction for a bench measurement: the bench's full-rank phase is this system's warm start.
    `options` (bench_relora_options; default: the engine's defaults) may name `relora_stage`, the
    stage the ReLoRA phase ran under (3 for a ZeRO-2 run with relora.phase_stage=3)."""
    o = dict(options or {})
    relora_stage = o.pop("relora_stage", None) or stage
    o.pop("phase_stage", None)
    kind, optimizer = o.pop("base_quant", "none"), o.pop("optimizer", "adamw")
    double_quant = o.pop("double_quant", True)
    if phase == "relora" and kind != "none":
        shape = Shape(model["hidden_size"], model["intermediate_size"], model["num_layers"], model["vocab_size"])
        return relora_quant_bytes(shape, world, kind, compute=model["precision"], r=model["r"], train_extra=train_extra,
                                  master_device=o.get("master_device", "device"), optimizer=optimizer,
                                  double_quant=double_quant, stage=relora_stage)
    shape = Shape(model["hidden_size"], model["intermediate_size"], model["num_layers"], model["vocab_size"])
    if phase == "full_rank":  # the bench runs both phases with the same optimizer
        return per_rank_bytes(shape, world, stage, "warm_start", compute=model["precision"], r=model["r"],
                              optimizer=optimizer, **o)
    return per_rank_bytes(shape, world, relora_stage, "relora", compute=model["precision"], r=model["r"],
                          train_extra=train_extra, optimizer=optimizer, **o)


def validate(bench: dict) -> list[dict]:
    """Predicted vs measured per-rank state bytes for every stage and phase in a bench JSON. The
    bench counts the merge masters wherever they live, so host masters are compared too."""
    rows = []
    world = bench["config"]["world_size"]
    options = bench_relora_options(bench["config"])
    for stage_key, s in bench["stages"].items():
        stage = stage_key if stage_key == "fsdp2" else int(stage_key)
        opts = dict(options, relora_stage=s.get("relora_stage") or (3 if options["phase_stage"] == "3" else stage))
        phases = [("full_rank", s["state_bytes_per_rank"]["full_rank"], True),
                  ("relora", s["state_bytes_per_rank"]["relora"], bench["config"].get("train_extra", True))]
        if "train_extra_false" in s:
            phases.append(("relora", s["train_extra_false"]["state_bytes_per_rank"], False))
        for phase, measured, extra in phases:
            pred = predict_for_bench(s["model"], world, stage, phase, extra, opts)
            pred = dict(pred, merge_masters=pred["merge_masters"] + pred["host_merge_masters"])
            meas_total = sum(measured[c] for c in CATEGORIES)
            row = {"stage": stage, "phase": phase, "train_extra": extra, "predicted": pred["total_with_host"],
                   "measured": meas_total, "ratio": pred["total_with_host"] / meas_total,
                   "error_pct": 100 * (pred["total_with_host"] - meas_total) / meas_total,
                   "by_category": {c: (pred[c], measured[c]) for c in CATEGORIES}}
            rows.append(row)
    return rows


def format_validation(rows: list[dict], bench: dict) -> str:
    m = next(iter(bench["stages"].values()))["model"]
    lines = [f"memory model vs measured (tools/bench.py, preset {bench['config']['preset']}, hidden {m['hidden_size']}, "
             f"{m['num_layers']} layers, vocab {m['vocab_size']}, r {m['r']}, {m['precision']}, world "
             f"{bench['config']['world_size']}): per-rank state bytes (MiB)", "",
             "| engine | phase | train_extra | predicted | measured | predicted / measured | error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['phase']} | {str(r['train_extra']).lower()} | {r['predicted'] / MIB:.2f} "
                     f"| {r['measured'] / MIB:.2f} | {r['ratio']:.4f} | {r['error_pct']:+.2f}% |")
    worst = max(abs(r["error_pct"]) for r in rows)
    lines.append("")
    lines.append(f"largest error {worst:.2f}%")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def _engine(name: str) -> int | str:
    if name not in ("2", "3", "fsdp2"):
        raise argparse.ArgumentTypeError(f"unknown engine {name!r}: use 2, 3 or fsdp2")
    return name if name == "fsdp2" else int(name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Analytic per-rank memory of ReLoRA vs full-rank under ZeRO-2/3 and FSDP2.")
    p.add_argument("mode", nargs="?", default="table", choices=["table", "validate", "quant"],
                   help="table: Markdown tables (default); validate: compare with a tools/bench.py JSON; "
                        "quant: the ReLoRA phase with a quantized frozen base (relora.base_quant)")
    p.add_argument("--bench", default="benchmarks/bench_tiny.json", help="validate: bench JSON (tools/bench.py --out)")
    p.add_argument("--max-error-pct", type=float, default=10.0, help="validate: exit 1 above this error")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--worlds", type=int, nargs="+", default=[8, 64])
    p.add_argument("--stages", type=_engine, nargs="+", default=list(ENGINES), metavar="STAGE",
                   help="engines: 2, 3 (ZeRO) and fsdp2")
    p.add_argument("--compute", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--r", type=int, default=128, help="ReLoRA rank (paper 128)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--train-extra", choices=["true", "false", "both"], default="true")
    p.add_argument("--detail", nargs=3, metavar=("PRESET", "WORLD", "STAGE"), help="breakdown of one config")
    p.add_argument("--master-device", choices=MASTER_DEVICES, default="device",
                   help="--detail: where the fp32 merge masters live (relora.merge_master_device; default: device)")
    a = p.parse_args(argv)
    if a.mode == "validate":
        bench = json.loads(Path(a.bench).read_text())
        rows = validate(bench)
        print(format_validation(rows, bench))
        return 0 if max(abs(r["error_pct"]) for r in rows) <= a.max_error_pct else 1
    if a.mode == "quant":
        print(quant_table(["130m", "350m", "1b3"], a.worlds, r=a.r, vocab=a.vocab))
        return 0
    extras = [True, False] if a.train_extra == "both" else [a.train_extra == "true"]
    for compute in a.compute:
        for extra in extras:
            print(table(a.presets, a.worlds, a.stages, compute=compute, r=a.r, vocab=a.vocab, train_extra=extra))
            print()
            if 2 in a.stages:
                print(options_table(a.presets, a.worlds, compute=compute, r=a.r, vocab=a.vocab, train_extra=extra))
                print()
    if a.detail:
        preset, world, stage = a.detail
        for compute in a.compute:
            print(detail(preset, int(world), _engine(stage), compute=compute, r=a.r, vocab=a.vocab,
                         train_extra=a.train_extra != "false", master_device=a.master_device))
            print()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
