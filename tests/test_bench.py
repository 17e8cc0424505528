"""tools/bench.py smoke run (tiny preset, world 2, ZeRO-3) and its byte counters' consistency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from relora_dist import bench
from relora_dist import memory_model as mm

REPO = Path(__file__).resolve().parent.parent
HEADLINE = ("step_time_ratio", "state_bytes_ratio", "grad_bytes_ratio", "trainable_fraction", "reset_over_step")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench.py"), "--preset", "tiny", "--steps", "6", "--stages", "3",
         "--out", str(out), "--cache-dir", str(tmp / "data")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    result["_stdout"] = proc.stdout
    return result


def test_json_has_every_key_and_sane_ratios(smoke):
    for key in HEADLINE:
        assert key in smoke, key
        assert 0 < smoke[key] < 2, (key, smoke[key])
    s = smoke["stages"]["3"]
    for key in HEADLINE + ("state_bytes_per_rank", "rss_per_rank", "comm_bytes_per_step", "reset_s", "merge",
                           "verdicts", "train_extra_false", "step_time_full_rank_s", "step_time_relora_s"):
        assert key in s, key
    assert set(s["reset_s"]) == {"merge", "reinit", "prune", "total"}
    assert set(s["merge"]) == {"shard_local", "allgather_fp32", "gathered_params"}
    for verdict in s["verdicts"].values():
        assert verdict["status"] in ("met", "missed", "not_applicable")
        assert verdict["status"] != "missed" or verdict["reason"]
    for phase in ("full_rank", "relora"):
        for rss in s["rss_per_rank"][phase]:
            assert rss["ru_maxrss_mb"] > 0 and rss["rss_mb"] > 0
    assert smoke["machine"]["torch"] == torch.__version__
    assert "| step time (median, s) |" in smoke["_stdout"]


def test_measured_state_bytes_equal_the_memory_model(smoke):
    rows = mm.validate(smoke)
    assert len(rows) == 3  # full rank, ReLoRA, ReLoRA with train_extra=false
    for row in rows:
        assert abs(row["error_pct"]) < 10, row


def test_grad_bytes_follow_the_trainable_params(smoke):
    s = smoke["stages"]["3"]
    comm = s["comm_bytes_per_step"]
    assert 0 < comm["relora"]["grad_bytes"] < comm["full_rank"]["grad_bytes"]
    # Only trainable params' gradients are reduced: the ratios agree to well under a point.
    assert abs(s["grad_bytes_ratio"] - s["trainable_fraction"]) < 0.01
    te = s["train_extra_false"]
    assert te["grad_bytes_ratio"] < s["grad_bytes_ratio"]
    assert abs(te["grad_bytes_ratio"] - te["trainable_fraction"]) < 0.01
    # ZeRO-3 fetches parameters with all-gathers, counted apart from the gradient reductions.
    assert comm["full_rank"]["param_gather_bytes_forward"] > 0


def test_state_bytes_shrink_where_the_optimizer_state_does(smoke):
    sb = smoke["stages"]["3"]["state_bytes_per_rank"]
    for c in ("grads", "fp32_master", "optimizer_state"):
        assert 0 < sb["relora"][c] < sb["full_rank"][c], c
    assert sb["relora"]["params"] == sb["full_rank"]["params"]  # same model, adapters held in both phases


def test_shard_local_merge_moves_fewer_bytes_than_gather_merges(smoke):
    merge = smoke["stages"]["3"]["merge"]
    local = merge["shard_local"]["bytes_per_rank"]
    assert 0 < local < merge["allgather_fp32"]["bytes_per_rank"] < merge["gathered_params"]["bytes_per_rank"]


def test_payload_convention():
    t = torch.zeros(10)  # 40 bytes
    assert bench._payload("all_reduce", {"tensor": t}) == 40
    assert bench._payload("reduce_scatter_tensor", {"output": torch.zeros(5), "input": t}) == 40
    assert bench._payload("reduce_scatter", {"output": torch.zeros(5), "input_list": [t[:5], t[5:]]}) == 40
    assert bench._payload("all_gather_into_tensor", {"output_tensor": t, "input_tensor": t[:5]}) == 40
    assert bench._payload("all_gather", {"tensor_list": [t[:5], t[5:]], "tensor": t[:5]}) == 40
    assert bench._payload("broadcast", {"tensor": t, "src": 0}) == 40


def test_counter_counts_once_per_outermost_call_and_restores():
    import torch.distributed as dist

    original = dist.all_reduce
    counter = bench.CommCounter().install()
    try:
        assert dist.all_reduce is not original
        inner = counter._wrap("all_reduce", lambda tensor: None)
        outer = counter._wrap("all_reduce", lambda tensor: inner(tensor))
        counter.enabled = True
        with counter.region_as("backward"):
            outer(torch.zeros(4))
        counter.enabled = False
        outer(torch.zeros(4))  # not counted while disabled
        s = counter.summary(1)
        assert s["grad_bytes"] == 16 and s["per_op"]["backward/all_reduce"]["calls"] == 1
    finally:
        counter.uninstall()
    assert dist.all_reduce is original
