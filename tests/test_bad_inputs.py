"""Bad inputs met after start-up: each case exits 2 with one line `error: ...` that names the
problem and the fix, no traceback, and every checkpoint file byte-identical afterwards. The cases
run concurrently; only "corrupt newest shard" and "disk full" get as far as the process group."""

import os
import resource
import signal
import subprocess
import sys

import pytest

from relora_dist.config import load_config
from tests.dist_utils import REPO, fake_checkpoint, tiny_overrides

PRETRAIN, CONVERT, INSPECT = "launchers/pretrain.py", "tools/convert_ckpt.py", "tools/inspect_ckpt.py"


def _disk_full():  # writes past 1 MiB fail with EFBIG, as on a full disk (the process survives)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def _cases(tmp, data):
    """{name: (argv, expected text, checkpoint folder or None, preexec)}; builds the inputs."""
    cases = {}
    empty = tmp / "empty.txt"
    empty.write_text("")
    cases["empty corpus"] = ([PRETRAIN, f"--data.sources={empty}", f"--run.output_dir={tmp / 'e'}"],
                             "is empty (0 bytes)", None, None)
    for label, content in (("list", "[]"), ("version only", '{"format_version": 1}')):
        run = tmp / f"manifest-{label.replace(' ', '-')}"
        args = tiny_overrides(data, run)
        ckpt = fake_checkpoint(run / "checkpoints", 2, load_config(None, args))
        (ckpt / "manifest.json").write_text(content)
        expected = "holds a JSON list" if content == "[]" else "lacks global_step"
        cases[f"manifest {label}: pretrain"] = ([PRETRAIN, *args], expected, ckpt, None)
        cases[f"manifest {label}: convert"] = ([CONVERT, str(ckpt), str(tmp / f"hf-{label}")], expected, ckpt, None)
        cases[f"manifest {label}: inspect"] = ([INSPECT, str(ckpt)], expected, ckpt, None)
        cases[f"manifest {label}: inspect --verify"] = ([INSPECT, str(ckpt), "--verify"], expected, ckpt, None)
    run = tmp / "garbage-config"
    args = tiny_overrides(data, run)
    ckpt = fake_checkpoint(run / "checkpoints", 2, load_config(None, args))
    (ckpt / "config.yaml").write_text("{{{ :")
    cases["garbage config.yaml in checkpoint"] = ([PRETRAIN, *args], "config.yaml is damaged", ckpt, None)
    ckpt = fake_checkpoint(tmp / "deleted" / "checkpoints", 2, load_config(None, []))
    (ckpt / "rank00000.safetensors").unlink()
    cases["inspect on a deleted shard"] = ([INSPECT, str(ckpt)], "rank00000.safetensors is missing", ckpt, None)
    run = tmp / "corrupt"
    args = tiny_overrides(data, run)
    ckpt = fake_checkpoint(run / "checkpoints", 2, load_config(None, args))
    shard = ckpt / "rank00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    cases["corrupt newest shard"] = ([PRETRAIN, *args], "--checkpoint.resume=previous (the newest that verifies)",
                                     ckpt, None)
    run = tmp / "full"
    cases["disk full during save"] = (
        [PRETRAIN, *tiny_overrides(data, run, **{"train.max_steps": 2, "relora.enabled": False,
                                                 "logging.tensorboard": False})],
        "saving the checkpoint of step 2 failed on rank 0 (", None, _disk_full)
    return cases


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder else {}


@pytest.fixture(scope="module")
def results(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    cases = _cases(tmp, tiny_data)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = {}
    for name, (argv, _, ckpt, preexec) in cases.items():
        procs[name] = (subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, preexec_fn=preexec),
                       _snapshot(ckpt))
    done = {}
    for name, (p, before) in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        done[name] = (p.returncode, stdout, stderr, before, _snapshot(cases[name][2]), cases[name][1])
    return tmp, done


CASE_NAMES = ["empty corpus", *(f"manifest {label}: {tool}" for label in ("list", "version only")
                                for tool in ("pretrain", "convert", "inspect", "inspect --verify")),
              "garbage config.yaml in checkpoint", "inspect on a deleted shard", "corrupt newest shard",
              "disk full during save"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_one_line_error_exit_2_nothing_lost(results, case):
    _, done = results
    code, stdout, stderr, before, after, expected = done[case]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, (code, stdout[-2000:], stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines and lines[-1].startswith("error: ") and expected in lines[-1], stderr[-2000:]
    assert sum(ln.startswith("error:") for ln in lines) == 1
    assert after == before  # the checkpoint is untouched


def test_disk_full_publishes_nothing(results):
    tmp, _ = results
    root = tmp / "full" / "checkpoints"
    assert not root.exists() or not list(root.iterdir())
