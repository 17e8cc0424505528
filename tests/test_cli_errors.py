"""`python launchers/pretrain.py` with bad inputs: exit code 2, a one-line `error: ...` on stderr that
names the key, and nothing written (no run directory, no data cache). Every case fails before the
process group starts, so each takes only the import time; they run concurrently."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CASES = {
    "unknown key": (["--train.max_step=3"], "'train.max_step'", {}),
    "override without value": (["--relora.r=8", "--train.max_steps"], "--train.max_steps", {}),
    "missing data source": (["--data.sources=/no/such/corpus.jsonl"], "data.sources", {}),
    "restart warmup >= cycle length": (["--relora.restart_warmup", "50"], "relora.restart_warmup=50", {}),
    "r too large": (["--relora.r=512"], "relora.r=512", {}),
    "target matches nothing": (["--relora.targets=attn\\.query$"], "relora.targets", {}),
    "ds batch contradiction": (["--ds_config", "{ds}"], "train_batch_size=7", {}),
    "batch vs WORLD_SIZE": ([], "world size 4", {"WORLD_SIZE": "4"}),
    "fsdp2 batch vs WORLD_SIZE": (["--parallel.backend=fsdp2"], "world size 4", {"WORLD_SIZE": "4"}),
    "fsdp2 with ZeRO offload": (["--parallel.backend=fsdp2", "--ds_config", "ds_configs/zero3_offload.json"],
                                "'zero_optimization.offload_optimizer'", {}),
    "fsdp2 with a DeepSpeed-only key": (["--parallel.backend=fsdp2", "--ds_config", "{ds_extra}"],
                                        "'activation_checkpointing'", {}),
    "fsdp2 with relora.phase_stage": (["--parallel.backend=fsdp2", "--relora.phase_stage=3"],
                                      "relora.phase_stage=3", {}),
    "fsdp2 with a quantized base": (["--parallel.backend=fsdp2", "--relora.base_quant=nf4"],
                                    "relora.base_quant=nf4 is not supported under parallel.backend=fsdp2", {}),
    "unknown backend": (["--parallel.backend=fsdp"], "parallel.backend='fsdp'", {}),
    "backend vs ZeRO stage": (["--parallel.backend=zero3"], "zero_optimization.stage=2", {}),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    ds = tmp / "ds_batch.json"
    ds.write_text(json.dumps({"train_batch_size": 7, "zero_optimization": {"stage": 2}}))
    ds_extra = tmp / "ds_extra.json"
    ds_extra.write_text(json.dumps({"zero_optimization": {"stage": 2}, "activation_checkpointing": {}}))
    procs = {}
    for i, (name, (args, _, env_extra)) in enumerate(CASES.items()):
        out, cache = tmp / f"run{i}", tmp / f"cache{i}"
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **env_extra)
        argv = [a.replace("{ds}", str(ds)).replace("{ds_extra}", str(ds_extra)) for a in args]
        cmd = [sys.executable, "launchers/pretrain.py", *argv, f"--run.output_dir={out}", f"--data.cache_dir={cache}"]
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True), out, cache)
    done = {}
    for name, (p, out, cache) in procs.items():
        stdout, stderr = p.communicate(timeout=300)  # a hang guard: 15 at once on 2 busy cores took > 60 s
        done[name] = (p.returncode, stdout, stderr, out, cache)
    return done


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.spawn
def test_bad_input_exits_2_with_one_line_error(case, results):
    code, stdout, stderr, out, cache = results[case]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, (code, stdout[-2000:], stderr[-2000:])
    assert lines and lines[-1].startswith("error: "), stderr[-2000:]
    assert CASES[case][1] in lines[-1], lines[-1]
    assert sum(ln.startswith("error:") for ln in lines) == 1
    assert not out.exists() and not cache.exists()  # losing nothing: no run directory, no data prepared
