"""Faults other than bad input: non-finite training values."""

import math

import pytest
import torch

from relora_dist.checkpoint.format import find_latest, list_checkpoints, read_manifest
from tests.dist_utils import run_world, tiny_overrides

RUN = {"relora.warm_start_steps": 4, "relora.cycle_length": 4, "relora.first_warmup": 1,
       "relora.restart_warmup": 1, "relora.r": 8, "train.max_steps": 8}


@pytest.fixture(scope="module")
def nonfinite(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nonfinite")
    results = run_world(2, "nonfinite_runs", tiny_overrides(tiny_data, tmp / "unused", **RUN), tmp / "out",
                        base=str(tmp))
    return tmp, results


@pytest.mark.spawn
def test_skip_applies_no_update_and_counts(nonfinite):
    """NaN loss on rank 1 only at steps 3 and 4: both ranks skip those updates (the weights after
    step 4 are bitwise those after step 2), count 2 skipped steps, and finish the run."""
    tmp, results = nonfinite
    for r in results:
        assert r["skip_error"] == ""
        assert r["skipped_steps"] == 2 and r["skip_final_step"] == 8
        assert math.isnan(r["skip_losses"][2]) and math.isnan(r["skip_losses"][3])
        assert torch.isfinite(r["skip_losses"][4:]).all()
        masters = r["skip_masters"]
        assert torch.equal(masters[3], masters[1]) and torch.equal(masters[2], masters[1])
        assert not torch.equal(masters[1], masters[0])
    latest = find_latest(tmp / "skip" / "checkpoints")
    assert read_manifest(latest)["skipped_steps"] == 2
    for f in ("rank00000.safetensors", "rank00001.safetensors", "manifest.json"):
        assert (latest / f).stat().st_mode & 0o777 == 0o644, f  # readable by others who convert or inspect


@pytest.mark.spawn
def test_a_nonfinite_model_is_never_saved(nonfinite):
    tmp, results = nonfinite
    assert all("non-finite values (rank 1)" in r["nan_save_error"] for r in results)
    root = tmp / "skip" / "checkpoints"
    assert find_latest(root).name == "step_00000008"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("run,message,kept", [
    ("stop", "step 5: non-finite training values", 4), ("limit", "step 7: 3 non-finite steps in a row", 6)])
@pytest.mark.spawn
def test_stop_keeps_the_last_finite_checkpoints(nonfinite, run, message, kept):
    """on_nonfinite=stop at the first NaN (step 5), skip past max_skipped_steps=2 (step 7): every
    rank stops with one line naming the newest checkpoint; nothing non-finite is saved, retention
    deletes nothing (a skipped step leaves the last finite model, which may be saved: step 6)."""
    tmp, results = nonfinite
    root = tmp / run / "checkpoints"
    for r in results:
        error = r[f"{run}_error"]
        assert message in error and "\n" not in error
        assert f"the newest checkpoint is {root / f'step_{kept:08d}'}" in error
    assert [p.name for p in list_checkpoints(root)] == [f"step_{s:08d}" for s in range(2, kept + 1, 2)]
    assert find_latest(root).name == f"step_{kept:08d}"


@pytest.mark.spawn
def test_reset_without_optimizer_state_prunes_nothing(nonfinite):
    """Every ReLoRA step skipped up to the first reset: the reset merges and re-draws, and the
    prune (no Adam state exists yet) is a no-op instead of a crash."""
    _, results = nonfinite
    for r in results:
        assert r["noopt_error"] == "" and r["noopt_restart_index"] == 1 and r["noopt_skipped"] == 6


@pytest.mark.spawn
def test_bf16_zero2_skips_a_planted_nan_or_inf_gradient_like_deepspeed(tiny_data, tmp_path):
    """ZeRO-2 under bf16 skips on a non-finite global norm alone (backends/zero_fused.py,
    `_norm_decides_overflow`): a NaN (full-rank step 3) and an inf (ReLoRA step 7) planted in one
    element of one gradient on the last rank skip that step on every rank, exactly as DeepSpeed's
    own per-gradient overflow check does: losses, grad norms and the final fp32 masters bitwise
    equal to a run with DeepSpeed's own check, norm and copies into the partition, at 1 and at 2
    ranks; the project's run never calls that check nor replaces it by a second pass over the
    gradients (no inf-norm), and takes its norm and copies with foreach. 2 ranks against 1 process: the same steps skipped, losses within rtol
    1e-4 (bitwise here) and the fp32 masters within 1e-3 (bf16 gradients reduced in another order:
    3.1e-4 measured)."""
    run = {"train.precision": "bf16", "train.max_steps": 8, "train.on_nonfinite": "skip",
           "relora.warm_start_steps": 4, "relora.cycle_length": 4, "relora.first_warmup": 1,
           "relora.restart_warmup": 1, "relora.r": 4}
    by_world = {world: run_world(world, "fused_vs_deepspeed", tiny_overrides(tiny_data, tmp_path / f"run{world}", **run),
                                 tmp_path / f"out{world}", plants={3: float("nan"), 7: float("inf")})
                for world in (1, 2)}
    for results in by_world.values():
        for r in results:
            ours, theirs = r["ours"], r["deepspeed"]
            assert theirs["has_overflow"] == 8 and ours["has_overflow"] == 0 and ours["inf_norms"] == 0
            assert theirs["two_norms"] == 0 and ours["two_norms"] >= 8  # one foreach norm per step and group
            assert ours["copies"] - theirs["copies"] >= 8  # the partition's copies: one foreach per step
            assert ours["skipped"] == theirs["skipped"] == 2
            assert math.isinf(ours["grad_norms"][2]) and math.isinf(ours["grad_norms"][6])
            assert torch.isfinite(ours["grad_norms"][[0, 1, 3, 4, 5, 7]]).all()
            for key in ("losses", "grad_norms", "masters"):
                assert torch.equal(ours[key], theirs[key]), key
        assert torch.equal(results[0]["ours"]["masters"], results[-1]["ours"]["masters"])
    one, two = by_world[1][0]["ours"], by_world[2][0]["ours"]
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-4, atol=0)
    torch.testing.assert_close(two["masters"], one["masters"], rtol=0, atol=1e-3)  # measured: 3.1e-4


@pytest.mark.spawn
def test_zero3_copies_gradient_partitions_like_deepspeed(tiny_data, tmp_path):
    """ZeRO-3 copies each bucket's reduce-scattered gradient partitions into the rank's buffer
    with one foreach op (backends/zero_fused.fuse_partition_copies_stage3), and takes its norm
    with one: losses, grad norms and the final fp32 masters bitwise those of a run with DeepSpeed's
    own per-gradient loops, at 1 rank (2 micro-batches a step: the second accumulates through
    DeepSpeed's own loop) and at 2 ranks, through a reset (bf16, 6 steps). 2 ranks against 1
    process: losses within rtol 1e-4 and fp32 masters within 3e-3 (bf16 gradients reduced and
    accumulated in another order; measured 1.4e-5 and 1.4e-3)."""
    from tests.dist_utils import engine

    ds_config, extra = engine("zero3")
    run = {"train.precision": "bf16", "train.max_steps": 6, "relora.warm_start_steps": 2,
           "relora.cycle_length": 2, "relora.first_warmup": 1, "relora.restart_warmup": 1, "relora.r": 4, **extra}
    by_world = {}
    for world in (1, 2):
        results = run_world(world, "fused_vs_deepspeed", tiny_overrides(tiny_data, tmp_path / f"run{world}", **run),
                            tmp_path / f"out{world}", ds_config=ds_config, plants={})
        for r in results:
            ours, theirs = r["ours"], r["deepspeed"]
            assert ours["copies"] - theirs["copies"] >= 6, (world, ours["copies"], theirs["copies"])
            assert ours["skipped"] == theirs["skipped"] == 0
            for key in ("losses", "grad_norms", "masters"):
                assert torch.equal(ours[key], theirs[key]), (world, key)
        by_world[world] = results[0]["ours"]
    one, two = by_world[1], by_world[2]
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-4, atol=0)  # measured: 1.4e-5
    torch.testing.assert_close(two["masters"], one["masters"], rtol=0, atol=3e-3)  # measured: 1.4e-3


@pytest.mark.spawn
def test_a_stale_extension_build_lock_does_not_hang_the_launch(tiny_data, tmp_path):
    """A launch killed while DeepSpeed JIT-built its CPU shared-memory comm op leaves
    <TORCH_EXTENSIONS_DIR>/deepspeed_shm_comm/lock behind; the next launch must still start (the
    op is not built at all, so nothing waits on the lock)."""
    import os
    import subprocess
    import sys

    from tests.dist_utils import REPO

    ext = tmp_path / "torch_extensions"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").write_text("")
    env = dict(os.environ, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ext), OMP_NUM_THREADS="1")
    args = tiny_overrides(tiny_data, tmp_path / "run", **{"train.max_steps": 1, "relora.enabled": False})
    proc = subprocess.run([sys.executable, "launchers/pretrain.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done |" in proc.stdout
    assert [p.name for p in (ext / "deepspeed_shm_comm").iterdir()] == ["lock"]  # nothing was built


# --- a peer that dies or stops -----------------------------------------------------------------------
def _launch_pair(data, run_dir, timeout_s, grace_s):
    """Two ranks of a long tiny run as plain processes (RANK/WORLD_SIZE set by hand, so the test
    can signal each one); returns them once rank 0 has logged step 3."""
    import os
    import subprocess
    import sys

    from relora_dist.runtime.dist import free_port
    from tests.dist_utils import REPO

    args = tiny_overrides(data, run_dir, **{"train.max_steps": 400, "relora.enabled": False, "logging.log_every": 1})
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RELORA_DIST_TIMEOUT_S=str(timeout_s), RELORA_DIST_GRACE_S=str(grace_s))
        procs.append(subprocess.Popen([sys.executable, "launchers/pretrain.py", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    for line in procs[0].stdout:
        if line.startswith("step 3 |"):
            return procs
    raise AssertionError(procs[0].stderr.read()[-2000:])


def _after(procs, fault, timeout_s=20, grace_s=5):
    """Apply `fault` to the pair; rank 0's exit code, seconds until it exited, and stderr."""
    import signal
    import time

    t0 = time.monotonic()
    fault(procs)
    try:
        _, err = procs[0].communicate(timeout=timeout_s + grace_s + 60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait()
    return procs[0].returncode, time.monotonic() - t0, err


def _one_error_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert sum(ln.startswith("error:") for ln in lines) == 1, err[-3000:]
    return next(ln for ln in lines if ln.startswith("error:"))


@pytest.mark.parametrize("fault", ["sigstop", "sigkill"])
@pytest.mark.spawn
def test_a_lost_peer_ends_the_survivor_with_one_line(tiny_data, tmp_path, fault):
    """Rank 1 stopped (SIGSTOP) or killed mid-run: rank 0 exits 3 within RELORA_DIST_TIMEOUT_S
    (every process group is bounded, DeepSpeed's too) plus the few seconds it takes to name the
    peer, with one line naming rank 1 instead of gloo's traceback."""
    import signal

    procs = _launch_pair(tiny_data, tmp_path / "run", timeout_s=15, grace_s=5)
    sig = signal.SIGSTOP if fault == "sigstop" else signal.SIGKILL
    code, seconds, err = _after(procs, lambda ps: ps[1].send_signal(sig))
    line = _one_error_line(err)
    assert code == 3, err[-3000:]
    assert "rank 0: lost its peers (rank 1 stopped answering" in line, line
    assert seconds < 15 + 15, seconds


@pytest.mark.spawn
def test_sigterm_while_blocked_on_a_stopped_peer(tiny_data, tmp_path):
    """Rank 1 stopped, then rank 0 gets SIGTERM while blocked in a collective: it exits 3 after the
    grace period (5 s), long before the 120 s collective timeout, with one line naming rank 1."""
    import signal
    import time

    def fault(ps):
        ps[1].send_signal(signal.SIGSTOP)
        time.sleep(2)
        ps[0].send_signal(signal.SIGTERM)

    procs = _launch_pair(tiny_data, tmp_path / "run", timeout_s=120, grace_s=5)
    code, seconds, err = _after(procs, fault, timeout_s=120)
    line = _one_error_line(err)
    assert code == 3, err[-3000:]
    assert "SIGTERM, but no step finished" in line and "rank 1 stopped answering" in line, line
    assert seconds < 2 + 5 + 15, seconds
