"""kill -9 of one rank of a 2-rank run at a random point (mid-step, mid-reset, mid-save); the
relaunch resumes from the newest published checkpoint (removing a half-written one) and its losses
are bit-identical to an uninterrupted run's from that step on. RELORA_FAULT_SEED picks other
points (default 0: reproducible)."""

import os
import random

import pytest
import torch
from torch.multiprocessing import ProcessExitedException

from relora_dist.checkpoint.format import find_latest, read_manifest
from tests.dist_utils import run_world, tiny_overrides

pytestmark = pytest.mark.spawn  # every test here starts processes (conftest.py checks it)

RUN = {"relora.warm_start_steps": 4, "relora.cycle_length": 4, "relora.first_warmup": 1, "relora.restart_warmup": 1,
       "relora.r": 8, "relora.alpha": 16, "train.max_steps": 16, "relora.optimizer_reset": "random",
       "relora.prune_ratio": 0.5, "checkpoint.save_every": 2}
RNG = random.Random(int(os.environ.get("RELORA_FAULT_SEED", "0")))
# resets follow steps 9 and 13; saves every 2 steps
POINTS = {"step": RNG.randint(2, 15), "reset": RNG.choice([9, 13]), "save": RNG.choice(range(2, 16, 2))}
VICTIM = RNG.randint(0, 1)


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    return run_world(2, "relora_run", tiny_overrides(tiny_data, tmp / "run", **RUN), tmp / "out")


@pytest.mark.parametrize("where", list(POINTS))
def test_killed_rank_resumes_bit_identically(straight, tiny_data, tmp_path, where):
    at = POINTS[where]
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, run_dir, **RUN)
    with pytest.raises(ProcessExitedException):
        run_world(2, "killed_run", overrides, tmp_path / "killed", where=where, at_step=at, victim=VICTIM)
    root = run_dir / "checkpoints"
    newest = find_latest(root)
    # a save killed before publishing leaves only its .tmp- folder; `latest` stays the previous one
    resumed_at = read_manifest(newest)["global_step"] if newest else 0
    assert resumed_at == (at - 2 if where == "save" else (at - 1) // 2 * 2), (where, at, resumed_at)
    if where == "save":
        assert (root / f".tmp-step_{at:08d}").is_dir()
    after = run_world(2, "relora_run", overrides, tmp_path / "resumed")
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # removed at start-up
    for rank in range(2):
        assert after[rank]["steps"].tolist() == list(range(resumed_at + 1, 17))
        assert torch.equal(after[rank]["losses"], straight[rank]["losses"][resumed_at:]), (where, at, rank)
        for name, w in straight[rank]["state_dict"].items():
            assert torch.equal(after[rank]["state_dict"][name], w), name
