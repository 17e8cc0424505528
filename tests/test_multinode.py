"""Multi-node launches on one machine, rendezvousing over loopback (gloo, CPU).

* Two separate `torchrun --nnodes 2 --node_rank {0,1} --nproc_per_node 1` launches train the tiny
  preset through the switch, a ReLoRA reset and two checkpoints; the printed evaluations and the
  checkpoints (manifest counters, every tensor of every rank's shards) equal a single-node
  `torchrun --nproc_per_node 2` run.
* `launchers/slurm.sbatch` runs the same two-node job through a stand-in `srun`/`scontrol`.
* Bad input fails fast with one `error:` line: an allocation or hostfile whose process count
  disagrees with the batch arithmetic, and a rendezvous whose peer never comes (bounded by
  RELORA_DIST_TIMEOUT_S, never a hang).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from relora_dist.runtime.dist import free_port
from tests.dist_utils import LAUNCHERS, REPO, tiny_overrides

RUN = {"relora.enabled": True, "relora.warm_start_steps": 4, "relora.cycle_length": 4,
       "relora.first_warmup": 1, "relora.restart_warmup": 1, "relora.r": 8, "train.max_steps": 12,
       "train.eval_every": 4, "checkpoint.save_every": 6}
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GPUS_PER_NODE", "RELORA_DIST_TIMEOUT_S")
TIMEOUT_S = 5  # rendezvous bound in the failure tests
BOUND_S = 60   # they must end well within this (imports on a loaded 2-core machine included)

SRUN = r"""#!/usr/bin/env bash
# stand-in for srun: run the command once per node on this machine, SLURM_NODEID = 0..N-1
echo "$@" >> "$FAKE_SRUN_LOG"
n=1
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in --nodes=*) n="${1#--nodes=}" ;; esac
  shift
done
pids=()
for ((i = 0; i < n; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
SCONTROL = r"""#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && tr ',' '\n' <<< "$3"
"""


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"hung past {timeout}s: {out[-2000:]} {err[-2000:]}")
    return proc.returncode, out, err


def _ok(proc: subprocess.Popen) -> str:
    code, out, err = _finish(proc)
    assert code == 0, out[-3000:] + err[-3000:]
    return out


def _evals(stdout: str) -> dict[int, str]:
    """step -> eval loss exactly as printed."""
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^step (\d+) \|.*eval loss ([0-9.]+)", stdout, re.M)}


def _torchrun(nnodes: int, nproc: int, node_rank: int, port: int, args: list[str], *extra: str) -> list[str]:
    return [*LAUNCHERS["torchrun"], "--nnodes", str(nnodes), "--nproc_per_node", str(nproc), "--node_rank", str(node_rank),
            "--rdzv_backend", "static", "--master_addr", "127.0.0.1", "--master_port", str(port), *extra,
            "launchers/pretrain.py", *args]


def _fake_slurm(tmp: Path) -> tuple[dict[str, str], Path]:
    bin_dir, log = tmp / "bin", tmp / "srun.log"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(PATH=path, FAKE_SRUN_LOG=str(log), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="127.0.0.1", SLURM_SUBMIT_DIR=str(REPO), RELORA_PYTHON=sys.executable)
    return env, log


def _start_failures(tiny_data, tmp: Path) -> tuple[dict[str, subprocess.Popen], Path]:
    """Every failing launch (each must end by itself well within BOUND_S) and a passing pre-flight."""
    args = lambda name: tiny_overrides(tiny_data, tmp / name)  # noqa: E731
    rdzv = dict(RELORA_DIST_TIMEOUT_S=str(TIMEOUT_S), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    tmp.mkdir(parents=True, exist_ok=True)
    hostfile = tmp / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # world size 2: 12 % (4 x 2) != 0
    slurm_env, srun_log = _fake_slurm(tmp / "slurm")
    return {
        "rank 0 alone": _start([sys.executable, "launchers/pretrain.py", *args("r0")],
                               _env(**rdzv, RANK="0", MASTER_PORT=str(free_port()))),
        "rank 1 alone": _start([sys.executable, "launchers/pretrain.py", *args("r1")],
                               _env(**rdzv, RANK="1", MASTER_PORT=str(free_port()))),
        "torchrun node 0 alone": _start(_torchrun(2, 1, 0, free_port(), args("t0"), "--rdzv_conf",
                                                  f"timeout={TIMEOUT_S}"), _env()),
        "hostfile": _start([*LAUNCHERS["deepspeed"], "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "0",
                            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                            "launchers/pretrain.py", *args("hf"), "--train.global_batch_size=12"], _env()),
        "sbatch": _start(["bash", "launchers/slurm.sbatch", *args("sb")],
                         _env(**slurm_env, SLURM_GPUS_PER_NODE="a100:3")),  # 2 nodes x 3 = 6
        "pre-flight ok": _start([sys.executable, "launchers/pretrain.py", "--dry_run", *args("ok")],
                                _env(WORLD_SIZE="2", RANK="0")),
    }, srun_log


PROBE = r"""import os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank())])
dist.all_reduce(total)
print(f"probe rank={os.environ['RANK']} local_rank={os.environ['LOCAL_RANK']} world={dist.get_world_size()} "
      f"master={os.environ['MASTER_ADDR']} rank_sum={int(total.item())} argv={sys.argv[1:]}", flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """The single-node reference, then the two separate node launches; then the sbatch script with
    a stand-in srun and a probe in place of the trainer (the trainer's two-node run is above)."""
    tmp = tmp_path_factory.mktemp("multinode")
    ref_out, two_out = tmp / "single", tmp / "two_nodes"
    port = free_port()
    t0 = time.monotonic()
    single = _ok(_start(_torchrun(1, 2, 0, port, tiny_overrides(tiny_data, ref_out, **RUN)), _env()))
    t1 = time.monotonic()
    nodes = [_start(_torchrun(2, 1, r, port, tiny_overrides(tiny_data, two_out, **RUN)), _env()) for r in (0, 1)]
    node_stdout = [_ok(p) for p in nodes]
    t2 = time.monotonic()
    (tmp / "probe.py").write_text(PROBE)
    slurm_env, srun_log = _fake_slurm(tmp)
    job = _start(["bash", "launchers/slurm.sbatch", "--train.max_steps=3", "--run.output_dir=x y"],
                 _env(**slurm_env, GPUS_PER_NODE="1", MASTER_PORT=str(free_port()), RELORA_PREFLIGHT="0",
                      RELORA_LAUNCHER=str(tmp / "probe.py")))
    slurm = _ok(job)
    print(f"single node {t1 - t0:.1f}s, two nodes {t2 - t1:.1f}s, sbatch {time.monotonic() - t2:.1f}s")
    return {"single": (ref_out, single), "two": (two_out, node_stdout[0]), "node1_stdout": node_stdout[1],
            "slurm": slurm, "srun_log": srun_log.read_text()}


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    from relora_dist.checkpoint.format import ShardReader, consolidated_state_dict

    ra, rb = ShardReader(a), ShardReader(b)
    ma, mb = ra.manifest, rb.manifest
    for key in ("global_step", "restart_index", "phase", "world_size", "zero_stage", "tokens_seen",
                "cumulative_rank", "data_loader", "adam_step", "adapters_active"):
        assert ma[key] == mb[key], (key, ma[key], mb[key])
    assert ma["tensors"] == mb["tensors"]  # names, shapes, which rank holds which range
    for name, meta in ma["tensors"].items():
        for field in meta["fields"]:
            torch.testing.assert_close(ra.full(name, field), rb.full(name, field), rtol=0, atol=1e-6,
                                       msg=f"{name}.{field}")
    sa, sb = consolidated_state_dict(ra), consolidated_state_dict(rb)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=k)


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


@pytest.mark.spawn
def test_two_node_launch_equals_single_node_run(runs):
    (ref_out, single), (two_out, two) = runs["single"], runs["two"]
    assert "switched to ReLoRA" in two and "reset 1:" in two and "done |" in two
    assert _evals(two) == _evals(single) and len(_evals(single)) == 4  # steps 0, 4, 8, 12, as printed
    assert "error" not in runs["node1_stdout"].lower()
    assert _checkpoints(two_out) == _checkpoints(ref_out) == ["step_00000006", "step_00000012"]
    for step in _checkpoints(ref_out):  # mid-ReLoRA (before the reset) and final (after it)
        _assert_same_checkpoint(ref_out / "checkpoints" / step, two_out / "checkpoints" / step)
    from relora_dist.checkpoint.format import read_manifest
    final = read_manifest(two_out / "checkpoints" / "step_00000012")
    assert final["global_step"] == 12 and final["restart_index"] == 1 and final["world_size"] == 2


@pytest.mark.spawn
def test_sbatch_starts_one_torchrun_per_node_into_one_world(runs):
    """Two stand-in nodes, one torchrun each: one world of 2 ranks rendezvousing at the first node,
    the script's arguments passed through unchanged."""
    slurm = runs["slurm"]
    assert "2 nodes x 1 processes = world size 2; rendezvous 127.0.0.1:" in slurm
    # two processes write concurrently: a probe line may start mid-line, so match up to "]"
    probes = sorted(m.strip() for m in re.findall(r"probe (rank=.*?\])", slurm))
    args = "argv=['--train.max_steps=3', '--run.output_dir=x y']"
    assert probes == [f"rank={r} local_rank=0 world=2 master=127.0.0.1 rank_sum=1 {args}" for r in (0, 1)], slurm
    srun = runs["srun_log"]
    assert "--nodes=2" in srun and "--ntasks-per-node=1" in srun and "torchrun" in srun and "--node_rank" in srun


# --- bad input ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def failures(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failures")
    procs, srun_log = _start_failures(tiny_data, tmp)
    t0 = time.monotonic()
    done = {}
    for name, p in procs.items():
        code, out, err = _finish(p, timeout=BOUND_S * 2)
        done[name] = (code, out, err, time.monotonic() - t0)
    done["srun called"] = srun_log.exists()
    done["tmp"] = tmp
    return done


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


@pytest.mark.parametrize("case, out_dir", [("rank 0 alone", "r0"), ("rank 1 alone", "r1")])
@pytest.mark.spawn
def test_unreachable_rendezvous_fails_within_timeout(failures, case, out_dir):
    code, out, err, elapsed = failures[case]
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert elapsed < BOUND_S
    line = _one_error_line(err)
    assert err.rstrip().endswith(line)  # the last thing said, one line
    assert "could not join the process group at 127.0.0.1:" in line and f"RELORA_DIST_TIMEOUT_S={TIMEOUT_S}" in line
    assert not (failures["tmp"] / out_dir).exists()  # nothing written


@pytest.mark.spawn
def test_torchrun_node_whose_peer_never_comes_fails_within_timeout(failures):
    code, out, err, elapsed = failures["torchrun node 0 alone"]
    assert code != 0 and elapsed < BOUND_S
    assert "waiting for clients" in out + err  # torch's agent: "Timed out after N seconds waiting for clients"


@pytest.mark.spawn
def test_hostfile_disagreeing_with_batch_fails_fast(failures):
    code, out, err, elapsed = failures["hostfile"]
    assert code != 0 and elapsed < BOUND_S
    line = _one_error_line(err)
    assert "train.global_batch_size=12 is not divisible by train.micro_batch_size=4 x world size 2" in line


@pytest.mark.spawn
def test_slurm_allocation_disagreeing_with_batch_fails_before_srun(failures):
    code, out, err, elapsed = failures["sbatch"]
    assert code == 2 and elapsed < BOUND_S
    assert "2 nodes x 3 processes = world size 6" in out
    line = _one_error_line(err)
    assert "x world size 6" in line and err.rstrip().endswith(line)
    assert not failures["srun called"]  # no node was started


@pytest.mark.spawn
def test_preflight_dry_run_passes_and_writes_nothing(failures):
    code, out, err, elapsed = failures["pre-flight ok"]
    assert code == 0, err[-2000:]
    assert "ok: world size 2, global batch 8 = micro batch 4 x 2 ranks x 1 accumulation steps" in out
    assert not (failures["tmp"] / "ok").exists()
