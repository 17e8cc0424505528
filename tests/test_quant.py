"""Quantized frozen base (relora.base_quant): 2 real ranks against a single-process reference."""

import pytest
import torch

from relora_dist.relora.quant import QuantizedWeight
from relora_dist.relora.layer import lora_delta
from tests.dist_utils import run_world, tiny_overrides

pytestmark = pytest.mark.spawn  # every test here starts processes (conftest.py checks it)

# hidden 64 / intermediate 128: every wrapped weight is a whole number of NF4 blocks of 64.
QUANT = {"relora.enabled": True, "relora.warm_start_steps": 2, "relora.cycle_length": 3,
         "relora.first_warmup": 0, "relora.restart_warmup": 1, "relora.r": 8, "relora.alpha": 16,
         "train.max_steps": 11, "model.intermediate_size": 128}
RESETS = 10


# (kind, engine): ZeRO-2 holds the quantized replica beside replicated weights; under ZeRO-3 it
# replaces the frozen weights' bf16 shards (the masters keep ZeRO-3's partition).
@pytest.fixture(scope="module", params=["nf4", "int8", "nf4-zero3"])
def quant(request, tiny_data, tmp_path_factory):
    kind, _, stage = request.param.partition("-")
    out = tmp_path_factory.mktemp(f"quant-{request.param}")
    overrides = tiny_overrides(tiny_data, out / "run", **QUANT, **{"relora.base_quant": kind,
                                                                   "train.precision": "bf16"})
    return run_world(2, "quant_checks", overrides, out, resets=RESETS, ds_config=f"ds_configs/{stage or 'zero2'}.json")


def test_quantized_base_is_no_parameter_and_holds_no_optimizer_state(quant):
    for r in quant:
        assert not any(n.endswith("_proj.weight") for n in r["param_names"])
        assert not any(n.endswith("_proj.weight") for n in r["state_dict_keys"])
        # the partitions hold 1/2 of the trainable params (+ alignment padding), no frozen W
        assert 0 <= 2 * r["optimizer_numel"] - r["trainable_numel"] <= 64
        assert r["wrapped_numel"] > 0


def test_every_rank_holds_the_same_quantized_bytes(quant):
    r0, r1 = quant
    for name in r0["codes_switch"]:
        for key in ("codes_switch", "codes_master"):
            assert all(torch.equal(a, b) for a, b in zip(r0[key][name], r1[key][name]))


def test_switch_quantizes_the_fp32_master(quant):
    """Single-process reference: bitsandbytes here on the gathered W_switch gives the same bytes."""
    r0 = quant[0]
    for name, w0 in r0["w0"].items():
        ref = QuantizedWeight.quantize(w0.view(-1).view(*_shape(r0, name)), r0["kind"])
        data, scales = r0["codes_switch"][name]
        assert torch.equal(ref.data, data)


def test_forward_uses_dequantized_base_and_training_moves(quant):
    for r in quant:
        assert r["forward_maxdiff"] < 1e-2  # bf16 compute: ~3 significant digits
        assert torch.isfinite(r["losses"]).all()


def test_master_path_has_zero_drift_after_ten_resets(quant):
    """quantize(master_k) bitwise, every k; master_k against an fp32 single-process replay."""
    r0 = quant[0]
    for name, d in r0["drift_master"].items():
        assert d.shape[0] == RESETS
        assert float(d[:, 0].max()) == 0.0, f"{name}: codes differ from quantize(master)"
        # single-process replay of the 10 merges (same fp32 adds of fp32-rounded deltas)
        w = r0["start"][name].view(*_shape(r0, name)).clone()
        for A, B in r0["adapters"][name]:
            w += lora_delta(A, B, r0["scale"][name])
        ref = QuantizedWeight.quantize(w, r0["kind"])
        assert torch.equal(ref.data, r0["codes_master"][name][0])


def test_reference_path_drifts_and_grows(quant):
    r0 = quant[0]
    grew = 0
    for name, d in r0["drift_reference"].items():
        assert float(d[-1, 0]) > 0, f"{name}: the reference merge should leave codes off quantize(master)"
        assert float(d[-1, 1]) > float(r0["drift_master"][name][-1, 1])
        grew += float(d[-1, 1]) > float(d[0, 1])
    assert grew >= len(r0["drift_reference"]) // 2


def _shape(r, name):
    A, B = r["adapters"][name][0]
    return B.shape[0], A.shape[1]
