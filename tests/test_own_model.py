"""Continued pretraining of a user's own Hugging Face model (model.init_from): tied embeddings, the
tested LLaMA-layout model types, checkpoints, resume and the export transformers loads back."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_utils import REPO, run_world, tiny_overrides

pytestmark = pytest.mark.spawn  # every test here starts processes (conftest.py checks it)

VOCAB = 8000  # the bundled tokenizer's
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
# warm start 4 steps, then resets after steps 9 and 13
RELORA = {"relora.enabled": True, "relora.warm_start_steps": 4, "relora.cycle_length": 4,
          "relora.first_warmup": 1, "relora.restart_warmup": 1, "relora.r": 8, "train.max_steps": 16}


def make_model(folder: Path, model_type: str, tokenizer: str | Path | None = "bundled", **kw) -> Path:
    """A tiny random model of `model_type` saved with save_pretrained (safetensors), with the files of
    `tokenizer` beside it (the bundled one by default) as a model folder holds its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from relora_dist.data import DEFAULT_TOKENIZER
    from relora_dist.data.tokenizer import tokenizer_files

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**SMALL, **kw})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer = DEFAULT_TOKENIZER if tokenizer == "bundled" else tokenizer
    for name in tokenizer_files(tokenizer) if tokenizer else []:
        shutil.copy2(Path(tokenizer) / name, folder / name)
    return folder


def convert(ckpt: Path, out: Path) -> Path:
    proc = subprocess.run([sys.executable, str(REPO / "tools/convert_ckpt.py"), str(ckpt), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def hf_logits(folder: Path, batch: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=batch).logits.float()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_tied_embeddings_two_ranks_resume_export(tiny_data, tmp_path):
    """A tied LLaMA (GQA) at 2 ranks under ZeRO-2: warm start, switch, 2 resets, stopped after
    step 11 and resumed; the embedding is one trainable tensor in the ReLoRA phase (no adapter on
    lm_head), the resumed run repeats the uninterrupted one exactly, and the export is tied and
    computes the final state's logits."""
    src = make_model(tmp_path / "tied", "llama", num_key_value_heads=2, tie_word_embeddings=True)
    full = tiny_overrides(tiny_data, tmp_path / "full", **RELORA, **{"model.init_from": src,
                                                                      "run.export_warm_start": True})
    part = tiny_overrides(tiny_data, tmp_path / "part", **RELORA, **{"model.init_from": src})
    a = run_world(2, "relora_runs", [], tmp_path / "a", runs=[full])
    run_world(2, "relora_runs", [], tmp_path / "b1", runs=[part], stop_at=11)
    b = run_world(2, "relora_runs", [], tmp_path / "b2", runs=[part])
    ra, rb = a[0][0], b[0][0]
    assert ra["phase"] == "relora" and ra["restart_index"] == 2 and ra["tied_one_param"]
    assert "model.embed_tokens.weight" in ra["trainable"] and "lm_head.weight" not in ra["trainable"]
    assert not any("lm_head" in n for n in ra["wrapped"])
    assert torch.equal(ra["losses"][11:], rb["losses"])  # the resumed segment: steps 12..16
    assert torch.equal(a[0][0]["logits"], a[1][0]["logits"])
    for name, run in (("full", ra), ("part", rb)):
        out = convert(tmp_path / name / "checkpoints", tmp_path / f"hf_{name}")
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
        w = weights(out)
        assert "lm_head.weight" not in w or torch.equal(w["lm_head.weight"], w["model.embed_tokens.weight"])
        diff = float((hf_logits(out, run["logits_batch"]) - run["logits"]).abs().max())
        print(f"tied llama, 2 ranks ZeRO-2, {name}: max |logits(export) - logits(run)| = {diff:.3g}")
        assert diff <= 1e-5
    assert json.loads((tmp_path / "full/warm_start/config.json").read_text())["tie_word_embeddings"] is True
    assert not torch.equal(weights(tmp_path / "hf_full")["model.embed_tokens.weight"],
                           weights(src)["model.embed_tokens.weight"])


# model_type -> config keywords: MHA and GQA, tied and untied, qwen2's q/k/v biases
# Mistral's layout is LLaMA's with GQA, which test_gqa_two_ranks_export runs at 2 ranks through
# export: here the two ends (untied MHA llama; tied qwen2 with q/k/v biases) are also stopped and resumed.
ARCHS = {"llama": dict(num_key_value_heads=4), "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=True)}


def test_model_types_train_and_export(tiny_data, tmp_path):
    """LLaMA and Qwen2 in one process group: init_from, warm start, ReLoRA with 2 resets (also
    stopped between them and resumed: the same losses), relora-convert; transformers loads the
    export, its logits equal the run's final forward, and
    its weights moved away from the input's."""
    runs, srcs = [], {}
    for arch, kw in ARCHS.items():
        srcs[arch] = make_model(tmp_path / f"src_{arch}", arch, **kw)
        runs.append(tiny_overrides(tiny_data, tmp_path / arch, **RELORA, **{"model.init_from": srcs[arch]}))
    res = run_world(1, "relora_runs", [], tmp_path / "res", runs=runs)[0]
    # the same runs stopped after step 11 (between the resets) and resumed
    parts = [tiny_overrides(tiny_data, tmp_path / f"part_{arch}", **RELORA, **{"model.init_from": srcs[arch]})
             for arch in ARCHS]
    run_world(1, "relora_runs", [], tmp_path / "res1", runs=parts, stop_at=11)
    resumed = run_world(1, "relora_runs", [], tmp_path / "res2", runs=parts)[0]
    for i, (arch, kw) in enumerate(ARCHS.items()):
        r = res[i]
        assert r["phase"] == "relora" and r["restart_index"] == 2, arch
        assert len(r["wrapped"]) == 2 * 7, (arch, r["wrapped"])  # q k v o gate up down per layer
        assert not any(n.endswith(".bias") for n in r["trainable"]), arch  # biases stay in the frozen base
        assert torch.equal(r["losses"][11:], resumed[i]["losses"]), arch
        assert torch.equal(r["logits"], resumed[i]["logits"]), arch
        out = convert(tmp_path / arch / "checkpoints", tmp_path / f"hf_{arch}")
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == arch and config["tie_word_embeddings"] is kw.get("tie_word_embeddings", False)
        diff = float((hf_logits(out, r["logits_batch"]) - r["logits"]).abs().max())
        print(f"{arch}: max |logits(export) - logits(run)| = {diff:.3g}")
        assert diff <= 1e-5, arch
        before, after = weights(srcs[arch]), weights(out)
        assert set(after) == set(before), arch
        assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"],
                               before["model.layers.0.self_attn.q_proj.weight"]), arch
        if arch == "qwen2":
            assert "model.layers.0.self_attn.q_proj.bias" in after


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_tied_embeddings_two_ranks_other_engines(backend, tiny_data, tmp_path):
    """The tied LLaMA at 2 ranks under ZeRO-3 (the embedding partitioned once) and FSDP2: 2 resets,
    relora-convert, transformers' logits equal the run's."""
    from tests.dist_utils import engine

    ds_config, extra = engine(backend)
    src = make_model(tmp_path / "tied", "llama", num_key_value_heads=2, tie_word_embeddings=True)
    run = tiny_overrides(tiny_data, tmp_path / "run", **RELORA, **extra, **{"model.init_from": src})
    res = run_world(2, "relora_runs", [], tmp_path / "res", ds_config=ds_config, runs=[run])
    r = res[0][0]
    assert r["restart_index"] == 2 and r["tied_one_param"] and "model.embed_tokens.weight" in r["trainable"]
    out = convert(tmp_path / "run" / "checkpoints", tmp_path / "hf")
    diff = float((hf_logits(out, r["logits_batch"]) - r["logits"]).abs().max())
    print(f"tied llama, 2 ranks {backend}: max |logits(export) - logits(run)| = {diff:.3g}")
    assert diff <= 1e-5


# warm start 2 steps, then 3 cycles of 3 (resets after steps 5 and 8): the shortest run with 2 resets
SHORT = {**RELORA, "relora.warm_start_steps": 2, "relora.cycle_length": 3, "train.max_steps": 11}
# (model_type, config keywords, engine): grouped-query attention (4 query heads, 2 k/v heads: k/v
# projections 64 -> 32) under a sharded merge; one untied under ZeRO-2, one tied with q/k/v biases
# under FSDP2 (rows sharded per rank, biases included)
GQA = {"mistral": (dict(num_key_value_heads=2), "zero2"),
       "qwen2": (dict(num_key_value_heads=2, tie_word_embeddings=True), "fsdp2")}


@pytest.mark.parametrize("arch", list(GQA))
def test_gqa_two_ranks_export(arch, tiny_data, tmp_path):
    """Mistral and Qwen2 with GQA at 2 ranks: init_from, warm start, ReLoRA with 2 resets,
    relora-convert; transformers loads the export with the input's shapes, its logits equal the
    run's final forward, and its weights (k/v projections and biases included) moved."""
    from tests.dist_utils import engine

    kw, backend = GQA[arch]
    ds_config, extra = engine(backend)
    src = make_model(tmp_path / "src", arch, **kw)
    run = tiny_overrides(tiny_data, tmp_path / "run", **SHORT, **extra, **{"model.init_from": src})
    r = run_world(2, "relora_runs", [], tmp_path / "res", ds_config=ds_config, runs=[run])[0][0]
    assert r["phase"] == "relora" and r["restart_index"] == 2
    assert len(r["wrapped"]) == 2 * 7 and not any(n.endswith(".bias") for n in r["trainable"])
    out = convert(tmp_path / "run" / "checkpoints", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is kw.get("tie_word_embeddings", False)
    diff = float((hf_logits(out, r["logits_batch"]) - r["logits"]).abs().max())
    print(f"{arch} GQA, 2 ranks {backend}: max |logits(export) - logits(run)| = {diff:.3g}")
    assert diff <= 1e-5
    before, after = weights(src), weights(out)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert after["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    moved = [k for k in before if not torch.equal(after[k], before[k])]
    for name in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.1.self_attn.{name}.weight" in moved
        if arch == "qwen2":  # trained in the warm start, frozen (and exported as they are) afterwards
            assert f"model.layers.1.self_attn.{name}.bias" in moved
