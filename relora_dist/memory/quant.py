"""Per-rank training state of the ReLoRA phase with a quantized frozen base (relora.base_quant).

Extends relora_dist/memory/model.py: under ZeRO-2 every rank holds a bitsandbytes replica of each
frozen wrapped weight instead of its compute-dtype copy (NF4: ceil(n/2) bytes of codes + 4 bytes
of absmax per 64 elements, or 1 byte with double quantization, the default; int8: n bytes + 4 bytes
per row, relora_dist.relora.quant.quantized_nbytes),
and the fp32 merge masters are always kept (1/world each, also under fp32 compute, where they
otherwise alias the weights), on the device or in host memory. Under ZeRO-3 the replica replaces
the frozen weights' bf16 shards (2/world bytes per weight): it saves memory only below 4 ranks
(NF4), which `plan` warns about.

    python tools/memory_model.py quant          # the table docs/benchmarks.md shows (memory_tables.quant_table)
"""

from __future__ import annotations

import re

from relora_dist.memory.model import CATEGORIES, Shape, fmt_bytes, per_rank_bytes
from relora_dist.relora.quant import quantized_nbytes

TARGET = {"preset": "350m", "world": 8, "kind": "nf4", "master_device": "cpu", "limit": 0.45}


def quantized_base_bytes(shape: Shape, kind: str, double_quant: bool = True) -> float:
    rx = [re.compile(t) for t in shape.targets]
    return float(sum(quantized_nbytes(kind, o, i, double_quant) for name, o, i in shape.linears()
                     if any(x.search(name) for x in rx)))


def relora_quant_bytes(shape: Shape, world: int, kind: str, *, compute: str = "bf16", r: int = 128,
                       train_extra: bool = True, master_device: str = "device",
                       optimizer: str = "adamw", double_quant: bool = True, stage: int = 2) -> dict[str, float]:
    """ReLoRA-phase bytes per rank under ZeRO-`stage` with the frozen base quantized to `kind`
    (optimizer: see memory.model.per_rank_bytes)."""
    out = dict(per_rank_bytes(shape, world, stage, "relora", compute=compute, r=r, train_extra=train_extra,
                              master_device=master_device, optimizer=optimizer))
    if kind == "none":
        return out
    b = 2 if compute == "bf16" else 4
    wrapped = shape.tensors(r)["wrapped"]
    qbytes = quantized_base_bytes(shape, kind, double_quant)
    held = sum(wrapped) if stage == 2 else sum(-(-n // world) for n in wrapped)  # replicated / ZeRO-3 shards
    out["params"] += qbytes - held * b
    masters = float(sum(-(-n // world) for n in wrapped)) * 4
    key = "host_merge_masters" if master_device == "cpu" else "merge_masters"
    out[key] = masters  # kept under fp32 compute too: the weights no longer alias them
    out["quantized_base"] = qbytes
    out["total"] = sum(out[c] for c in CATEGORIES)
    out["total_with_host"] = out["total"] + out["host_merge_masters"]
    return out


def quant_ratio(shape: Shape, world: int, kind: str, **kw) -> float:
    """Accelerator-resident ReLoRA-phase bytes with a quantized base / ZeRO-2 full-rank bytes."""
    full = per_rank_bytes(shape, world, 2, "full_rank", compute=kw.get("compute", "bf16"), r=kw.get("r", 128))
    return relora_quant_bytes(shape, world, kind, **kw)["total"] / full["total"]


def quant_plan(shape: Shape, world: int, stage: int, kind: str, *, compute: str, r: int, train_extra: bool,
               master_device: str, optimizer: str, double_quant: bool) -> list[str]:
    """--dry_run's lines for a quantized base: the ReLoRA phase's bytes per rank with it, and a
    warning when it holds more than the unquantized base would: under ZeRO-3 every rank holds the
    whole quantized base where ZeRO-3 keeps only 1/world of the bf16 weights (NF4 from 4 ranks on)."""
    kw = dict(compute=compute, r=r, train_extra=train_extra, master_device=master_device, optimizer=optimizer)
    q = relora_quant_bytes(shape, world, kind, double_quant=double_quant, stage=stage, **kw)
    plain = per_rank_bytes(shape, world, stage, "relora", **kw)
    host = f" + {fmt_bytes(q['host_merge_masters'])} fp32 merge masters in host memory" if q["host_merge_masters"] else ""
    lines = [f"with relora.base_quant={kind}: ReLoRA phase {fmt_bytes(q['total'])} per rank{host} (the quantized "
             f"base, {fmt_bytes(q['quantized_base'])}, on every rank)"]
    if q["total"] > plain["total"]:
        lines.append(f"warning: relora.base_quant={kind} holds more per rank than the unquantized base "
                     f"({fmt_bytes(q['total'])} vs {fmt_bytes(plain['total'])} under ZeRO-{stage} at {world} ranks: "
                     f"every rank holds the whole quantized base); use relora.base_quant=none"
                     + (" or ds_configs/zero2.json" if stage == 3 else ""))
    return lines
