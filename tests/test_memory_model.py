"""Unit checks of the analytic per-rank memory model (relora_dist/memory/model.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relora_dist.memory import model as mm
from relora_dist.memory import report
from relora_dist.model import PRESETS, build_model, llama_config
from relora_dist.relora.layer import wrap_model

BIG = ("350m", "1b3", "7b")
REPO = Path(__file__).resolve().parent.parent


def test_param_counts_match_the_real_wrapped_model():
    """The model's tensor inventory equals what relora_dist builds (tiny preset, 8k vocab, r=16)."""
    model = build_model(llama_config("tiny", 8000, 64), seed=0)
    wrap_model(model, None, r=16, alpha=32, dropout=0.0)
    names = dict(model.named_parameters())
    adapters = sum(p.numel() for n, p in names.items() if "lora_" in n)
    wrapped = sum(p.numel() for n, p in names.items() if n.endswith("proj.weight"))
    extra = sum(p.numel() for n, p in names.items() if "lora_" not in n and not n.endswith("proj.weight"))
    counts = mm.Shape.of("tiny", vocab=8000).counts(16)
    assert counts == {"wrapped": wrapped, "adapters": adapters, "frozen": 0, "extra": extra}



# GQA (8 query heads, 2 k/v heads of 16: k/v 128 -> 32 rows): untied Mistral; tied Qwen2 with q/k/v
# biases; LLaMA with attention and MLP biases and a head_dim that is not hidden / heads
GQA_CONFIGS = {"mistral": dict(num_key_value_heads=2),
               "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=True),
               "llama": dict(num_key_value_heads=2, head_dim=24, attention_bias=True, mlp_bias=True)}


@pytest.mark.parametrize("model_type", list(GQA_CONFIGS))
def test_gqa_biases_tying_match_the_real_model(model_type):
    """Shape.of_config (what --dry_run plans an init_from model with) counts the tensors the
    instantiated, wrapped transformers model holds, by role: k/v projections at their grouped-query
    size, the wrapped linears' biases as frozen base, no lm_head of its own when tied."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=1000, hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=8, **GQA_CONFIGS[model_type])
    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(config)
    wrap_model(model, None, r=8, alpha=16, dropout=0.0)
    names = dict(model.named_parameters())  # a tied lm_head appears once, as the embedding
    wrapped_modules = {n.rsplit(".", 1)[0] for n in names if "lora_A" in n}
    real = {"wrapped": sum(names[f"{m}.weight"].numel() for m in wrapped_modules),
            "adapters": sum(p.numel() for n, p in names.items() if "lora_" in n),
            "frozen": sum(names[f"{m}.bias"].numel() for m in wrapped_modules if f"{m}.bias" in names)}
    real["extra"] = sum(p.numel() for p in names.values()) - sum(real.values())
    shape = mm.Shape.of_config(config)
    assert shape.counts(8) == real
    assert names["model.layers.0.self_attn.k_proj.weight"].shape == (shape.kv_dim, 128)
    assert shape.kv_dim == 2 * (24 if model_type == "llama" else 16) and shape.q_dim == 4 * shape.kv_dim
    assert (real["frozen"] > 0) == (model_type != "mistral") and ("lm_head.weight" in names) != shape.tied
    # the full-rank phase trains every element, the ReLoRA phase holds them all plus the adapters
    n = sum(p.numel() for p in names.values())
    assert mm.per_rank_bytes(shape, 1, 2, "full_rank", compute="fp32", r=8)["params"] == 4 * (n - real["adapters"])
    assert mm.per_rank_bytes(shape, 1, 2, "relora", compute="fp32", r=8)["params"] == 4 * n
    assert mm.per_rank_bytes(shape, 1, 2, "full_rank", compute="fp32", r=8)["optimizer_state"] == 8 * (
        n - real["adapters"])
    assert mm.per_rank_bytes(shape, 1, 2, "relora", compute="fp32", r=8, train_extra=False)["optimizer_state"] == (
        8 * real["adapters"])

@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("phase", mm.PHASES)
@pytest.mark.parametrize("compute", ["bf16", "fp32"])
def test_zero3_bytes_scale_as_one_over_world(preset, phase, compute):
    shape = mm.Shape.of(preset)
    b8 = mm.per_rank_bytes(shape, 8, 3, phase, compute=compute)["total"]
    b64 = mm.per_rank_bytes(shape, 64, 3, phase, compute=compute)["total"]
    assert b8 / b64 == pytest.approx(8.0, rel=0.01)


def test_zero2_replicates_params_and_shards_the_rest():
    shape = mm.Shape.of("350m")
    a = mm.per_rank_bytes(shape, 8, 2, "full_rank")
    b = mm.per_rank_bytes(shape, 64, 2, "full_rank")
    assert a["params"] == b["params"]  # replicated compute weights
    for c in ("grads", "fp32_master", "optimizer_state"):
        assert a[c] / b[c] == pytest.approx(8.0, rel=1e-9)
    # bf16: 2 B params, 2 B grads, 4 B master, 8 B Adam per trainable element
    n = sum(mm.Shape.of("350m").counts(128)[k] for k in ("wrapped", "extra"))
    assert a["params"] == 2 * n and a["optimizer_state"] == pytest.approx(8 * n / 8)


@pytest.mark.parametrize("preset", BIG)
@pytest.mark.parametrize("world", [8, 64])
def test_relora_phase_is_smaller_than_full_rank_for_big_presets(preset, world):
    shape = mm.Shape.of(preset)
    for compute in ("bf16", "fp32"):
        assert mm.ratio(shape, world, 3, compute=compute) < 1.0
    if world == 8:  # ZeRO-2 (bf16: sharded merge masters; fp32: they alias W). At 64 ranks the
        # sharded optimizer state is so small that the replicated adapters outweigh it (350m, 1b3).
        for compute in ("bf16", "fp32"):
            assert mm.ratio(shape, world, 2, compute=compute) < 1.0


def test_merge_masters_are_fp32_copies_of_the_owned_frozen_weights():
    shape = mm.Shape.of("1b3")
    wrapped = shape.counts(128)["wrapped"]
    z2 = mm.per_rank_bytes(shape, 8, 2, "relora", compute="bf16")
    z3 = mm.per_rank_bytes(shape, 8, 3, "relora", compute="bf16")
    assert z2["merge_masters"] == z3["merge_masters"]  # ZeRO-2 keeps only its 1/world slice, like ZeRO-3
    assert z3["merge_masters"] == pytest.approx(4 * wrapped / 8, rel=1e-4)
    replicated = mm.per_rank_bytes(shape, 8, 2, "relora", compute="bf16", shard_merge_masters=False)
    assert replicated["merge_masters"] == 4 * wrapped  # the former ZeRO-2 layout: a full copy per rank
    assert mm.per_rank_bytes(shape, 8, 3, "relora", compute="bf16", shard_merge_masters=False) == z3
    assert mm.per_rank_bytes(shape, 8, 2, "relora", compute="fp32")["merge_masters"] == 0
    assert mm.per_rank_bytes(shape, 8, 2, "relora", compute="bf16", merge_precision="bf16")["merge_masters"] == 0
    assert mm.per_rank_bytes(shape, 8, 2, "full_rank", compute="bf16")["merge_masters"] == 0


SMALL = mm.Shape(hidden=10, intermediate=30, layers=1, vocab=50)  # wrapped W: 4 x 100 and 3 x 300 elements


@pytest.mark.parametrize("stage", [2, 3])
def test_merge_masters_hold_ceil_numel_over_world_per_tensor(stage):
    # world 3: ceil(100/3) = 34 per attention W, 100 per MLP W: (4 x 34 + 3 x 100) x 4 B = 1744 B
    b = mm.per_rank_bytes(SMALL, 3, stage, "relora", compute="bf16", r=2)
    assert b["merge_masters"] == 1744 and b["host_merge_masters"] == 0
    assert b["total_with_host"] == b["total"]
    full_copy = mm.per_rank_bytes(SMALL, 3, stage, "relora", compute="bf16", r=2, shard_merge_masters=False)
    assert full_copy["merge_masters"] == (1744 if stage == 3 else (4 * 100 + 3 * 300) * 4)


@pytest.mark.parametrize("stage", [2, 3])
def test_host_merge_masters_leave_the_accelerator_total(stage):
    dev = mm.per_rank_bytes(SMALL, 3, stage, "relora", compute="bf16", r=2)
    host = mm.per_rank_bytes(SMALL, 3, stage, "relora", compute="bf16", r=2, master_device="cpu")
    assert host["merge_masters"] == 0 and host["host_merge_masters"] == 1744
    assert host["total"] == dev["total"] - 1744
    assert host["total_with_host"] == dev["total"]
    for c in ("params", "grads", "fp32_master", "optimizer_state"):
        assert host[c] == dev[c]
    # Nothing to move where no separate master exists.
    fp32 = mm.per_rank_bytes(SMALL, 3, stage, "relora", compute="fp32", r=2, master_device="cpu")
    assert fp32["host_merge_masters"] == 0 and fp32["total_with_host"] == fp32["total"]


def test_phase_stage_3_is_a_zero3_relora_phase_over_a_zero2_baseline():
    shape = mm.Shape.of("350m")
    rel3 = mm.per_rank_bytes(shape, 8, 3, "relora")["total"]
    full2 = mm.per_rank_bytes(shape, 8, 2, "full_rank")["total"]
    assert mm.ratio(shape, 8, 2, relora_stage=3) == rel3 / full2
    assert mm.ratio(shape, 8, 2, relora_stage=3) < mm.ratio(shape, 8, 3) < mm.ratio(shape, 8, 2)


def test_350m_zero2_bf16_ratios_meet_the_targets_at_8_ranks():
    """350m, bf16, r=128, vocab 32k, 8 ranks: ReLoRA phase / full-rank (accelerator-resident)."""
    o = mm.zero2_options(mm.Shape.of("350m"), 8, compute="bf16", r=128)
    assert o["replicated"] == pytest.approx(1.6556, abs=1e-4)  # before: a full fp32 copy of W per rank
    assert o["sharded"] == pytest.approx(0.8886, abs=1e-4) and o["sharded"] <= mm.TARGETS["sharded"] == 0.90
    assert o["host"] == pytest.approx(0.7791, abs=1e-4) and o["host"] <= mm.TARGETS["host"] == 0.80
    assert o["host_with_host"] == pytest.approx(o["sharded"])  # same bytes, some of them on the host
    assert o["phase_stage_3"] == pytest.approx(0.3461, abs=1e-4) and o["phase_stage_3"] <= 0.65
    assert o["zero3"] == pytest.approx(0.6490, abs=1e-4) and o["zero3"] <= mm.TARGETS["zero3"] == 0.65
    # At 64 ranks the replicated bf16 W and adapters outweigh the freed (already 1/64) optimizer
    # state on ZeRO-2 whatever happens to the masters; sharding the phase is what helps.
    o64 = mm.zero2_options(mm.Shape.of("350m"), 64, compute="bf16", r=128)
    assert o64["host"] > 1.0 and o64["phase_stage_3"] < 0.1 and o64["zero3"] == pytest.approx(o["zero3"], abs=1e-3)


def test_targets_select_the_wrapped_linears():
    """relora.targets moves linears between 'wrapped' and 'extra', as wrap_model does."""
    targets = [r"self_attn\.(q|v)_proj$", r"lm_head"]
    model = build_model(llama_config("tiny", 8000, 64), seed=0)
    wrap_model(model, targets, r=16, alpha=32, dropout=0.0)
    names = dict(model.named_parameters())
    wrapped_modules = {n.rsplit(".", 1)[0] for n in names if "lora_A" in n}
    wrapped = sum(names[f"{m}.weight"].numel() for m in wrapped_modules)
    adapters = sum(p.numel() for n, p in names.items() if "lora_" in n)
    extra = sum(p.numel() for p in names.values()) - wrapped - adapters
    counts = mm.Shape(128, 344, 2, 8000, tuple(targets)).counts(16)
    assert counts == {"wrapped": wrapped, "adapters": adapters, "frozen": 0, "extra": extra}


def test_train_extra_and_rank_move_the_relora_phase_only():
    shape = mm.Shape.of("350m")
    full = mm.per_rank_bytes(shape, 8, 3, "full_rank")
    assert full == mm.per_rank_bytes(shape, 8, 3, "full_rank", r=8, train_extra=False)
    with_extra = mm.per_rank_bytes(shape, 8, 3, "relora")["total"]
    without = mm.per_rank_bytes(shape, 8, 3, "relora", train_extra=False)["total"]
    assert without < with_extra
    assert mm.per_rank_bytes(shape, 8, 3, "relora", r=32)["total"] < with_extra
    # warm start = full rank + the frozen adapters' compute copies
    warm = mm.per_rank_bytes(shape, 8, 3, "warm_start")
    adapters = shape.counts(128)["adapters"]
    assert warm["params"] - full["params"] == pytest.approx(2 * adapters / 8, rel=1e-3)


def test_single_rank_350m_matches_the_paper_style_estimate():
    """Without sharding, 16 B/param full-rank vs 2 B/param frozen + 16 B/trainable: ~0.44 (bf16,
    no merge masters), the regime the first 0.45 target comes from."""
    shape = mm.Shape.of("350m")
    r = mm.ratio(shape, 1, 2, compute="bf16", merge_precision="bf16")
    assert 0.40 < r < 0.46


def test_validate_reproduces_a_bench_measurement():
    shape = mm.Shape.of("tiny", vocab=8000)
    model = {"hidden_size": shape.hidden, "intermediate_size": shape.intermediate, "num_layers": shape.layers,
             "vocab_size": 8000, "r": 32, "precision": "fp32"}
    measured = {ph: mm.per_rank_bytes(shape, 2, 3, "warm_start" if ph == "full_rank" else ph, compute="fp32", r=32)
                for ph in ("full_rank", "relora")}
    measured["relora"] = {k: v * 1.05 for k, v in measured["relora"].items()}  # a 5% discrepancy
    bench = {"config": {"world_size": 2, "preset": "tiny", "train_extra": True},
             "stages": {"3": {"model": model, "state_bytes_per_rank": measured}}}
    rows = report.validate(bench)
    assert [r["phase"] for r in rows] == ["full_rank", "relora"]
    assert rows[0]["error_pct"] == pytest.approx(0.0, abs=1e-9)
    assert rows[1]["ratio"] == pytest.approx(1 / 1.05)
    assert "largest error 4.76%" in report.format_validation(rows, bench)


def test_cli_table_lists_every_preset_for_8_and_64_ranks(capsys):
    assert report.main(["--compute", "bf16"]) == 0
    out = capsys.readouterr().out
    for preset in PRESETS:
        for world in (8, 64):
            for stage in (2, 3):
                assert f"| {preset} |" in out and f"| {world} | {stage} |" in out
    # The ZeRO-2 options table, with the targets next to the 350m / 8-rank figures.
    row = next(ln for ln in out.splitlines() if ln.startswith("| 350m | 8 | "))
    assert ("| 1.656 | 0.889 (target <= 0.90) | 0.779 (target <= 0.80) | 0.889 | 0.346 (target <= 0.65) "
            "| 0.649 (target <= 0.65) |") in row, row
    assert "target" not in next(ln for ln in out.splitlines() if ln.startswith("| 350m | 64 | "))


def _bench(shape: mm.Shape, measured: dict, config: dict, stage: int = 2) -> dict:
    model = {"hidden_size": shape.hidden, "intermediate_size": shape.intermediate, "num_layers": shape.layers,
             "vocab_size": shape.vocab, "r": 2, "precision": "bf16"}
    return {"config": {"world_size": 3, "preset": "tiny", "train_extra": True, **config},
            "stages": {str(stage): {"model": model, "state_bytes_per_rank": measured}}}


def _measured(stage: int, relora_stage: int, **kw) -> dict:
    full = mm.per_rank_bytes(SMALL, 3, stage, "warm_start", compute="bf16", r=2)
    rel = mm.per_rank_bytes(SMALL, 3, relora_stage, "relora", compute="bf16", r=2, **kw)
    rel = dict(rel, merge_masters=rel["merge_masters"] + rel["host_merge_masters"])  # the bench counts both
    return {"full_rank": full, "relora": rel}


def test_validate_reads_the_merge_master_layout_of_the_bench_json():
    """JSONs measured when ZeRO-2 replicated its masters carry no `zero2_merge_masters` key; newer
    ones say "sharded" and name merge_master_device / phase_stage."""
    sharded = _measured(2, 2)
    new = report.validate(_bench(SMALL, sharded, {"zero2_merge_masters": "sharded"}))
    assert [abs(r["error_pct"]) for r in new] == [0.0, 0.0]
    old = report.validate(_bench(SMALL, sharded, {}))  # predicted as replicated: over by the full copy
    assert old[1]["predicted"] - old[1]["measured"] == pytest.approx((4 * 100 + 3 * 300) * 4 - 1744)
    replicated = _measured(2, 2, shard_merge_masters=False)
    assert abs(report.validate(_bench(SMALL, replicated, {}))[1]["error_pct"]) == 0.0
    host = report.validate(_bench(SMALL, _measured(2, 2, master_device="cpu"),
                              {"zero2_merge_masters": "sharded", "merge_master_device": "cpu"}))
    assert [abs(r["error_pct"]) for r in host] == [0.0, 0.0]
    phase3 = _bench(SMALL, _measured(2, 3), {"zero2_merge_masters": "sharded", "phase_stage": "3"})
    assert [abs(r["error_pct"]) for r in report.validate(phase3)] == [0.0, 0.0]
    phase3["config"].pop("phase_stage")
    phase3["stages"]["2"]["relora_stage"] = 3  # the per-stage record alone also says so
    assert [abs(r["error_pct"]) for r in report.validate(phase3)] == [0.0, 0.0]
    override = _bench(SMALL, _measured(2, 3), {"zero2_merge_masters": "sharded",
                                                 "override": ["--relora.phase_stage=3"]})
    assert [abs(r["error_pct"]) for r in report.validate(override)] == [0.0, 0.0]


GPU_AFTER = REPO / "benchmarks" / "gpu" / "h200_350m_w1_after"


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks").glob("bench_*.json")) + sorted(GPU_AFTER.glob("*.json")),
                         ids=lambda p: p.name if p.parent.name == "benchmarks" else f"gpu/{p.name}")
def test_committed_bench_jsons_validate_to_the_byte(path):
    bench = json.loads(path.read_text())
    rows = report.validate(bench)
    assert rows and max(abs(r["error_pct"]) for r in rows) < 0.01, report.format_validation(rows, bench)


@pytest.mark.parametrize("path", sorted(GPU_AFTER.glob("*.json")), ids=lambda p: p.name)
def test_gpu_allocated_memory_is_the_listed_state_plus_a_constant(path):
    """On the GPU the CUDA allocator's bytes at the state read (after the last backward: no
    activations) exceed the engine tensors the bench lists by the same small constant in both
    phases (workspace and buffers, 64-66 MiB): nothing outside the listing, such as a dead engine's
    partition kept alive, is left behind by the switch."""
    for s in json.loads(path.read_text())["stages"].values():
        gap = {ph: s["cuda_memory_mb"][ph]["allocated_at_state_mb"]
               - s["state_bytes_per_rank"][ph]["state_accelerator"] / 2**20 for ph in ("full_rank", "relora")}
        assert 0 <= gap["full_rank"] < 100 and abs(gap["relora"] - gap["full_rank"]) < 8, gap


def _plan(world: int, stage: int = 2, **kw) -> list[str]:
    args = dict(compute="bf16", r=128, train_extra=True, merge_precision="fp32", master_device="device",
                phase_stage="same", relora=True, warm_start=True)
    return mm.plan(mm.Shape.of("350m", 32000), world, stage, **{**args, **kw})


def test_plan_warns_when_the_relora_phase_outgrows_full_rank_and_hints_phase_stage_3():
    two = _plan(2)
    assert len(two) == 2 and two[1].startswith("hint: --relora.phase_stage=3 would hold ")
    warm = mm.per_rank_bytes(mm.Shape.of("350m"), 2, 2, "warm_start", r=128)["total"]
    assert f"full-rank warm start {mm.fmt_bytes(warm)}," in two[0]
    # No warm start: compared with plain full-rank training, which at 64 ranks holds less (1.10x).
    cold = _plan(64, warm_start=False)
    assert cold[1].startswith("warning: the ReLoRA phase needs 1.10x the memory of full-rank training")
    assert cold[2].startswith("hint:")
    host = _plan(8, master_device="cpu")
    assert "fp32 merge masters in host memory" in host[0]
    z3 = _plan(64, phase_stage="3")
    assert len(z3) == 1 and "ReLoRA phase (ZeRO-3)" in z3[0]
    assert len(_plan(64, stage=3)) == 1  # already ZeRO-3: nothing to suggest
    full = _plan(8, relora=False)
    assert len(full) == 1 and "ReLoRA" not in full[0] and "full-rank" in full[0]


def test_rejects_unknown_phase_stage_and_precision():
    shape = mm.Shape.of("tiny")
    with pytest.raises(ValueError):
        mm.per_rank_bytes(shape, 2, 3, "bogus")
    with pytest.raises(ValueError):
        mm.per_rank_bytes(shape, 2, 1, "relora")
    with pytest.raises(ValueError):
        mm.per_rank_bytes(shape, 2, 2, "relora", compute="fp16")
    with pytest.raises(ValueError):
        mm.per_rank_bytes(shape, 2, 2, "relora", master_device="gpu")


# ------------------------------------------------------------------------------------------------
# FSDP2
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", mm.PHASES)
def test_fsdp2_keeps_fp32_shards_and_nothing_beside_them(phase):
    """Params, grads and Adam moments all 1/world; params and grads fp32 whatever the compute dtype;
    no fp32 master copy and no merge masters (the shards are both)."""
    shape = mm.Shape.of("350m")
    bf16 = mm.per_rank_bytes(shape, 8, "fsdp2", phase, compute="bf16")
    assert bf16 == mm.per_rank_bytes(shape, 8, "fsdp2", phase, compute="fp32")
    assert bf16["fp32_master"] == bf16["merge_masters"] == bf16["host_merge_masters"] == 0
    assert bf16["optimizer_state"] == 2 * bf16["grads"]  # fp32 grads, two fp32 moments
    z3 = mm.per_rank_bytes(shape, 8, 3, phase, compute="fp32")
    assert bf16["params"] == z3["params"] and bf16["grads"] == z3["grads"]  # fp32 shards like ZeRO-3's
    b64 = mm.per_rank_bytes(shape, 64, "fsdp2", phase)["total"]
    assert bf16["total"] / b64 == pytest.approx(8.0, rel=0.01)
    # host merge masters and bf16 merges change nothing: there are none to move or drop
    assert mm.per_rank_bytes(shape, 8, "fsdp2", phase, master_device="cpu", merge_precision="bf16") == bf16


def test_fsdp2_relora_ratio_beside_zero():
    """350m, r=128, 8 ranks: under bf16 FSDP2's ReLoRA phase is the leanest of the three (no
    merge masters, frozen fp32 shards 1/world) over the same 16 B/param full-rank phase as ZeRO-3;
    under fp32 ZeRO-3's full-rank phase carries a 4 B fp32 master copy more, so its ratio is lower."""
    shape = mm.Shape.of("350m")
    bf16 = mm.zero2_options(shape, 8, compute="bf16", r=128)
    assert bf16["fsdp2"] == pytest.approx(0.5462, abs=1e-4)
    assert bf16["fsdp2"] < bf16["zero3"] < bf16["sharded"]
    full = {e: mm.per_rank_bytes(shape, 8, e, "full_rank", compute="bf16")["total"] for e in (3, "fsdp2")}
    assert full[3] == full["fsdp2"]
    fp32 = mm.zero2_options(shape, 8, compute="fp32", r=128)
    assert fp32["zero3"] < fp32["fsdp2"] == pytest.approx(bf16["fsdp2"])


def test_cli_table_has_fsdp2_rows_and_column(capsys):
    assert report.main(["--compute", "bf16", "--presets", "350m", "--worlds", "8"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("| 350m | 368.0 |") and "| 8 | fsdp2 |" in ln)
    assert row.endswith("| 0.00 | 0.546 | 0.546 |"), row  # no merge masters
    options = next(ln for ln in out.splitlines() if ln.startswith("| 350m | 8 | "))
    assert options.endswith("| 0.649 (target <= 0.65) | 0.546 |"), options
    assert report.main(["--compute", "bf16", "--presets", "tiny", "--detail", "350m", "8", "fsdp2"]) == 0
    assert "350m, 8 ranks, FSDP2, bf16" in capsys.readouterr().out


def test_validate_reads_an_fsdp2_stage():
    shape = mm.Shape.of("tiny", vocab=8000)
    model = {"hidden_size": shape.hidden, "intermediate_size": shape.intermediate, "num_layers": shape.layers,
             "vocab_size": 8000, "r": 32, "precision": "fp32"}
    measured = {ph: mm.per_rank_bytes(shape, 2, "fsdp2", "warm_start" if ph == "full_rank" else ph,
                                      compute="fp32", r=32) for ph in ("full_rank", "relora")}
    bench = {"config": {"world_size": 2, "preset": "tiny", "train_extra": True, "zero2_merge_masters": "sharded"},
             "stages": {"fsdp2": {"model": model, "state_bytes_per_rank": measured, "relora_stage": "fsdp2"}}}
    rows = report.validate(bench)
    assert [(r["stage"], abs(r["error_pct"])) for r in rows] == [("fsdp2", 0.0), ("fsdp2", 0.0)]
    # A ZeRO-3 prediction would be off: under fp32 it keeps a separate fp32 master (20 B vs 16 B
    # per trainable param in the full-rank phase).
    bench["stages"] = {"3": bench["stages"]["fsdp2"]}
    assert report.validate(bench)[0]["error_pct"] > 20


def test_fsdp2_measured_bytes_equal_the_model_by_category():
    """tools/bench.py's FSDP2 stage (20m, fp32, world 2): every category as predicted, and the
    measured ReLoRA-phase ratio where the model puts it for fp32: between ZeRO-3's (whose full-rank
    phase carries an extra fp32 master copy) and ZeRO-2's (replicated params)."""
    bench = json.loads((REPO / "benchmarks" / "bench_20m_fsdp2.json").read_text())
    rows = [r for r in report.validate(bench) if r["stage"] == "fsdp2"]
    assert len(rows) == 3
    for row in rows:
        for cat, (pred, meas) in row["by_category"].items():
            assert pred == pytest.approx(meas, rel=1e-4, abs=64), (row["phase"], cat)
        assert row["by_category"]["fp32_master"] == (0.0, 0)
    ratios = {k: s["state_bytes_ratio"] for k, s in bench["stages"].items()}
    assert ratios["3"] < ratios["fsdp2"] < ratios["2"]
    shape = mm.Shape(512, 1376, 4, 8000)
    assert mm.ratio(shape, 2, "fsdp2", baseline="warm_start", compute="fp32", r=32) == pytest.approx(
        ratios["fsdp2"], abs=1e-4)
