"""A quantized-base run's checkpoint: fp32 masters only, full-precision and bitsandbytes exports,
and resume without quantization."""

import pytest
import torch

from relora_dist.checkpoint.format import ShardReader, find_latest
from relora_dist.tools.convert_ckpt import convert
from tests.dist_utils import run_world, tiny_overrides

pytestmark = pytest.mark.spawn  # every test here starts processes (conftest.py checks it)

RUN = {"relora.enabled": True, "relora.warm_start_steps": 2, "relora.cycle_length": 3, "relora.first_warmup": 0,
       "relora.restart_warmup": 1, "relora.r": 8, "relora.alpha": 16, "train.max_steps": 8,
       "model.intermediate_size": 128, "relora.base_quant": "nf4"}


@pytest.fixture(scope="module")
def quant_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("qexport")
    result = run_world(1, "relora_run", tiny_overrides(tiny_data, out / "run", **RUN), out / "r1")[0]
    return out, result


def test_checkpoint_holds_fp32_masters_not_quantized_bytes(quant_run):
    out, result = quant_run
    reader = ShardReader(find_latest(out / "run" / "checkpoints"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert reader.has(name, "merge_master") and not reader.has(name, "weight")
    assert reader.full(name, "merge_master").dtype == torch.float32
    assert result["restart_index"] == 1


def test_full_precision_export_is_the_merged_master(quant_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out, result = quant_run
    folder = convert(out / "run" / "checkpoints", tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(folder)
    sd = model.state_dict()
    for name, value in result["state_dict"].items():
        assert torch.equal(sd[name].float(), value.float()), name


@pytest.mark.parametrize("kind,layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_export_loads_with_its_config(quant_run, tmp_path, kind, layer):
    """Logits of the reloaded bitsandbytes model within 25% (nf4) / 3% (int8) of the fp32 model's
    max |logit| (measured 16% / 1.1% on a randomly initialised 64-wide LLaMA); a wrong weight
    layout gives errors of the order of the logits themselves."""
    from transformers import AutoModelForCausalLM

    out, result = quant_run
    folder = convert(out / "run" / "checkpoints", tmp_path / kind, quantize=kind)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.quantization_config["quant_method"] == "bitsandbytes" if isinstance(
        model.config.quantization_config, dict) else model.config.quantization_config.quant_method.value == "bitsandbytes"
    assert type(model.model.layers[0].mlp.down_proj).__name__ == layer
    with torch.no_grad():
        logits = model(input_ids=result["logits_batch"]).logits.float()
    full = AutoModelForCausalLM.from_pretrained(convert(out / "run" / "checkpoints", tmp_path / "fp32"))
    with torch.no_grad():
        ref = full(input_ids=result["logits_batch"]).logits.float()
    tol = {"nf4": 0.25, "int8": 0.03}[kind]
    assert float((logits - ref).abs().max()) <= tol * float(ref.abs().max())


def test_resume_without_quantization_uses_the_masters(quant_run, tiny_data):
    out, _ = quant_run
    reader = ShardReader(find_latest(out / "run" / "checkpoints"))
    overrides = tiny_overrides(tiny_data, out / "run", **{**RUN, "relora.base_quant": "none"})
    loaded = run_world(1, "loaded_masters", overrides, out / "r2")[0]
    for name, w in loaded["weights"].items():  # fp32 compute: the weights are the checkpoint's masters
        assert torch.equal(w, reader.full(f"{name}.weight", "merge_master").reshape(-1)), name


def test_zero3_quantized_run_checkpoints_masters_that_resume_elsewhere(tiny_data, tmp_path):
    """ZeRO-3 at 2 ranks with an NF4 base: each rank saves its partition of the fp32 masters (no
    quantized bytes, no weight); resumed unquantized on one ZeRO-2 rank, the weights are those masters."""
    run_world(2, "relora_run", tiny_overrides(tiny_data, tmp_path / "run", **RUN), tmp_path / "r1",
              ds_config="ds_configs/zero3.json")
    reader = ShardReader(find_latest(tmp_path / "run" / "checkpoints"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert reader.has(name, "merge_master") and not reader.has(name, "weight")
    overrides = tiny_overrides(tiny_data, tmp_path / "run", **{**RUN, "relora.base_quant": "none"})
    loaded = run_world(1, "loaded_masters", overrides, tmp_path / "r2")[0]
    for name, w in loaded["weights"].items():
        assert torch.equal(w, reader.full(f"{name}.weight", "merge_master").reshape(-1)), name
