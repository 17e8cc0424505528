"""Runs must not change one another's output, or their own inputs silently: the output_dir lock,
relora-prepare-data into a folder a run reads, data/tokenizer fingerprints on resume, the timeline
of checkpoints after resuming an older one, retention of the best and the last clean checkpoint,
SIGINT and SIGHUP handled like SIGTERM. One live 1-rank run is shared by the lock, SIGINT,
fingerprint-recording and timeline cases."""

import json
import lzma
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from relora_dist.checkpoint.format import find_latest, list_checkpoints, read_manifest, remove_stale_temporaries
from tests.dist_utils import REPO, fake_checkpoint, tiny_overrides


def _env(**extra):
    return dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def _launch(args, **env):
    return subprocess.Popen([sys.executable, "launchers/pretrain.py", *args], cwd=REPO, env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, prefix):
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(proc.stderr.read()[-3000:])


def _one_line(err):
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


LIVE = {"train.max_steps": 400, "relora.enabled": False, "logging.log_every": 1, "checkpoint.save_every": 2,
        "checkpoint.keep_last": 2}


@pytest.fixture(scope="module")
def live(tiny_data, tmp_path_factory):
    """A 1-rank run past its second save; meanwhile a second launch into its output_dir (plain and
    --checkpoint.resume=auto); then SIGINT. Returns the run dir, the second launches' results, and
    the first run's exit code, output and the step it stopped at."""
    run_dir = tmp_path_factory.mktemp("live") / "run"
    args = tiny_overrides(tiny_data, run_dir, **LIVE)
    first = _launch(args)
    try:
        _wait_for(first, "step 5 |")
        before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        seconds = [subprocess.run([sys.executable, "launchers/pretrain.py", *args, *extra], cwd=REPO, env=_env(),
                                  capture_output=True, text=True, timeout=120)
                   for extra in ([], ["--checkpoint.resume=auto"])]
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    stopped = int(next(ln for ln in out.splitlines() if "checkpoint saved, exiting" in ln).split()[1])
    return {"dir": run_dir, "args": args, "seconds": seconds, "before": before, "pid": first.pid,
            "code": first.returncode, "out": out, "err": err, "stopped": stopped}


@pytest.mark.spawn
def test_a_second_run_into_a_live_output_dir_is_refused(live):
    for proc in live["seconds"]:
        line = _one_line(proc.stderr)
        assert proc.returncode == 2, proc.stderr
        assert f"in use by another run (pid {live['pid']} on host {socket.gethostname()}" in line, line
    assert live["before"][-1].startswith("step_") and "latest" in live["before"]


@pytest.mark.spawn
def test_sigint_saves_and_exits_0(live):
    assert live["code"] == 0, live["err"][-3000:]
    assert "Traceback" not in live["err"] and "KeyboardInterrupt" not in live["err"], live["err"][-3000:]
    assert f"step {live['stopped']} | SIGINT: checkpoint saved, exiting cleanly" in live["out"]
    root = live["dir"] / "checkpoints"
    assert find_latest(root).name == f"step_{live['stopped']:08d}"


@pytest.mark.spawn
def test_the_manifest_records_fingerprints_streak_and_eval(live):
    from relora_dist.config import load_config
    from relora_dist.runtime.run_guard import run_fingerprints

    m = read_manifest(find_latest(live["dir"] / "checkpoints"))
    assert m["fingerprints"] == run_fingerprints(load_config(None, live["args"]))
    assert m["skipped_in_a_row"] == 0 and m["eval_loss"] is None  # no eval at that step


@pytest.mark.spawn
def test_resuming_an_older_checkpoint_abandons_the_newer_ones(live):
    """Resume the older of the two kept checkpoints: the newer one moves into abandoned-*/, the
    checkpoint just written is kept and `latest` names it; a plain relaunch would continue it."""
    root = live["dir"] / "checkpoints"
    older, newer = list_checkpoints(root)
    step = int(older.name[5:])
    proc = subprocess.run([sys.executable, "launchers/pretrain.py", *live["args"], f"--checkpoint.resume={older}",
                           f"--train.max_steps={step + 1}"], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"abandons the newer {newer.name}" in proc.stdout
    aside = [p for p in root.iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and (aside[0] / newer.name / "manifest.json").is_file()
    assert [p.name for p in list_checkpoints(root)] == [older.name, f"step_{step + 1:08d}"]
    assert find_latest(root).name == f"step_{step + 1:08d}" == (root / "latest").read_text().strip()


# --- relora-prepare-data into a folder a run reads -------------------------------------------------------------
def _prepare(out, *extra):
    main = "import sys; from relora_dist.tools.prepare_data import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", main, "--out", str(out), "--seq_len", "32", *extra], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.spawn
def test_prepare_data_never_rewrites_a_folder_in_use(tmp_path):
    """A reader holds train.bin memory-mapped while --out is prepared again: the same inputs are a
    no-op (exit 0), other inputs are refused (exit 2, one line) unless --overwrite, which swaps the
    folder by renames, so the reader keeps its old bytes (before: train.bin truncated, SIGBUS)."""
    out = tmp_path / "d"
    assert _prepare(out).returncode == 0
    reader = subprocess.Popen(
        [sys.executable, "-c", "import numpy as np, sys; a = np.memmap(sys.argv[1], mode='r', dtype=np.uint16); "
         "s = int(a.sum()); print('ready', flush=True); sys.stdin.readline(); print(int(a.sum()) == s)",
         str(out / "train.bin")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "ready"
    first = (out / "meta.json").read_text()
    same = _prepare(out)
    assert same.returncode == 0 and "already holds this preparation" in same.stderr
    assert (out / "meta.json").read_text() == first
    from relora_dist.data import DEFAULT_CORPUS  # inputs are known by content: a copy elsewhere is the same
    copy = tmp_path / "elsewhere" / Path(DEFAULT_CORPUS).name
    copy.parent.mkdir()
    shutil.copy(DEFAULT_CORPUS, copy)
    assert "already holds this preparation" in _prepare(out, "--input", str(copy)).stderr
    copy.write_bytes(lzma.compress(lzma.decompress(copy.read_bytes()) + b'{"text": "one more document"}\n'))
    changed = _prepare(out, "--input", str(copy))
    assert changed.returncode == 2 and "source_identity differ" in changed.stderr
    shutil.rmtree(copy.parent)
    other = _prepare(out, "--seed", "1")
    assert other.returncode == 2 and "seed differ" in _one_line(other.stderr) and "--overwrite" in other.stderr
    assert (out / "meta.json").read_text() == first
    replaced = _prepare(out, "--seed", "1", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((out / "meta.json").read_text())["seed"] == 1
    out_line, _ = reader.communicate("go\n", timeout=30)
    assert reader.returncode == 0 and out_line.split()[-1] == "True"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporaries left beside it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    foreign = _prepare(tmp_path / "mine", "--overwrite")
    assert foreign.returncode == 2 and "not a complete earlier preparation" in _one_line(foreign.stderr)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"


# --- data and tokenizer replaced at the same path ---------------------------------------------------------------
def test_changed_data_or_tokenizer_contents_refuse_the_resume(tiny_data, tmp_path):
    from relora_dist.config import ConfigError, load_config
    from relora_dist.data import DEFAULT_TOKENIZER
    from relora_dist.runtime.run_guard import run_fingerprints
    from relora_dist.checkpoint.resume import check_checkpoint_config

    data, tok = tmp_path / "data", tmp_path / "tok"
    shutil.copytree(tiny_data, data)
    shutil.copytree(DEFAULT_TOKENIZER, tok)
    base = tiny_overrides(data, tmp_path / "run", **{"data.tokenizer_dir": str(tok), "checkpoint.resume": "auto"})
    cfg = load_config(None, base)
    ckpt = fake_checkpoint(tmp_path / "run" / "checkpoints", 2, cfg)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["fingerprints"] = run_fingerprints(cfg)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    check_checkpoint_config(cfg)  # unchanged: resumes
    config = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<unk>"}))
    with pytest.raises(ConfigError) as e:
        check_checkpoint_config(load_config(None, base))
    assert "data.tokenizer_dir 'contents" in str(e.value) and "allow_changes=data.tokenizer_dir" in str(e.value)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "data_sha256": "0" * 64}))  # what a re-preparation records
    with pytest.raises(ConfigError) as e:
        check_checkpoint_config(load_config(None, base))
    assert "\n" not in str(e.value)
    assert "allow_changes=data.prepared_dir,data.tokenizer_dir" in str(e.value), str(e.value)
    check_checkpoint_config(load_config(None, base + ["--checkpoint.allow_changes=data.prepared_dir,"
                                                      "data.tokenizer_dir"]))


def test_tokenizer_fingerprint_covers_every_tokenizer_file(tmp_path):
    from relora_dist.data import DEFAULT_TOKENIZER
    from relora_dist.data.tokenizer import tokenizer_checksum, tokenizer_fingerprint

    shutil.copytree(DEFAULT_TOKENIZER, tmp_path / "t")
    before = tokenizer_fingerprint(str(tmp_path / "t")), tokenizer_checksum(str(tmp_path / "t"))
    (tmp_path / "t" / "tokenizer.json").write_text("{}")  # a Hugging Face tokenizer file appears
    assert tokenizer_fingerprint(str(tmp_path / "t")) != before[0]
    assert tokenizer_checksum(str(tmp_path / "t")) == before[1]  # what prepared data records: the vocabulary


# --- retention ------------------------------------------------------------------------------------------------
def _checkpoints(root, cfg, records):
    for step, record in records.items():
        d = fake_checkpoint(root, step, cfg)
        m = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(json.dumps({**m, **record}))
    return list_checkpoints(root)


def test_retention_keeps_the_best_eval_and_the_last_clean_checkpoint(tmp_path):
    """keep_last=2 of steps 2..10: an eval collapse after step 4 (relora.lr=1e4: ppl 8000) and a skip
    streak from step 6 on; steps 4 (best eval) and 6 (newest outside the streak) stay too."""
    from relora_dist.config import load_config
    from relora_dist.runtime.run_guard import to_keep

    cfg = load_config(None, [f"--run.output_dir={tmp_path}"])
    found = _checkpoints(tmp_path / "c", cfg, {
        2: {"eval_loss": 7.0, "skipped_in_a_row": 0}, 4: {"eval_loss": 5.0, "skipped_in_a_row": 0},
        6: {"eval_loss": 8.99, "skipped_in_a_row": 0}, 8: {"eval_loss": None, "skipped_in_a_row": 1},
        10: {"eval_loss": None, "skipped_in_a_row": 2}})
    keep = to_keep(found, 2, found[-1])
    assert sorted(p.name for p in keep) == ["step_00000004", "step_00000006", "step_00000008", "step_00000010"]
    assert to_keep(found, 1, found[1]) >= {found[1], found[-1]}  # the one just written, whatever its step


def test_a_deleted_checkpoint_is_never_half_listed(tmp_path):
    """Deletion renames to .del-step_N first: a kill inside the rmtree leaves a folder that listing
    ignores and the next start-up removes."""
    from relora_dist.config import load_config
    from relora_dist.runtime.run_guard import remove_checkpoint

    cfg = load_config(None, [f"--run.output_dir={tmp_path}"])
    found = _checkpoints(tmp_path / "c", cfg, {2: {}, 4: {}})
    os.replace(found[0], tmp_path / "c" / ".del-step_00000002")  # what a kill after the rename leaves
    assert [p.name for p in list_checkpoints(tmp_path / "c")] == ["step_00000004"]
    assert remove_stale_temporaries(tmp_path / "c") == [".del-step_00000002"]
    remove_checkpoint(found[1])
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["latest"]


def test_a_resume_keeps_counting_the_skip_streak():
    from relora_dist.checkpoint.state import TrainState

    saved = TrainState(step=8, skipped_steps=3, skipped_in_a_row=2)
    resumed = TrainState()
    resumed.load_state_dict({**saved.state_dict(), "tokens_seen": 0})
    assert resumed.skipped_in_a_row == 2


# --- SIGHUP on a 2-rank run ------------------------------------------------------------------------------------
@pytest.mark.spawn
def test_sighup_to_both_ranks_saves_and_exits_0(tiny_data, tmp_path):
    """A closed terminal sends SIGHUP to every process of the group: both ranks save and exit 0
    (before: they died without a word)."""
    from tests.test_faults import _launch_pair

    procs = _launch_pair(tiny_data, tmp_path / "run", timeout_s=60, grace_s=30)
    for p in procs:
        p.send_signal(signal.SIGHUP)
    try:
        out, err = procs[0].communicate(timeout=120)
        procs[1].wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], err[-3000:]
    assert "SIGHUP: checkpoint saved, exiting cleanly" in out and "Traceback" not in err
    assert find_latest(tmp_path / "run" / "checkpoints") is not None
