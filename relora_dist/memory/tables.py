"""Markdown tables of the analytic memory model (`python tools/memory_model.py`): per-rank state per
preset, world size and engine; a ZeRO-2 job's ways to hold its ReLoRA phase, with ZeRO-3 and FSDP2
beside them; one configuration's breakdown. The model itself is relora_dist/memory/model.py.
"""

from __future__ import annotations

from relora_dist.memory.model import CATEGORIES, GIB, HOST_CATEGORIES, PHASES, TARGET_CASE, TARGETS, Shape, \
    per_rank_bytes, zero2_options
from relora_dist.memory.quant import TARGET as QUANT_TARGET
from relora_dist.memory.quant import quant_ratio, relora_quant_bytes


def _is_target_case(preset: str, world: int, compute: str, r: int, vocab: int, train_extra: bool) -> bool:
    return dict(preset=preset, world=world, compute=compute, r=r, vocab=vocab, train_extra=train_extra) == TARGET_CASE


def table(presets: list[str], worlds: list[int], stages: list[int | str], *, compute: str, r: int, vocab: int,
          train_extra: bool, merge_precision: str = "fp32") -> str:
    """Per-rank state of each phase per preset, world size and engine (2, 3: ZeRO; fsdp2)."""
    kw = dict(compute=compute, r=r, train_extra=train_extra, merge_precision=merge_precision)
    masters = ("none (bf16 merges)" if merge_precision != "fp32" else "the fp32 weights themselves"
               if compute == "fp32" else "ZeRO: fp32, sharded 1/world, on the device; FSDP2: its fp32 shards")
    lines = [f"Per-rank training state (GiB), {compute} compute, fp32 masters + AdamW, r={r}, vocab {vocab}, "
             f"train_extra={str(train_extra).lower()}, merge masters: {masters} (activations not included)", "",
             "| preset | params (M) | ReLoRA trainable (M) | ranks | ZeRO / fsdp2 | full-rank | warm start | ReLoRA "
             "| of which merge masters | ReLoRA / full-rank | w/o merge masters |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset in presets:
        shape = Shape.of(preset, vocab)
        c = shape.counts(r)
        base = c["wrapped"] + c["frozen"] + c["extra"]
        trainable = c["adapters"] + (c["extra"] if train_extra else 0)
        for world in worlds:
            for stage in stages:
                full = per_rank_bytes(shape, world, stage, "full_rank", **kw)
                warm = per_rank_bytes(shape, world, stage, "warm_start", **kw)
                rel = per_rank_bytes(shape, world, stage, "relora", **kw)
                lines.append(
                    f"| {preset} | {base / 1e6:.1f} | {trainable / 1e6:.1f} ({trainable / base:.0%}) | {world} | {stage} "
                    f"| {full['total'] / GIB:.2f} | {warm['total'] / GIB:.2f} | {rel['total'] / GIB:.2f} "
                    f"| {rel['merge_masters'] / GIB:.2f} | {rel['total'] / full['total']:.3f} "
                    f"| {(rel['total'] - rel['merge_masters']) / full['total']:.3f} |")
    return "\n".join(lines)


def _with_target(value: float, key: str, is_target: bool) -> str:
    if not is_target or key not in TARGETS:
        return f"{value:.3f}"
    return f"{value:.3f} (target <= {TARGETS[key]:.2f})"


def options_table(presets: list[str], worlds: list[int], *, compute: str, r: int, vocab: int,
                  train_extra: bool) -> str:
    """A ZeRO-2 job's ReLoRA phase / its full-rank phase, per way of holding the frozen weights'
    state, and ZeRO-3 and FSDP2 for comparison, each over its own full-rank phase
    (accelerator-resident bytes). FSDP2's full-rank phase holds 16 B per trainable param (fp32
    shard, fp32 grad, Adam) like ZeRO-3 under bf16 (2 + 2 + 4 + 8) and less than ZeRO-3 under
    fp32 (4 + 4 + 4 + 8): the same denominator under bf16, a smaller one under fp32."""
    lines = [f"ZeRO-2 ReLoRA phase / full-rank, accelerator-resident, {compute} compute, r={r}, vocab {vocab}, "
             f"train_extra={str(train_extra).lower()}", "",
             "| preset | ranks | full-rank ZeRO-2 (GiB) | masters replicated (before) | masters sharded | host masters "
             "| host masters, host bytes included | phase_stage=3 | ZeRO-3 (both phases) | FSDP2 (both phases) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for preset in presets:
        shape = Shape.of(preset, vocab)
        for world in worlds:
            o = zero2_options(shape, world, compute=compute, r=r, train_extra=train_extra)
            full = per_rank_bytes(shape, world, 2, "full_rank", compute=compute, r=r)["total"]
            hit = _is_target_case(preset, world, compute, r, vocab, train_extra)
            cells = [_with_target(o["replicated"], "replicated", hit), _with_target(o["sharded"], "sharded", hit),
                     _with_target(o["host"], "host", hit), f"{o['host_with_host']:.3f}",
                     _with_target(o["phase_stage_3"], "phase_stage_3", hit), _with_target(o["zero3"], "zero3", hit),
                     f"{o['fsdp2']:.3f}"]
            lines.append(f"| {preset} | {world} | {full / GIB:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail(preset: str, world: int, stage: int | str, *, compute: str, r: int, vocab: int, train_extra: bool,
           master_device: str = "device") -> str:
    shape = Shape.of(preset, vocab)
    engine = "FSDP2" if stage == "fsdp2" else f"ZeRO-{stage}"
    lines = [f"{preset}, {world} ranks, {engine}, {compute}, r={r}, vocab {vocab}, merge masters on "
             f"{master_device}: bytes per rank (GiB)",
             "| category | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]
    data = {ph: per_rank_bytes(shape, world, stage, ph, compute=compute, r=r, train_extra=train_extra,
                               master_device=master_device) for ph in PHASES}
    for cat in CATEGORIES + ("total",) + HOST_CATEGORIES + ("total_with_host",):
        lines.append(f"| {cat} | " + " | ".join(f"{data[ph][cat] / GIB:.3f}" for ph in PHASES) + " |")
    return "\n".join(lines)


def quant_table(presets: list[str], worlds: list[int], *, compute: str = "bf16", r: int = 128,
                vocab: int = 32000) -> str:
    lines = [f"ReLoRA phase / ZeRO-2 full-rank, accelerator-resident training state per rank, {compute} compute, "
             f"r={r}, vocab {vocab}, train_extra=true, nf4 with double quantization unless marked; the ZeRO-3 "
             f"columns are over ZeRO-3 full rank (its quantized base is a whole replica on every rank, where "
             f"ZeRO-3 keeps 1/world of the bf16 weights); FSDP2, which refuses a quantized base, is over ZeRO-2 "
             f"full rank: every FSDP2 tensor is sharded, so its ReLoRA phase needs no quantization to stay "
             f"below 0.45", "",
             "| preset | ranks | full-rank ZeRO-2 (GiB) | bf16 base, masters on device | nf4, masters on device "
             "| nf4 (single quant), host masters | nf4, host masters | nf4, host masters, adamw8bit "
             "| int8, host masters | ZeRO-3 bf16 base | ZeRO-3 nf4, host masters | FSDP2 bf16 base, adamw8bit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset in presets:
        shape = Shape.of(preset, vocab)
        for world in worlds:
            full = per_rank_bytes(shape, world, 2, "full_rank", compute=compute, r=r)["total"]
            full3 = per_rank_bytes(shape, world, 3, "full_rank", compute=compute, r=r)["total"]
            cells = [quant_ratio(shape, world, "none", compute=compute, r=r),
                     quant_ratio(shape, world, "nf4", compute=compute, r=r),
                     quant_ratio(shape, world, "nf4", compute=compute, r=r, master_device="cpu", double_quant=False),
                     quant_ratio(shape, world, "nf4", compute=compute, r=r, master_device="cpu"),
                     quant_ratio(shape, world, "nf4", compute=compute, r=r, master_device="cpu", optimizer="adamw8bit"),
                     quant_ratio(shape, world, "int8", compute=compute, r=r, master_device="cpu"),
                     per_rank_bytes(shape, world, 3, "relora", compute=compute, r=r)["total"] / full3,
                     relora_quant_bytes(shape, world, "nf4", compute=compute, r=r, master_device="cpu",
                                        stage=3)["total"] / full3,
                     per_rank_bytes(shape, world, "fsdp2", "relora", compute=compute, r=r,
                                    optimizer="adamw8bit")["total"] / full]
            text = [f"{c:.3f}" for c in cells]
            if (preset, world) == (QUANT_TARGET["preset"], QUANT_TARGET["world"]):
                text[3] += f" (target <= {QUANT_TARGET['limit']})"
            lines.append(f"| {preset} | {world} | {full / GIB:.2f} | " + " | ".join(text) + " |")
    return "\n".join(lines)
