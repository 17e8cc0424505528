"""train.compile: torch.compile per decoder block under each engine, across the switch and resets.

The compiled runs take 7-16 s each on 2 CPU cores once inductor's cache is warm (50 s for the
file, measured alone) and longer cold (inductor compiles C++ through gcc), so they are marked `slow`
as well as `spawn`. Tolerance: fp32 losses within 1e-5 of eager (measured
4.8e-7: inductor fuses RMSNorm and the rotary products, which reorders fp32 sums).
"""

from __future__ import annotations

import pytest
import torch

from relora_dist.runtime.compile import check_compile_config
from relora_dist.config import ConfigError, load_config
from tests.dist_utils import engine, run_world, tiny_overrides

# 3 full-rank steps, then 6 ReLoRA steps with resets after steps 5 and 7.
RUN = {"train.max_steps": 9, "relora.warm_start_steps": 3, "relora.cycle_length": 2, "relora.r": 4,
       "relora.first_warmup": 1, "relora.restart_warmup": 1}
TOL = 1e-5


def test_compile_refuses_the_quantized_base():
    cfg = load_config(None, ["--train.compile=true", "--relora.base_quant=nf4"])
    with pytest.raises(ConfigError, match="train.compile=true with relora.base_quant=nf4.*train.compile=false"):
        check_compile_config(cfg)
    check_compile_config(load_config(None, ["--train.compile=true"]))  # the default run compiles


@pytest.fixture(scope="module")
def eager(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eager")
    return run_world(1, "compile_run", tiny_overrides(tiny_data, tmp / "out", **RUN), tmp / "res")[0]


def _compiled(tiny_data, tmp_path, backend: str, world: int) -> dict:
    ds, extra = engine(backend)
    overrides = tiny_overrides(tiny_data, tmp_path / "out", **RUN, **extra, **{"train.compile": True})
    return run_world(world, "compile_run", overrides, tmp_path / "res", ds_config=ds)


@pytest.mark.spawn
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero2", "zero3", "fsdp2"])
def test_compiled_losses_match_eager_at_world_1(tiny_data, tmp_path, eager, backend):
    res = _compiled(tiny_data, tmp_path, backend, 1)[0]
    assert res["restart_index"] == 2 and len(res["losses"]) == 9
    torch.testing.assert_close(res["losses"], eager["losses"], rtol=0, atol=TOL)
    torch.testing.assert_close(res["evals"], eager["evals"], rtol=0, atol=TOL)
    # Compiled in place: every layer, under the eager names (checkpoints and exports unchanged).
    assert res["compiled_layers"] == 2 and res["names"] == eager["names"]
    g = res["graphs"]
    assert g["before_switch"] > 0  # compiled at all (eager runs make no graph)
    assert g["resets"][0] == g["resets"][1]  # A and B change values at a reset, not shapes
    if backend != "zero3":  # ZeRO-3's disabled gather hooks break each block into several graphs
        assert g["before_switch"] == 2  # train and eval: one graph each, shared by both layers
        assert g["resets"][0] - g["before_switch"] == 1  # one recompile at the switch


@pytest.mark.spawn
@pytest.mark.slow
def test_compiled_two_ranks_match_one_eager_process(tiny_data, tmp_path, eager):
    ranks = _compiled(tiny_data, tmp_path, "zero2", 2)
    for res in ranks:
        torch.testing.assert_close(res["losses"], eager["losses"], rtol=0, atol=TOL)
        assert res["graphs"]["resets"][0] == res["graphs"]["resets"][1]
