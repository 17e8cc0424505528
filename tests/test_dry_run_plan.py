"""`launchers/pretrain.py --dry_run` prints the memory model's per-rank plan of the run's phases at
its WORLD_SIZE, ZeRO stage and precision. In-process (cli.main), so each case costs only validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from relora_dist import cli
from relora_dist.memory import model as mm
from relora_dist.data import DEFAULT_TOKENIZER
from relora_dist.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
BIG = ["--model.preset=350m", "--relora.r=128", "--train.precision=bf16",  # bf16 is accepted on CPU
       "--train.global_batch_size=512", "--train.micro_batch_size=8"]


@pytest.fixture
def dry_run(tmp_path, monkeypatch, capsys):
    def run(world: int, *args: str, rank: str = "0", ds_config: str = "zero2") -> list[str]:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", rank)
        assert cli.main(["--dry_run", "--ds_config", ds_config, *args, f"--run.output_dir={tmp_path / 'run'}"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert not (tmp_path / "run").exists()
        return out
    return run


def _vocab() -> int:
    return load_tokenizer(DEFAULT_TOKENIZER).vocab_size


def test_350m_zero2_bf16_at_64_ranks_warns_and_suggests_phase_stage_3(dry_run):
    # Without a warm start the reference is plain full-rank training: at 64 ranks ZeRO-2's
    # replicated bf16 weights and adapters outweigh the (already 1/64) optimizer state it frees.
    out = dry_run(64, *BIG, "--relora.warm_start_steps=0")
    assert out[0].startswith("ok: world size 64")
    plan, warning, hint = out[1:]
    shape = mm.Shape.of("350m", _vocab())
    full = mm.per_rank_bytes(shape, 64, 2, "full_rank", compute="bf16", r=128)["total"]
    rel = mm.per_rank_bytes(shape, 64, 2, "relora", compute="bf16", r=128)["total"]
    z3 = mm.per_rank_bytes(shape, 64, 3, "relora", compute="bf16", r=128)["total"]
    assert f"64 ranks, ZeRO-2, bf16, hidden 1024, 24 layers, vocab {_vocab()}, r=128" in plan
    assert f"full-rank training (not run: warm_start_steps=0) {mm.fmt_bytes(full)}" in plan
    assert f"ReLoRA phase {mm.fmt_bytes(rel)}" in plan and rel > full
    assert warning.startswith(f"warning: the ReLoRA phase needs {rel / full:.2f}x the memory of full-rank training")
    assert hint.startswith(f"hint: --relora.phase_stage=3 would hold {mm.fmt_bytes(z3)} per rank")


def test_350m_zero2_bf16_at_2_ranks_does_not_warn(dry_run):
    out = dry_run(2, *BIG)
    assert len(out) == 3 and not any(ln.startswith("warning:") for ln in out)
    shape = mm.Shape.of("350m", _vocab())
    warm = mm.per_rank_bytes(shape, 2, 2, "warm_start", compute="bf16", r=128)["total"]
    assert f"full-rank warm start {mm.fmt_bytes(warm)}, ReLoRA phase " in out[1]
    assert out[2].startswith("hint: --relora.phase_stage=3")


def test_phase_stage_3_and_host_masters_are_planned(dry_run):
    out = dry_run(64, *BIG, "--relora.phase_stage=3", "--relora.merge_master_device=cpu")
    assert len(out) == 2  # ZeRO-3 ReLoRA phase: nothing to warn about or suggest
    shape = mm.Shape.of("350m", _vocab())
    rel = mm.per_rank_bytes(shape, 64, 3, "relora", compute="bf16", r=128, master_device="cpu")
    assert (f"ReLoRA phase (ZeRO-3) {mm.fmt_bytes(rel['total'])} + {mm.fmt_bytes(rel['host_merge_masters'])} "
            f"fp32 merge masters in host memory") in out[1]


def test_fsdp2_is_planned_as_fsdp2(dry_run):
    """parallel.backend=fsdp2: fp32 row shards of every param (they are the merge masters), sharded
    grads and moments; no ZeRO-2 hint."""
    out = dry_run(8, *BIG, "--parallel.backend=fsdp2")
    shape = mm.Shape.of("350m", _vocab())
    warm = mm.per_rank_bytes(shape, 8, "fsdp2", "warm_start", compute="bf16", r=128)["total"]
    rel = mm.per_rank_bytes(shape, 8, "fsdp2", "relora", compute="bf16", r=128)["total"]
    assert len(out) == 2 and "8 ranks, FSDP2, bf16" in out[1]
    assert f"full-rank warm start {mm.fmt_bytes(warm)}, ReLoRA phase {mm.fmt_bytes(rel)}" in out[1] and rel < warm


def test_zero3_template_full_rank_only_and_other_ranks(dry_run):
    out = dry_run(8, *BIG, "--ds_config", str(REPO / "ds_configs" / "zero3.json"))
    assert len(out) == 2 and "8 ranks, ZeRO-3, bf16" in out[1]
    full = dry_run(8, *BIG, "--relora.enabled=false")
    assert len(full) == 2 and "ReLoRA" not in full[1] and "full-rank " in full[1]
    offload = dry_run(8, *BIG, "--ds_config", str(REPO / "ds_configs" / "zero3_offload.json"))
    assert offload[-1].startswith("note: ZeRO offload is not modelled")
    assert dry_run(8, *BIG, rank="1") == []  # only rank 0 prints


def test_auto_precision_and_targets_reach_the_plan(dry_run):
    import torch

    out = dry_run(1, "--relora.targets=self_attn\\.q_proj$")
    precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    assert f"1 rank, ZeRO-2, {precision}, hidden 128, 2 layers" in out[1]
    shape = mm.Shape(128, 344, 2, _vocab(), (r"self_attn\.q_proj$",))
    rel = mm.per_rank_bytes(shape, 1, 2, "relora", compute=precision, r=32)["total"]
    assert f"ReLoRA phase {mm.fmt_bytes(rel)}" in out[1]


@pytest.mark.parametrize("name,tokens", [("60m", 1.23e9), ("130m", 2.62e9), ("350m", 6.88e9)])
def test_paper_recipes_validate_at_8_ranks_with_the_stated_tokens(dry_run, name, tokens):
    # The recipes name C4 data prepared elsewhere; validate everything else with the bundled data.
    cfg = REPO / "configs" / f"{name}_paper.yaml"
    out = dry_run(8, "--config", str(cfg), "--data.prepared_dir=", "--data.tokenizer_dir=")
    assert out[0].startswith("ok: world size 8"), out
    from relora_dist.config import load_config

    c = load_config(str(cfg))
    assert c.relora.r == 128 and c.relora.prune_ratio == 0.99 and c.relora.optimizer_reset == "magnitude"
    assert c.data.prepared_dir == "data/c4-512" and c.data.seq_len == 512
    assert c.train.max_steps * c.train.global_batch_size * c.data.seq_len == pytest.approx(tokens, rel=0.005)
    assert (c.train.max_steps - c.relora.warm_start_steps) % c.relora.cycle_length == 0


@pytest.mark.parametrize("world, warns", [(2, False), (8, True)])
def test_quantized_base_under_zero3_is_planned_and_warned_where_it_costs_memory(dry_run, world, warns):
    """ZeRO-3 with an NF4 base: every rank holds the whole quantized base (0.52 bytes per weight)
    where ZeRO-3 keeps 2/world bytes of bf16 shards: less memory at 2 ranks, more at 8."""
    from relora_dist.memory.quant import relora_quant_bytes

    out = dry_run(world, *BIG, "--relora.base_quant=nf4", ds_config="zero3")
    shape = mm.Shape.of("350m", _vocab())
    q = relora_quant_bytes(shape, world, "nf4", compute="bf16", r=128, stage=3)
    plain = mm.per_rank_bytes(shape, world, 3, "relora", compute="bf16", r=128)
    line = next(ln for ln in out if ln.startswith("with relora.base_quant=nf4: "))
    assert f"ReLoRA phase {mm.fmt_bytes(q['total'])} per rank" in line
    assert (q["total"] > plain["total"]) == warns
    assert any(ln.startswith("warning: relora.base_quant=nf4 holds more per rank") for ln in out) == warns


def test_init_from_gqa_model_is_planned_with_its_own_shapes(dry_run, tmp_path):
    """An init_from Qwen2 (tied, GQA, q/k/v biases): the plan counts its config.json's shapes, not
    square k/v projections and an lm_head of its own."""
    from transformers import AutoConfig

    from tests.test_own_model import make_model

    src = make_model(tmp_path / "qwen2", "qwen2", num_key_value_heads=2, tie_word_embeddings=True)
    out = dry_run(2, f"--init_from={src}", "--relora.r=8", "--train.precision=fp32")
    shape = mm.Shape.of_config(AutoConfig.from_pretrained(src))
    assert (shape.q_dim, shape.kv_dim, shape.tied, shape.bias) == (64, 32, True, ("q_proj", "k_proj", "v_proj"))
    assert f"2 ranks, ZeRO-2, fp32, hidden 64, k/v 32, 2 layers, vocab {_vocab()}, tied, r=8" in out[1]
    warm = mm.per_rank_bytes(shape, 2, 2, "warm_start", compute="fp32", r=8)["total"]
    square = mm.per_rank_bytes(mm.Shape(64, 172, 2, _vocab()), 2, 2, "warm_start", compute="fp32", r=8)["total"]
    assert f"full-rank warm start {mm.fmt_bytes(warm)}, " in out[1] and warm < square


def test_passes_over_the_prepared_data(dry_run, tiny_data):
    """train.max_steps x global batch x seq_len against the prepared train split: said, and warned
    about past one pass; nothing while the first-use cache does not hold the data yet."""
    from relora_dist.data import read_meta

    have = read_meta(tiny_data)["num_blocks"]["train"] * 32
    small = ["--relora.enabled=false", "--data.seq_len=32", "--train.global_batch_size=8", "--train.micro_batch_size=8"]
    steps = have // (8 * 32) // 2  # half a pass
    out = dry_run(1, *small, f"--data.prepared_dir={tiny_data}", f"--train.max_steps={steps}")
    assert out[-1] == (f"{steps * 8 * 32 / have:.3g} passes over the training data ({have / 1e6:.3g} M tokens in "
                       f"{tiny_data}): train.max_steps={steps} x global batch 8 x seq_len 32 = "
                       f"{steps * 8 * 32 / 1e6:.3g} M tokens")
    out = dry_run(1, *small, f"--data.cache_dir={Path(tiny_data).parent}", f"--train.max_steps={6 * steps}")
    assert out[-2].startswith(f"{6 * steps * 8 * 32 / have:.3g} passes over the training data") and str(tiny_data) in out[-2]
    assert out[-1].startswith("warning: the run repeats its training data 3 times") and f"max_steps to {have // (8 * 32)} " in out[-1]
    out = dry_run(1, *small, f"--data.cache_dir={Path(tiny_data).parent / 'empty'}")
    assert not any("passes over" in line for line in out)
