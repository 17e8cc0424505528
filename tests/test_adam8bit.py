"""optimizer.name=adamw8bit (bitsandbytes AdamW8bit) under ZeRO-2 and FSDP2 on 2 real ranks: the
ReLoRA optimizer reset on the blockwise 8-bit state against a single-process reference, and resume."""

import pytest
import torch

from relora_dist.relora.layer import prune_mask
from tests.dist_utils import engine, run_world, tiny_overrides

pytestmark = pytest.mark.spawn  # every test here starts processes (conftest.py checks it)

# r=32 so the adapters' flat partition (> 4,096 elements per rank) gets 8-bit state.
ADAM8 = {"relora.enabled": True, "relora.warm_start_steps": 3, "relora.cycle_length": 3,
         "relora.first_warmup": 0, "relora.restart_warmup": 1, "relora.r": 32, "relora.alpha": 32,
         "train.max_steps": 12, "optimizer.name": "adamw8bit", "relora.prune_ratio": 0.9,
         "relora.carry_optimizer_state": "auto", "relora.base_quant": "nf4", "model.intermediate_size": 128}


# ZeRO-2 steps one flat partition per param group (blocks span params); FSDP2 steps each param's
# local row shard (backends/fsdp2_8bit.py). FSDP2 refuses a quantized base, so it trains a plain one.
@pytest.fixture(scope="module", params=["zero2", "fsdp2"])
def adam8(request, tiny_data, tmp_path_factory):
    ds_config, selects = engine(request.param)
    extra = {"relora.base_quant": "none"} if request.param == "fsdp2" else {}
    out = tmp_path_factory.mktemp(f"adam8-{request.param}")
    return run_world(2, "adam8_checks", tiny_overrides(tiny_data, out / "run", **{**ADAM8, **extra, **selects}), out,
                     ds_config=ds_config)


def _full(results, key, name, moment, numel):
    full = torch.full((numel,), float("nan"))
    for r in results:
        start, frag = r[key][name][moment]
        full[start:start + frag.numel()] = frag
    assert not torch.isnan(full).any()
    return full


def test_adamw8bit_trains_in_both_phases(adam8):
    for r in adam8:
        assert r["optimizer"] == "AdamW8bit"
        assert "torch.uint8" in r["state_dtypes"]
        assert torch.isfinite(r["losses"]).all() and r["losses"][-1] < r["losses"][0]
        assert r["listed_optimizer_bytes"] == r["inner_state_bytes"] > 0


def test_magnitude_reset_on_8bit_state_matches_full_tensor_reference(adam8):
    """Decisions over the whole dequantized tensor (both ranks' fragments), pruned entries exactly
    0, kept entries bit-identical; exp_avg also pruned where exp_avg_sq is."""
    numels = adam8[0]["numels"]
    pruned_any = 0
    for name, n in numels.items():
        pre = {k: _full(adam8, "pre", name, k, n) for k in ("exp_avg", "exp_avg_sq")}
        post = {k: _full(adam8, "post", name, k, n) for k in ("exp_avg", "exp_avg_sq")}
        keep_sq = prune_mask(pre["exp_avg_sq"], "magnitude", 0.9)
        keep_m = prune_mask(pre["exp_avg"], "magnitude", 0.9) & keep_sq
        assert torch.equal(post["exp_avg_sq"], pre["exp_avg_sq"] * keep_sq)
        assert torch.equal(post["exp_avg"], pre["exp_avg"] * keep_m)
        assert int((post["exp_avg_sq"] == 0).sum()) >= int(0.9 * n)
        pruned_any += int((pre["exp_avg_sq"] != 0).sum() - (post["exp_avg_sq"] != 0).sum())
    assert pruned_any > 0


def test_resume_restores_8bit_state_bit_for_bit(adam8):
    """Same world size: the raw codes and block scales saved beside the per-parameter moments come
    back bit for bit (dequantized moments included)."""
    for r in adam8:
        assert r["raw_post"] and r["raw_post"].keys() == r["raw_resumed"].keys()
        assert any(v.dtype == torch.uint8 for v in r["raw_post"].values())
        for k, v in r["raw_post"].items():
            assert torch.equal(r["raw_resumed"][k], v), k
    for name, n in adam8[0]["numels"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(_full(adam8, "resumed", name, k, n), _full(adam8, "saved", name, k, n)), (name, k)
    for r in adam8:
        assert r["resumed_loss"] == r["resumed_loss"]  # finite step after resume


def test_requantized_resume_is_within_one_8bit_step(adam8):
    """Another world size: the per-parameter (dequantized) moments are requantized blockwise;
    pruned entries stay exactly 0 and the rest are within one 8-bit step (1% of the tensor's max).
    The bytes differ: the emptied block's scale comes back as 0 (what the raw state is saved for)."""
    for name, n in adam8[0]["numels"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            saved, back = _full(adam8, "saved", name, k, n), _full(adam8, "requantized", name, k, n)
            assert torch.equal(back[saved == 0], torch.zeros(int((saved == 0).sum())))
            scale = float(saved.abs().max()) or 1.0
            assert float((back - saved).abs().max()) <= 0.01 * scale, name
    for r in adam8:
        for key in (f"{r['emptied']}/absmax1", f"{r['emptied']}/absmax2"):
            assert r["raw_post"][key][0] > 0 and r["raw_requantized"][key][0] == 0, key
