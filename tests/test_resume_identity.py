"""Which checkpoint a launch resumes and whether it may: the run identity, checkpoint.allow_changes,
checkpoint.resume=previous, damaged manifests and configs. Fake checkpoints, no process group."""

import re

import pytest

from relora_dist.checkpoint.format import CheckpointError, read_manifest
from relora_dist.config import ConfigError, load_config
from relora_dist.checkpoint.resume import check_checkpoint_config, check_output_dir, resume_target
from tests.dist_utils import fake_checkpoint


@pytest.fixture
def run(tmp_path):
    base = [f"--run.output_dir={tmp_path}"]
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2, load_config(None, base))
    fake_checkpoint(root, 4, load_config(None, base))
    return base, root


def _error(base, root, *extra):
    with pytest.raises(CheckpointError) as e:
        check_output_dir(load_config(None, base + list(extra)), root)
    assert "\n" not in str(e.value)
    return str(e.value)


CHANGED = ["--optimizer.lr=1e6", "--relora.lr=1e6", "--relora.prune_ratio=0.5", "--relora.optimizer_reset=zero",
           "--relora.train_extra=false", "--data.val_fraction=0.1", "--train.seed=3"]


def test_every_trajectory_change_is_refused_and_named(run):
    base, root = run
    message = _error(base, root, *CHANGED)
    keys = [c[2:].split("=")[0] for c in CHANGED]
    listed = re.search(r"--checkpoint\.allow_changes=([\w.,]+?), else", message).group(1).split(",")
    assert sorted(listed) == sorted(keys)
    assert "optimizer.lr 0.003 -> 1000000.0" in message


def test_allowed_changes_resume(run):
    base, root = run
    keys = ",".join(c[2:].split("=")[0] for c in CHANGED)
    check_output_dir(load_config(None, base + CHANGED + [f"--checkpoint.allow_changes={keys}"]), root)
    assert "relora.lr" in _error(base, root, *CHANGED, "--checkpoint.allow_changes=optimizer.lr")


@pytest.mark.parametrize("extra", ["--train.max_steps=900", "--relora.phase_stage=3",
                                   "--relora.merge_master_device=cpu", "--logging.log_every=1",
                                   "--relora.effective_rank_every=-1", "--train.micro_batch_size=4"])
def test_settings_outside_the_identity_may_change(run, extra):
    base, root = run
    check_output_dir(load_config(None, base + [extra]), root)


def test_structural_keys_cannot_be_allowed(run):
    base, root = run
    assert "relora.r cannot change within a run" in _error(base, root, "--relora.r=4")
    cfg = load_config(None, base + ["--checkpoint.allow_changes=relora.r"])
    with pytest.raises(ConfigError, match="relora.r changes the model's tensors"):
        check_checkpoint_config(cfg)
    with pytest.raises(ConfigError, match="did you mean 'optimizer.lr'"):
        check_checkpoint_config(load_config(None, base + ["--checkpoint.allow_changes=optimizer.lrr"]))


@pytest.mark.parametrize("garbage", ["{{{ not yaml", "- a list\n", "train: 3\n", ""])
def test_garbage_config_in_checkpoint(run, garbage):
    base, root = run
    (root / "step_00000004" / "config.yaml").write_text(garbage)
    message = _error(base, root)
    assert "config.yaml is damaged" in message and "--checkpoint.resume=previous" in message
    cfg = load_config(None, base + ["--checkpoint.resume=previous"])
    assert resume_target(cfg, root).name == "step_00000002"  # the damaged newest one is passed over
    check_output_dir(cfg, root)


def test_previous_skips_a_corrupt_newest_checkpoint(run):
    base, root = run
    shard = root / "step_00000004" / "rank00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    cfg = load_config(None, base + ["--checkpoint.resume=previous"])
    assert resume_target(cfg, root).name == "step_00000002"
    (root / "step_00000002" / "rank00000.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies"):
        resume_target(cfg, root)


@pytest.mark.parametrize("content,problem", [
    ("[]", "holds a JSON list"), ('{"format_version": 1}', "lacks global_step"), ("{}", "no integer format_version"),
    ('{"format_version": 1, "global_step": "3"}', "lacks"), ("\x00\xff garbage", "not valid JSON"),
    ('"text"', "holds a JSON str")])
def test_manifest_of_the_wrong_shape(run, content, problem):
    _, root = run
    (root / "step_00000004" / "manifest.json").write_text(content, errors="surrogateescape")
    with pytest.raises(CheckpointError, match=problem) as e:
        read_manifest(root / "step_00000004")
    assert "--checkpoint.resume=previous" in str(e.value) and "\n" not in str(e.value)


def test_stale_temporaries_are_removed(run):
    from relora_dist.checkpoint.format import remove_stale_temporaries

    _, root = run
    (root / ".tmp-step_00000006").mkdir()
    (root / ".tmp-step_00000006" / "rank00000.safetensors").write_bytes(b"partial")
    (root / ".latest.tmp").write_text("step_00000006")
    assert remove_stale_temporaries(root) == [".tmp-step_00000006", ".latest.tmp"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004"]
