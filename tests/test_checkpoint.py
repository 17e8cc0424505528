"""Sharded checkpoints: exact resume, resharding across world sizes and ZeRO stages, bad input."""

import json

import pytest
import torch

from relora_dist.checkpoint.format import CheckpointError, ShardReader, find_latest, read_manifest
from tests.dist_utils import engine, run_world, tiny_overrides

pytestmark = pytest.mark.spawn  # every test here starts processes (conftest.py checks it)

RUN = {"relora.enabled": True, "relora.warm_start_steps": 4, "relora.cycle_length": 4,
       "relora.first_warmup": 1, "relora.restart_warmup": 1, "relora.r": 8, "relora.alpha": 16,
       "train.max_steps": 16, "relora.optimizer_reset": "random", "relora.prune_ratio": 0.5}
# Resets follow steps 9 and 13 (1-based counts); stops: before the switch (3), between the switch
# and the first reset (6), right after a reset (9).
STOPS = (3, 6, 9)


def _overrides(data, run_dir, precision, **extra):
    return tiny_overrides(data, run_dir, **{**RUN, "train.precision": precision, **extra})


def _straight_and_resumed(data, tmp, world, stage, precision):
    ds_config, selects = engine(stage)
    straight = run_world(world, "relora_run", _overrides(data, tmp / "straight", precision, **selects), tmp / "s",
                         ds_config=ds_config)
    pieces, run_dir = [], tmp / "resumed"
    for i, stop in enumerate((*STOPS, None)):
        extra = {"checkpoint.resume": "auto"} if i else {}
        pieces.append(run_world(world, "relora_run", _overrides(data, run_dir, precision, **extra, **selects),
                                tmp / f"r{i}", ds_config=ds_config, stop_at=stop))
    return straight, pieces, run_dir


# zero2-bf16: sharded fp32 merge masters under ZeRO-2; zero3-bf16: ZeRO-3 shards; zero2-fp32: none;
# fsdp2-bf16: fp32 row shards that are their own merge masters.
@pytest.fixture(scope="module", params=[("zero2", "fp32"), ("zero3", "bf16"), ("zero2", "bf16"), ("fsdp2", "bf16")],
                ids=lambda p: "-".join(p))
def resumed(request, tiny_data, tmp_path_factory):
    stage, precision = request.param
    tmp = tmp_path_factory.mktemp(f"resume-{stage}-{precision}")
    return (stage, precision, *_straight_and_resumed(tiny_data, tmp, 2, stage, precision))


def test_resume_is_bit_identical(resumed):
    """N steps straight vs stop/resume at 3, 6 and 9: every logged loss and LR bit-identical, and
    the final merged weights too."""
    _, _, straight, pieces, _ = resumed
    for rank in range(2):
        losses = torch.cat([p[rank]["losses"] for p in pieces])
        steps = torch.cat([p[rank]["steps"] for p in pieces])
        assert steps.tolist() == list(range(1, 17))
        assert torch.equal(losses, straight[rank]["losses"])
        assert torch.equal(torch.cat([p[rank]["lrs"] for p in pieces]), straight[rank]["lrs"])
        for name, w in straight[rank]["state_dict"].items():
            assert torch.equal(pieces[-1][rank]["state_dict"][name], w), name
    assert pieces[-1][0]["restart_index"] == straight[0]["restart_index"] == 2


def test_manifest_records_relora_state(resumed):
    stage, _, _, _, run_dir = resumed
    root = run_dir / "checkpoints"
    latest = find_latest(root)
    assert latest.name == "step_00000016"
    kept = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
    assert len(kept) <= 3  # checkpoint.keep_last
    m = read_manifest(root / "step_00000009")
    assert m["phase"] == "relora" and m["restart_index"] == 1 and m["global_step"] == 9
    assert m["cumulative_rank"]["per_module"] and all(v == 16 for v in m["cumulative_rank"]["per_module"].values())
    assert m["world_size"] == 2 and m["backend"] == stage
    if stage != "fsdp2":
        assert m["zero_stage"] == int(stage[-1])
    assert m["data_loader"] == {"epoch": 0, "step_in_epoch": 9}
    # Adam step: 4 warm-start steps carried across the switch (relora.carry_optimizer_state=auto) + 5
    assert m["tokens_seen"] == 9 * 8 * 32 and m["adam_step"] == 9
    assert {f["file"] for f in m["files"]} == {"rank00000.safetensors", "rank00001.safetensors"}
    w = m["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert w["trainable"] is False and {r for r, _, _ in w["fields"]["weight"]} == {0, 1}
    assert (root / "step_00000009" / "config.yaml").is_file()
    assert (root / "step_00000009" / "tokenizer" / "tokenizer.model").is_file()


RESHARD = {"2to1": (2, "zero3", 1, "zero2"), "1to2": (1, "zero2", 2, "zero3"),
           "zero2-1to-fsdp2-2": (1, "zero2", 2, "fsdp2"), "fsdp2-2to-zero2-1": (2, "fsdp2", 1, "zero2")}


@pytest.mark.parametrize("direction", list(RESHARD))
def test_resharding_world_size_and_zero_stage(tiny_data, tmp_path, direction):
    """A checkpoint right after a reset resumes at another world size AND engine; the
    remaining losses match the uninterrupted run within 1e-4 (fp32; reduction order differs)."""
    src_world, src_stage, dst_world, dst_stage = RESHARD[direction]
    (src_ds, src_sel), (dst_ds, dst_sel) = engine(src_stage), engine(dst_stage)
    straight = run_world(src_world, "relora_run", _overrides(tiny_data, tmp_path / "s", "fp32", **src_sel),
                         tmp_path / "s0", ds_config=src_ds)
    run_dir = tmp_path / "r"
    run_world(src_world, "relora_run", _overrides(tiny_data, run_dir, "fp32", **src_sel), tmp_path / "r0",
              ds_config=src_ds, stop_at=9)
    after = run_world(dst_world, "relora_run", _overrides(tiny_data, run_dir, "fp32", **{"checkpoint.resume": "auto",
                                                                                         **dst_sel}),
                      tmp_path / "r1", ds_config=dst_ds)
    assert after[0]["steps"].tolist() == list(range(10, 17))
    torch.testing.assert_close(after[0]["losses"], straight[0]["losses"][9:], rtol=1e-4, atol=1e-4)
    for name, w in straight[0]["state_dict"].items():
        torch.testing.assert_close(after[0]["state_dict"][name], w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("world,stage,extra", [(1, "zero3", {}), (2, "zero2", {"relora.phase_stage": "3"})],
                         ids=["1rank-zero3", "2ranks-zero2-phase3"])
def test_sharded_merge_masters_reshard_exactly(resumed, tiny_data, tmp_path, world, stage, extra):
    """A checkpoint whose fp32 merge masters were written as ZeRO-2 rank slices (or ZeRO-3 shards)
    loads into another layout: every rank's restored master slice is bitwise its part of the
    checkpoint's full merge master, and the restored compute weights are that master rounded."""
    src_stage, precision, _, _, run_dir = resumed
    if precision != "bf16" or src_stage == "fsdp2":
        pytest.skip("fp32 compute and FSDP2 keep no separate merge masters")
    ckpt = run_dir / "checkpoints" / "step_00000009"
    overrides = _overrides(tiny_data, tmp_path / "run", "bf16", **{"checkpoint.resume": str(ckpt), **extra})
    results = run_world(world, "loaded_masters", overrides, tmp_path / "out", ds_config=f"ds_configs/{stage}.json")
    reader = ShardReader(ckpt)
    for name, full in results[0]["masters"].items():
        expected = reader.full(f"{name}.weight", "merge_master").reshape(-1)
        assert torch.equal(full, expected), name
        assert torch.equal(results[0]["weights"][name], expected.bfloat16().float()), name
    assert all(r["master_numel"] * world <= sum(r["wrapped_numels"]) + world * len(r["wrapped_numels"])
               for r in results)


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["missing", "truncate", "flip"])
def test_damaged_shard_is_named(resumed, tmp_path, how):
    import shutil

    _, _, _, _, run_dir = resumed
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoints" / "step_00000009", ckpt)
    shard = ckpt / "rank00001.safetensors"
    if how == "missing":
        shard.unlink()
    else:
        _corrupt(shard, how)
    with pytest.raises(CheckpointError, match="rank00001.safetensors") as e:
        ShardReader(ckpt)
    assert "\n" not in str(e.value)


def test_newer_format_version_is_refused(resumed, tmp_path):
    import shutil

    _, _, _, _, run_dir = resumed
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoints" / "step_00000009", ckpt)
    m = json.loads((ckpt / "manifest.json").read_text())
    m["format_version"] = 99
    (ckpt / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="format_version 99"):
        read_manifest(ckpt)


def _launch(args, timeout=300):
    import os
    import subprocess
    import sys

    from tests.dist_utils import REPO

    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "launchers/pretrain.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_other_runs_checkpoints_are_refused_and_kept(resumed, tiny_data):
    """A different run (other r) into the same output_dir, or an explicit fresh start, is refused
    before any work with a one-line error; the existing checkpoints are untouched."""
    _, precision, _, _, run_dir = resumed
    root = run_dir / "checkpoints"
    before = {p.name: (p / "manifest.json").read_bytes() for p in root.iterdir() if p.name.startswith("step_")}
    for extra in ({"relora.r": 4}, {"checkpoint.resume": ""}):
        proc = _launch(_overrides(tiny_data, run_dir, precision, **extra))
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and "checkpoint" in last
    after = {p.name: (p / "manifest.json").read_bytes() for p in root.iterdir() if p.name.startswith("step_")}
    assert after == before


@pytest.mark.parametrize("backend", ["zero2", "fsdp2"])
def test_sigterm_saves_and_exits_cleanly_then_resumes(tiny_data, tmp_path, backend):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.dist_utils import REPO

    run_dir = tmp_path / "run"
    _, selects = engine(backend)
    args = _overrides(tiny_data, run_dir, "fp32", **{"train.max_steps": 400, "relora.cycle_length": 4,
                                                     "logging.log_every": 1, **selects})
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "launchers/pretrain.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 6 |") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: checkpoint saved" in out
    latest = find_latest(run_dir / "checkpoints")
    m = read_manifest(latest)
    assert 6 <= m["global_step"] < 400
    # the rerun of the same command continues from there (checkpoint.resume=auto by default)
    proc2 = _launch(args + ["--logging.log_every=1000"], timeout=600)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert f"resumed from {latest}" in proc2.stdout


def test_export_to_hugging_face(resumed, tmp_path):
    """convert_ckpt consolidates the final checkpoint (2 ranks' shards), merges the live adapters,
    and writes a folder that transformers loads; its logits equal the live training model's
    (adapters unmerged, read on rank 0 at the end of the run) within 1e-4 (fp32) / 2e-2 (bf16
    compute in training), and its tokenizer gives the training tokenizer's ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from relora_dist.data.tokenizer import load_tokenizer
    from tools.convert_ckpt import main as convert_main
    from tools.inspect_ckpt import summary

    _, precision, straight, pieces, run_dir = resumed
    ckpt = run_dir / "checkpoints"
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        assert convert_main([str(ckpt), str(out), "--dtype", dtype]) == 0
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.dtype == (torch.float32 if dtype == "fp32" else torch.bfloat16)
        batch = pieces[-1][0]["logits_batch"]
        with torch.no_grad():
            logits = model.float()(input_ids=batch).logits
        tol = 1e-4 if precision == "fp32" and dtype == "fp32" else 5e-2
        torch.testing.assert_close(logits, pieces[-1][0]["logits"], rtol=tol, atol=tol)
        tok = AutoTokenizer.from_pretrained(out)
        text = "In the beginning God created the heaven and the earth.\n"
        assert tok(text, add_special_tokens=False).input_ids == load_tokenizer(str(out)).encode(text)
        ids = tok("And God said", return_tensors="pt").input_ids
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    assert convert_main([str(ckpt), str(tmp_path / "fp32")]) == 2  # non-empty out_dir is refused
    text = summary(ckpt, verify=True)
    assert "step           16" in text and "restart index  2" in text and "sha256 verified" in text
