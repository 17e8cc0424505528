"""Bad quantization settings: one-line errors before any process group."""

import pytest

from relora_dist.config import ConfigError, load_config
from relora_dist.backends.ds_config import build_ds_config
from relora_dist.validation import validate


def _cfg(*overrides):
    return load_config(None, list(overrides))


@pytest.mark.parametrize("overrides,needle", [
    (["--relora.base_quant=nf4", "--relora.merge_precision=bf16"], "no fp32 master"),
    (["--relora.base_quant=fp4"], "relora.base_quant 'fp4' unknown"),
    (["--relora.quant_merge=dequant"], "relora.quant_merge"),
])
def test_bad_quant_values(overrides, needle):
    with pytest.raises(ConfigError) as e:
        validate(_cfg(*overrides))
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,stage,needle", [
    (["--optimizer.name=adamw8bit"], 3, "adamw8bit under ZeRO-3"),
    (["--optimizer.name=adamw8bit", "--relora.phase_stage=3"], 2, "adamw8bit under ZeRO-3"),
])
def test_adamw8bit_refused_under_zero3(overrides, stage, needle):
    template = {"zero_optimization": {"stage": stage}}
    with pytest.raises(ConfigError) as e:
        build_ds_config(template, _cfg(*overrides), 2)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_nf4_zero2_and_adamw8bit_validate():
    cfg = _cfg("--relora.base_quant=nf4", "--optimizer.name=adamw8bit")
    validate(cfg)
    build_ds_config({"zero_optimization": {"stage": 2}}, cfg, 2)


def test_quantized_base_builds_under_zero3():
    for stage, extra in ((3, ()), (2, ("--relora.phase_stage=3",))):
        build_ds_config({"zero_optimization": {"stage": stage}}, _cfg("--relora.base_quant=nf4", *extra), 2)


@pytest.mark.parametrize("shape", [(172, 64), (64, 172), (2736, 1024)])
def test_nf4_double_quant_bytes_and_error(shape):
    """relora.quant_double_quant: the held bytes equal the memory model's formula, are fewer than
    single quantization's (uint8 instead of fp32 absmax per 64 elements), the error stays within 1%
    of it, and the result is deterministic (every rank must quantize to the same bytes)."""
    import torch

    from relora_dist.relora.quant import QuantizedWeight, quantized_nbytes

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    single, double = (QuantizedWeight.quantize(w, "nf4", dq) for dq in (False, True))
    for q, dq in ((single, False), (double, True)):
        assert q.nbytes() == quantized_nbytes("nf4", *shape, dq)
        assert q.equal(QuantizedWeight.quantize(w.clone(), "nf4", dq))
    assert not double.equal(single)
    if w.numel() >= 65536:  # below ~22k elements the nested state's 1 KB map outweighs 3 bytes saved per 64
        assert double.nbytes() < 0.92 * single.nbytes()
    err = [float((q.dequantize() - w).norm() / w.norm()) for q in (single, double)]
    assert err[0] <= err[1] <= err[0] * 1.01
