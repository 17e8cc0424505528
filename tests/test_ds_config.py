"""The DeepSpeed template: "auto" filled from the training config, explicit values checked against it."""

import json
from pathlib import Path

import pytest
import torch

from relora_dist.config import Config, ConfigError, load_config
from relora_dist.backends.ds_config import build_ds_config, load_ds_template, with_model_buckets

REPO = Path(__file__).resolve().parent.parent
AUTO = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}


def cfg_of(*overrides: str) -> Config:
    return load_config(None, list(overrides))


def one_line_error(template: dict, cfg: Config, world: int = 1) -> str:
    with pytest.raises(ConfigError) as ei:
        build_ds_config(template, cfg, world)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("world, accum", [(1, 4), (2, 2), (4, 1)])
def test_auto_fill_per_world_size(world, accum):
    cfg = cfg_of("train.global_batch_size=16", "train.micro_batch_size=4", "train.grad_clip=0.5")
    ds = build_ds_config(AUTO, cfg, world)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == 16 == 4 * accum * world
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False  # precision auto resolves to fp32 on CPU
    assert AUTO["train_batch_size"] == "auto"  # the template is not modified


def test_absent_keys_are_filled_like_auto():
    ds = build_ds_config({"zero_optimization": {"stage": 2}}, cfg_of("train.micro_batch_size=2"), 2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 4, 16)


@pytest.mark.parametrize("precision, enabled", [("bf16", True), ("fp32", False), ("auto", False)])
def test_bf16_from_precision(precision, enabled):
    assert build_ds_config(AUTO, cfg_of(f"train.precision={precision}"), 1)["bf16"]["enabled"] is enabled


def test_explicit_matching_values_accepted():
    tpl = {**AUTO, "train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
           "gradient_clipping": 1.0, "bf16": {"enabled": True}}
    ds = build_ds_config(tpl, cfg_of("train.precision=bf16"), 2)
    assert ds["gradient_accumulation_steps"] == 1 and ds["bf16"]["enabled"] is True


@pytest.mark.parametrize("template, overrides, world, needles", [
    ({"train_batch_size": 7}, [], 1, ["train_batch_size=7", "requires 16", "set train_batch_size to \"auto\"",
                                      "train.global_batch_size"]),
    # micro batch and accumulation agree, the product does not: 8 x 2 x 1 != 32
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}, [], 1,
     ["train_batch_size=32", "micro batch 8 x grad accumulation 2 x world size 1", "train.global_batch_size"]),
    ({"train_micro_batch_size_per_gpu": 4}, [], 1, ["train_micro_batch_size_per_gpu=4", "train.micro_batch_size=8",
                                                    "change train.micro_batch_size"]),
    # right for one process, wrong for two
    ({"gradient_accumulation_steps": 2}, [], 2, ["gradient_accumulation_steps=2", "world size 2", "requires 1"]),
    ({"gradient_clipping": 0.5}, [], 1, ["gradient_clipping=0.5", "train.grad_clip=1.0", "change train.grad_clip"]),
    ({"bf16": {"enabled": True}}, ["train.precision=fp32"], 1, ["bf16.enabled=true", "train.precision=fp32",
                                                                 "set bf16.enabled to \"auto\""]),
    ({"bf16": {"enabled": False}}, ["train.precision=bf16"], 1, ["bf16.enabled=false", "set train.precision=fp32"]),
    ({"bfloat16": {"enabled": True}}, [], 1, ["'bfloat16' section", "rename it to 'bf16'"]),
    ({"fp16": {"enabled": True}}, [], 1, ["fp16", "delete the 'fp16' section", "train.precision=bf16"]),
    ({"optimizer": {"type": "Adam"}}, [], 1, ["'optimizer' section", "delete it"]),
    ({"scheduler": {"type": "WarmupLR"}}, [], 1, ["'scheduler' section", "delete it"]),
    ({"zero_optimization": {"stage": 1}}, [], 1, ["zero_optimization.stage=1", "set it to 2 or 3"]),
    ({"zero_optimization": {"stage": 0}}, [], 1, ["zero_optimization.stage=0", "set it to 2 or 3"]),
    ({"zero_optimization": "stage3"}, [], 1, ["'zero_optimization' must be an object"]),
    ({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100000}}, [], 1,
     ["zero_optimization.stage3_param_persistence_threshold=100000", "shard-local merges", "requires 0",
      "set zero_optimization.stage3_param_persistence_threshold to \"auto\" or 0"]),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}}, [], 1,
     ["zero_optimization.allgather_bucket_size", "set explicit values"]),
    # the training config itself does not fit the world size
    ({}, ["train.global_batch_size=16", "train.micro_batch_size=8"], 4,
     ["train.global_batch_size=16", "train.micro_batch_size=8 x world size 4", "use a multiple of 32"]),
])
def test_contradictions_rejected(template, overrides, world, needles):
    msg = one_line_error({**AUTO, **template}, cfg_of(*overrides), world)
    assert all(n in msg for n in needles), (needles, msg)


def test_zero3_persistence_threshold_forced_for_relora():
    zero3 = {**AUTO, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"}}
    assert build_ds_config(zero3, Config(), 2)["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    absent = {**AUTO, "zero_optimization": {"stage": 3}}
    assert build_ds_config(absent, Config(), 2)["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    explicit0 = {**AUTO, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    assert build_ds_config(explicit0, Config(), 1)["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    # without ReLoRA there are no merges: "auto" leaves DeepSpeed's default, an explicit value is kept
    full = cfg_of("relora.enabled=false")
    assert "stage3_param_persistence_threshold" not in build_ds_config(zero3, full, 1)["zero_optimization"]
    kept = {**AUTO, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100000}}
    assert build_ds_config(kept, full, 1)["zero_optimization"]["stage3_param_persistence_threshold"] == 100000


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
@pytest.mark.parametrize("world", [1, 2])
def test_shipped_templates_build(path, world):
    template = load_ds_template(path)
    for cfg in (Config(), cfg_of("relora.enabled=false"), cfg_of("train.precision=bf16")):
        ds = build_ds_config(template, cfg, world)
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
        # only bucket sizes stay "auto" until the engine is built, which sizes them from the model
        assert '"auto"' not in json.dumps(with_model_buckets(ds, 10**6))
        assert ds["zero_optimization"]["stage"] in (2, 3)


def test_template_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{\"train_batch_size\": 16,,}")
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    for path, needle in ((tmp_path / "missing.json", "not found; pass an existing file"),
                         (bad, "not valid JSON"), (arr, "must be a JSON object")):
        with pytest.raises(ConfigError) as ei:
            load_ds_template(path)
        assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_invalid_world_size():
    assert "WORLD_SIZE" in one_line_error(AUTO, Config(), 0)


def test_auto_bucket_size_is_capped_at_the_trainable_elements_and_absent_stays_deepspeeds():
    """"auto" (the shipped templates): the gradient bucket holds at most all trainable elements
    (DeepSpeed's 5e8-element default allocates a 1 GB bf16 bucket per GPU whatever the model);
    absent keys keep DeepSpeed's defaults, explicit values stay."""
    from relora_dist.backends.ds_config import DS_REDUCE_BUCKET

    cfg = cfg_of("--relora.enabled=false")
    auto = {"reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto"}
    for stage in (2, 3):
        ds = build_ds_config({"zero_optimization": {"stage": stage, **auto}}, cfg, 1)
        filled = with_model_buckets(ds, 76_000_000)["zero_optimization"]
        assert filled["reduce_bucket_size"] == 76_000_000 and "stage3_prefetch_bucket_size" not in filled
        assert with_model_buckets(ds, 10**10)["zero_optimization"]["reduce_bucket_size"] == DS_REDUCE_BUCKET
    for zero in ({"stage": 3}, {"stage": 2, "reduce_bucket_size": 123}):
        ds = build_ds_config({"zero_optimization": zero}, cfg, 1)
        assert with_model_buckets(ds, 10**9)["zero_optimization"] == ds["zero_optimization"]
    for name in ("zero2", "zero3", "zero3_offload"):  # the shipped templates ask for it
        assert load_ds_template(REPO / "ds_configs" / f"{name}.json")["zero_optimization"]["reduce_bucket_size"] == "auto"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_foreach_overflow_check_answers_like_deepspeeds_per_gradient_check(dtype):
    """ZeRO-2's overflow check as one foreach op (backends/zero_fused.fuse_overflow_check) against
    DeepSpeed's own per-gradient test, summed the way its serial check sums it."""
    from deepspeed.runtime.utils import has_inf_or_nan

    from relora_dist.backends.zero_fused import overflow_foreach

    def grads(bad):
        g = [torch.randn(4, 3, dtype=dtype), None, torch.zeros(0, dtype=dtype), torch.randn(7, dtype=dtype) * 1e30]
        if bad is not None:
            g[3][5] = bad
        return g

    for bad in (None, float("nan"), float("inf"), -float("inf"), 3e38):
        g = grads(bad)
        expected = bool(sum(has_inf_or_nan(x).float() for x in g if x is not None))
        got = overflow_foreach(g)
        assert got.shape == (1,) and got.dtype == torch.bool
        assert bool(got) == expected, (bad, dtype)
    assert not bool(overflow_foreach([None, torch.zeros(0)]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_foreach_grad_norm_is_deepspeeds_per_gradient_norm_bitwise(dtype):
    """ZeRO-2's and ZeRO-3's grad norm as one foreach op (backends/zero_fused.fuse_grad_norm*) against
    DeepSpeed 0.19.8's `get_grad_norm_direct` loops written out: each gradient's 2-norm in the norm
    dtype (fp64), squared and summed. Bitwise, so clipping and the non-finite test see the same
    number. (ZeRO-3's `.norm()` is `vector_norm` too.)"""
    from deepspeed.runtime.zero.utils import get_norm_dtype

    from relora_dist.backends.zero_fused import norm_foreach

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g).to(dtype) * s for n, s in
             ((4096, 1e-3), (37, 1.0), (64 * 172, 3e2), (1, 1e-30), (0, 1.0))]
    expected = torch.stack([torch.linalg.vector_norm(x.to(get_norm_dtype()), ord=2.0) for x in grads]
                           ).pow(2.0).sum()
    got = norm_foreach(grads, get_norm_dtype())  # ZeRO-2 then rounds it to fp32, ZeRO-3 keeps fp64
    assert got.dtype == get_norm_dtype() and got.dim() == 0
    assert torch.equal(got, expected), (float(got), float(expected))
    grads[1][3] = float("nan")  # a NaN reaches the total, which DeepSpeed then masks
    assert torch.isnan(norm_foreach(grads, get_norm_dtype()))
    assert float(norm_foreach([], get_norm_dtype())) == 0.0
