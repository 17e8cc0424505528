"""Analytic per-rank memory of the training state under DeepSpeed ZeRO-2/3, both phases (issue 5).

What one rank holds between forward passes, in bytes (activations, communication buckets and
allocator slack are NOT modelled):

| item | ZeRO-2 | ZeRO-3 |
|---|---|---|
| compute params (all: trainable, frozen, adapters) | N x b (replicated) | N x b / world |
| gradients of trainable params (partition) | T x b / world | T x b / world |
| fp32 master of trainable params (a copy even with fp32 compute) | T x 4 / world | T x 4 / world |
| Adam moments (exp_avg, exp_avg_sq) | T x 8 / world | T x 8 / world |
| fp32 merge masters of frozen wrapped W (ReLoRA, bf16 compute) | W x 4 (W replicated) | W x 4 / world |

b = 2 (bf16 compute) or 4 (fp32). N counts the adapters whenever the model is wrapped (this system
wraps before the first engine, so its warm start holds frozen adapters too); T is the trainable
count of the phase: all base params in the full-rank phase, adapters (+ embeddings, norms, lm_head
with relora.train_extra) in the ReLoRA phase. ZeRO-3 pads each tensor to a multiple of the world
size (modelled per tensor); ZeRO-2 alignment padding is ignored (< world x 16 elements per group).
These are exactly the tensors tools/bench.py counts (validated there: `tools/memory_model.py
validate`), so the model is checked at world 2 and extrapolated to 8 / 64 ranks and large presets.

Phases: ``full_rank`` = plain full-rank training (no adapters: the baseline a ReLoRA run is
compared with), ``warm_start`` = this system's full-rank phase (adapters allocated, frozen),
``relora`` = the ReLoRA phase.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from relora_dist.model import PRESETS

PHASES = ("full_rank", "warm_start", "relora")
CATEGORIES = ("params", "grads", "fp32_master", "optimizer_state", "merge_masters")
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, preset: str, vocab: int = 32000, layers: int = 0) -> "Shape":
        p = PRESETS[preset]
        return cls(p.hidden_size, p.intermediate_size, layers or p.num_layers, vocab)

    def tensors(self, r: int) -> dict[str, list[tuple[int, str]]]:
        """Element counts per tensor, by role: wrapped (frozen in ReLoRA), adapters, extra
        (embeddings, norms, lm_head: trainable in ReLoRA iff train_extra)."""
        h, i, L, V = self.hidden, self.intermediate, self.layers, self.vocab
        wrapped, adapters = [], []
        for _ in range(L):
            for out_f, in_f in [(h, h)] * 4 + [(i, h), (i, h), (h, i)]:  # q k v o, gate up, down
                wrapped.append(out_f * in_f)
                adapters += [r * in_f, out_f * r]
        extra = [V * h, V * h] + [h] * (2 * L + 1)  # embed_tokens, lm_head, norms
        return {"wrapped": wrapped, "adapters": adapters, "extra": extra}

    def counts(self, r: int) -> dict[str, int]:
        return {k: sum(v) for k, v in self.tensors(r).items()}


def _per_rank(sizes: list[int], world: int, sharded: bool) -> float:
    """Elements this rank holds of these tensors (ZeRO-3: ceil(numel / world) each)."""
    if not sharded:
        return float(sum(sizes))
    return float(sum(-(-n // world) for n in sizes))


def per_rank_bytes(shape: Shape, world: int, stage: int, phase: str, *, compute: str = "bf16", r: int = 128,
                   train_extra: bool = True, merge_precision: str = "fp32",
                   shard_merge_masters: bool = False) -> dict[str, float]:
    """Bytes per rank by category (and 'total') for one configuration. `shard_merge_masters` is a
    what-if for ZeRO-2 (not implemented by the engine): each rank keeps the fp32 master of only
    1/world of every frozen W and all-gathers the rounded slices after a merge."""
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: use one of {PHASES}")
    if stage not in (2, 3):
        raise ValueError(f"stage {stage}: use 2 or 3")
    if compute not in ("bf16", "fp32"):
        raise ValueError(f"compute {compute!r}: use bf16 or fp32")
    b = 2 if compute == "bf16" else 4
    t = shape.tensors(r)
    sharded = stage == 3
    present = t["wrapped"] + t["extra"] + (t["adapters"] if phase != "full_rank" else [])
    if phase == "relora":
        trainable = t["adapters"] + (t["extra"] if train_extra else [])
    else:
        trainable = t["wrapped"] + t["extra"]
    # Trainable partitions: ZeRO-2 flattens a group and splits it evenly; ZeRO-3 splits per tensor.
    part = _per_rank(trainable, world, True) if sharded else sum(trainable) / world
    out = {
        "params": _per_rank(present, world, sharded) * b,
        "grads": part * b,
        "fp32_master": part * 4,  # a separate copy even under fp32 (measured, DeepSpeed 0.19.8)
        "optimizer_state": part * 8,
        "merge_masters": 0.0,
    }
    if phase == "relora" and compute == "bf16" and merge_precision == "fp32":
        out["merge_masters"] = (_per_rank(t["wrapped"], world, True) if (sharded or shard_merge_masters)
                                else float(sum(t["wrapped"]))) * 4
    out["total"] = sum(out[c] for c in CATEGORIES)
    return out


def ratio(shape: Shape, world: int, stage: int, *, baseline: str = "full_rank", **kw) -> float:
    """ReLoRA-phase bytes / `baseline`-phase bytes per rank."""
    return (per_rank_bytes(shape, world, stage, "relora", **kw)["total"]
            / per_rank_bytes(shape, world, stage, baseline, **kw)["total"])


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def table(presets: list[str], worlds: list[int], stages: list[int], *, compute: str, r: int, vocab: int,
          train_extra: bool, merge_precision: str = "fp32") -> str:
    kw = dict(compute=compute, r=r, train_extra=train_extra, merge_precision=merge_precision)
    lines = [f"Per-rank training state (GiB), {compute} compute, fp32 masters + AdamW, r={r}, vocab {vocab}, "
             f"train_extra={str(train_extra).lower()}, merge masters {'fp32' if merge_precision == 'fp32' else 'none'}"
             f" (activations not included)", "",
             "| preset | params (M) | ReLoRA trainable (M) | ranks | ZeRO | full-rank | warm start | ReLoRA "
             "| of which merge masters | ReLoRA / full-rank | w/o merge masters | ZeRO-2 masters sharded (what-if) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset in presets:
        shape = Shape.of(preset, vocab)
        c = shape.counts(r)
        base = c["wrapped"] + c["extra"]
        trainable = c["adapters"] + (c["extra"] if train_extra else 0)
        for world in worlds:
            for stage in stages:
                full = per_rank_bytes(shape, world, stage, "full_rank", **kw)
                warm = per_rank_bytes(shape, world, stage, "warm_start", **kw)
                rel = per_rank_bytes(shape, world, stage, "relora", **kw)
                what_if = (f"{per_rank_bytes(shape, world, 2, 'relora', shard_merge_masters=True, **kw)['total'] / full['total']:.3f}"
                           if stage == 2 else "")
                flag = " (target <= 0.45)" if preset == "350m" and stage == 2 else ""
                lines.append(
                    f"| {preset} | {base / 1e6:.1f} | {trainable / 1e6:.1f} ({trainable / base:.0%}) | {world} | {stage} "
                    f"| {full['total'] / GIB:.2f} | {warm['total'] / GIB:.2f} | {rel['total'] / GIB:.2f} "
                    f"| {rel['merge_masters'] / GIB:.2f} | {rel['total'] / full['total']:.3f}{flag} "
                    f"| {(rel['total'] - rel['merge_masters']) / full['total']:.3f} | {what_if} |")
    return "\n".join(lines)


def detail(preset: str, world: int, stage: int, *, compute: str, r: int, vocab: int, train_extra: bool) -> str:
    shape = Shape.of(preset, vocab)
    lines = [f"{preset}, {world} ranks, ZeRO-{stage}, {compute}, r={r}, vocab {vocab}: bytes per rank (GiB)",
             "| category | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]
    data = {ph: per_rank_bytes(shape, world, stage, ph, compute=compute, r=r, train_extra=train_extra)
            for ph in PHASES}
    for cat in CATEGORIES + ("total",):
        lines.append(f"| {cat} | " + " | ".join(f"{data[ph][cat] / GIB:.3f}" for ph in PHASES) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Validation against tools/bench.py measurements
# ------------------------------------------------------------------------------------------------

def predict_for_bench(model: dict, world: int, stage: int, phase: str, train_extra: bool) -> dict[str, float]:
    """Prediction for a bench measurement: the bench's full-rank phase is this system's warm start."""
    shape = Shape(model["hidden_size"], model["intermediate_size"], model["num_layers"], model["vocab_size"])
    return per_rank_bytes(shape, world, stage, "warm_start" if phase == "full_rank" else "relora",
                          compute=model["precision"], r=model["r"], train_extra=train_extra)


def validate(bench: dict) -> list[dict]:
    """Predicted vs measured per-rank state bytes for every stage and phase in a bench JSON."""
    rows = []
    world = bench["config"]["world_size"]
    for stage_key, s in bench["stages"].items():
        stage = int(stage_key)
        phases = [("full_rank", s["state_bytes_per_rank"]["full_rank"], True),
                  ("relora", s["state_bytes_per_rank"]["relora"], bench["config"].get("train_extra", True))]
        if "train_extra_false" in s:
            phases.append(("relora", s["train_extra_false"]["state_bytes_per_rank"], False))
        for phase, measured, extra in phases:
            pred = predict_for_bench(s["model"], world, stage, phase, extra)
            meas_total = sum(measured[c] for c in ("params", "grads", "fp32_master", "optimizer_state",
                                                   "merge_masters"))
            row = {"stage": stage, "phase": phase, "train_extra": extra, "predicted": pred["total"],
                   "measured": meas_total, "ratio": pred["total"] / meas_total,
                   "error_pct": 100 * (pred["total"] - meas_total) / meas_total,
                   "by_category": {c: (pred[c], measured[c]) for c in CATEGORIES}}
            rows.append(row)
    return rows


def format_validation(rows: list[dict], bench: dict) -> str:
    m = next(iter(bench["stages"].values()))["model"]
    lines = [f"memory model vs measured (tools/bench.py, preset {bench['config']['preset']}, hidden {m['hidden_size']}, "
             f"{m['num_layers']} layers, vocab {m['vocab_size']}, r {m['r']}, {m['precision']}, world "
             f"{bench['config']['world_size']}): per-rank state bytes (MiB)", "",
             "| ZeRO | phase | train_extra | predicted | measured | predicted / measured | error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['phase']} | {str(r['train_extra']).lower()} | {r['predicted'] / 2**20:.2f} "
                     f"| {r['measured'] / 2**20:.2f} | {r['ratio']:.4f} | {r['error_pct']:+.2f}% |")
    worst = max(abs(r["error_pct"]) for r in rows)
    lines.append("")
    lines.append(f"largest error {worst:.2f}%")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Analytic per-rank memory of ReLoRA vs full-rank under ZeRO-2/3.")
    p.add_argument("mode", nargs="?", default="table", choices=["table", "validate"],
                   help="table: Markdown tables (default); validate: compare with a tools/bench.py JSON")
    p.add_argument("--bench", default="benchmarks/bench_tiny.json", help="validate: bench JSON (tools/bench.py --out)")
    p.add_argument("--max-error-pct", type=float, default=10.0, help="validate: exit 1 above this error")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--worlds", type=int, nargs="+", default=[8, 64])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    p.add_argument("--compute", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--r", type=int, default=128, help="ReLoRA rank (paper 128)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--train-extra", choices=["true", "false", "both"], default="true")
    p.add_argument("--detail", nargs=3, metavar=("PRESET", "WORLD", "STAGE"), help="breakdown of one config")
    a = p.parse_args(argv)
    if a.mode == "validate":
        bench = json.loads(Path(a.bench).read_text())
        rows = validate(bench)
        print(format_validation(rows, bench))
        return 0 if max(abs(r["error_pct"]) for r in rows) <= a.max_error_pct else 1
    extras = [True, False] if a.train_extra == "both" else [a.train_extra == "true"]
    for compute in a.compute:
        for extra in extras:
            print(table(a.presets, a.worlds, a.stages, compute=compute, r=a.r, vocab=a.vocab, train_extra=extra))
            print()
    if a.detail:
        preset, world, stage = a.detail
        for compute in a.compute:
            print(detail(preset, int(world), int(stage), compute=compute, r=a.r, vocab=a.vocab,
                         train_extra=a.train_extra != "false"))
            print()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
