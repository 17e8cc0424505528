"""The paper's baselines run in the same code (1 process; the distributed paths are tested elsewhere)."""

import pytest
import torch

from relora_dist.config import Config
from relora_dist.trainer import param_groups
from tests.dist_utils import engine, run_world, tiny_overrides

BASE = {"relora.enabled": True, "relora.warm_start_steps": 4, "relora.cycle_length": 4,
        "relora.first_warmup": 1, "relora.restart_warmup": 1, "relora.r": 8, "train.max_steps": 16}


def _run(tiny_data, tmp_path, backend="zero2", **extra):
    ds_config, selects = engine(backend)
    overrides = tiny_overrides(tiny_data, tmp_path / "run", **{**BASE, **extra, **selects})
    return run_world(1, "relora_run", overrides, tmp_path, ds_config=ds_config)[0]


BACKENDS = pytest.mark.parametrize("backend", ["zero2", "fsdp2"])


@BACKENDS
@pytest.mark.spawn
def test_lora_after_warm_start_never_resets(tiny_data, tmp_path, backend):
    r = _run(tiny_data, tmp_path, backend, **{"relora.resets": False})
    assert r["restart_index"] == 0
    lrs = r["lrs"][4:]
    assert torch.all(lrs[1:] > 0), "plain LoRA has no LR-0 restarts after its first warmup"
    assert r["losses"][-3:].mean() < r["losses"][:3].mean()


@BACKENDS
@pytest.mark.spawn
def test_relora_without_warm_start(tiny_data, tmp_path, backend):
    r = _run(tiny_data, tmp_path, backend, **{"relora.warm_start_steps": 0})
    assert r["restart_index"] == 3  # 16 ReLoRA steps, cycle 4: resets after t = 4, 8, 12
    assert r["losses"][-3:].mean() < r["losses"][:3].mean()


@BACKENDS
@pytest.mark.spawn
def test_control_is_full_rank_training_of_a_smaller_model(tiny_data, tmp_path, backend):
    r = _run(tiny_data, tmp_path, backend, **{"relora.enabled": False, "model.hidden_size": 32,
                                     "model.intermediate_size": 86})
    assert r["restart_index"] == 0
    assert r["state_dict"]["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)


def test_param_groups_decay_matrices_only():
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = Config()
    cfg.optimizer.weight_decay = 0.1
    groups = param_groups(lin, cfg, lr=1e-3)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


def test_param_groups_decay_1d_decays_every_trainable_param():
    """optimizer.decay_1d=true: one decayed group holding every trainable param, biases and the
    norm included (the reference's single AdamW group); frozen params stay out of both."""
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    lin[2].requires_grad_(False)
    cfg = Config()
    cfg.optimizer.weight_decay = 0.1
    cfg.optimizer.decay_1d = True
    groups = param_groups(lin, cfg, lr=1e-3)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in lin[:2].parameters()]


@pytest.mark.spawn
def test_sgd_optimizer_runs_relora_without_moment_resets(tiny_data, tmp_path):
    r = _run(tiny_data, tmp_path, **{"optimizer.name": "sgd", "optimizer.lr": 0.1,
                                     "relora.optimizer_reset": "none"})
    assert r["restart_index"] == 2
    assert r["losses"][-3:].mean() < r["losses"][:3].mean()


@pytest.mark.spawn
def test_same_command_gives_the_same_run_with_adapter_dropout(tiny_data, tmp_path):
    """The global RNG (adapter dropout) is seeded from train.seed and the rank: torch's own initial
    seed differs per process, so without it two runs of one command diverge from the switch on."""
    short = {"relora.dropout": 0.1, "train.max_steps": 8}  # 4 warm-start + 4 ReLoRA steps with dropout
    a = _run(tiny_data, tmp_path / "a", **short)
    b = _run(tiny_data, tmp_path / "b", **short)
    assert len(a["losses"]) == 8 and torch.equal(a["losses"], b["losses"])


@pytest.mark.spawn
def test_fused_and_foreach_adamw_agree_to_rounding(tiny_data, tmp_path):
    """optimizer.implementation reaches the optimizer FSDP2 steps (one tensor per parameter shard,
    state built at the switch and pruned at resets): fused and foreach AdamW give the same run to
    float rounding, and not bitwise (so the key is not ignored)."""
    short = {"train.max_steps": 12}  # 4 warm-start steps, then 8 ReLoRA steps with a reset
    fused = _run(tiny_data, tmp_path / "fused", "fsdp2", **short, **{"optimizer.implementation": "fused"})
    foreach = _run(tiny_data, tmp_path / "foreach", "fsdp2", **short, **{"optimizer.implementation": "foreach"})
    assert fused["restart_index"] == foreach["restart_index"] == 1
    assert len(fused["losses"]) == 12
    torch.testing.assert_close(fused["losses"], foreach["losses"], rtol=1e-5, atol=0)
    # measured here: losses bitwise equal for 11 steps, 3e-8 apart at step 12; weights 2.7e-8
    assert any(not torch.equal(v, foreach["state_dict"][k]) for k, v in fused["state_dict"].items())


@pytest.mark.spawn
def test_min_reset_lr_ratio_keeps_only_the_resets_at_a_high_lr(tiny_data, tmp_path):
    """relora.min_reset_lr_ratio through the Trainer: 12 ReLoRA steps, cycle 4, so resets after
    phase steps 4 and 8 (global steps 8 and 12) by default; a floor between the LRs their restart
    warmups ramp back to keeps the first only. The run then takes no LR-0 step at 12, and every
    step's LR is the schedule's multiplier of the ReLoRA phase's peak."""
    from relora_dist.config import load_config
    from relora_dist.relora.schedule import lr_multiplier, reset_due

    every = load_config(None, tiny_overrides(tiny_data, tmp_path / "cfg", **BASE))
    ramp = [lr_multiplier(every, s + 1) for s in (8, 12)]  # restart warmup 1: the envelope there
    assert ramp[0] > ramp[1] > 0
    floor = (ramp[0] + ramp[1]) / 2
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path / "cfg", **BASE, **{"relora.min_reset_lr_ratio": floor}))
    assert [s for s in range(16) if reset_due(every, s)] == [8, 12]
    assert [s for s in range(16) if reset_due(cfg, s)] == [8]
    r = _run(tiny_data, tmp_path, **{"relora.min_reset_lr_ratio": floor})
    assert r["restart_index"] == 1
    assert r["steps"].tolist() == list(range(1, 17))  # logged after each step; lrs[i] is step i's
    peak = 2 * cfg.optimizer.lr  # relora.lr = 0: twice the full-rank LR
    expect = torch.tensor([lr_multiplier(cfg, s) * (peak if s >= 4 else cfg.optimizer.lr) for s in range(16)])
    torch.testing.assert_close(r["lrs"].double(), expect.double(), rtol=1e-6, atol=0)
    assert r["lrs"][12] > 0 and r["lrs"][8] == 0
    assert r["losses"][-3:].mean() < r["losses"][:3].mean()
