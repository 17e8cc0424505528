"""The entry point as users run it: plain python, the DeepSpeed launcher, torchrun; --init_from."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from relora_dist.runtime.dist import free_port
from tests.dist_utils import LAUNCHERS, REPO, engine, tiny_overrides

pytestmark = pytest.mark.spawn  # every test here starts processes (conftest.py checks it)

RELORA = {"relora.enabled": True, "relora.warm_start_steps": 4, "relora.cycle_length": 4,
          "relora.first_warmup": 1, "relora.restart_warmup": 1, "relora.r": 8, "train.max_steps": 16,
          "train.eval_every": 4, "run.export_warm_start": True}


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _launch(prefix: list[str], args: list[str]) -> str:
    proc = subprocess.run(prefix + ["launchers/pretrain.py", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _evals(stdout: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"^step (\d+) \|.*eval loss ([0-9.]+)", stdout, re.M)}


@pytest.fixture(scope="module")
def single(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    stdout = _launch([sys.executable], tiny_overrides(tiny_data, out, **RELORA))
    return out, stdout


def test_plain_python_runs_all_phases(single):
    out, stdout = single
    assert "switched to ReLoRA" in stdout and "reset 2:" in stdout and "done |" in stdout
    evals = _evals(stdout)
    assert evals[16] < evals[0]
    assert (out / "config.yaml").is_file() and any((out / "tb").iterdir())
    for f in ("config.json", "model.safetensors", "tokenizer.model", "generation_config.json"):
        assert (out / "warm_start" / f).is_file(), f


# FSDP2 users launch with torchrun (torchtitan's way); the DeepSpeed launcher runs the ZeRO backends.
@pytest.mark.parametrize("launcher,backend", [("deepspeed", "zero3"), ("torchrun", "zero3"), ("torchrun", "fsdp2")])
def test_two_process_launchers_match_single_process(single, tiny_data, tmp_path, launcher, backend):
    _, single_stdout = single
    port = str(free_port())
    prefix = LAUNCHERS[launcher] + (["--num_gpus", "2", "--master_port", port] if launcher == "deepspeed"
                                    else ["--nproc_per_node", "2", "--master_port", port, "--master_addr", "127.0.0.1"])
    ds_config, selects = engine(backend)
    stdout = _launch(prefix, tiny_overrides(tiny_data, tmp_path / "run", **RELORA, **selects) + ["--ds_config", ds_config])
    ours, ref = _evals(stdout), _evals(single_stdout)
    assert ours.keys() == ref.keys()
    for step, loss in ref.items():  # printed with 4 decimals
        assert abs(ours[step] - loss) <= 2e-4, (step, ours[step], loss)


def test_init_from_warm_start_folder(single, tiny_data, tmp_path):
    """The exported warm-start folder loads in transformers and starts a ReLoRA-only run whose
    first evaluation equals the original run's evaluation at the switch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, stdout = single
    folder = out / "warm_start"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("In the beginning", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    args = tiny_overrides(tiny_data, tmp_path / "run2", **{**RELORA, "relora.warm_start_steps": 0,
                                                            "train.max_steps": 12})
    stdout2 = _launch([sys.executable], args + ["--init_from", str(folder)])
    assert abs(_evals(stdout2)[0] - _evals(stdout)[4]) <= 1e-4
