"""relora-eval: a checkpoint and its export repeat the run's last eval, 2 processes give 1 process's
result, raw text is tokenized and packed as preparation does, and bad inputs are one-line errors.
One tiny ReLoRA run (live adapters at its end, so the merge is exercised) serves every test."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from relora_dist.checkpoint.format import find_latest, read_manifest
from relora_dist.tools.convert_ckpt import convert
from relora_dist.tools.eval import main
from tests.dist_utils import REPO, run_world, tiny_overrides

pytestmark = pytest.mark.spawn  # every test here starts processes (conftest.py checks it)

# warm start 2 steps, a reset after step 5, 8 steps; evaluated at the end on 512 // 32 = 16 val blocks
RUN = {"relora.enabled": True, "relora.warm_start_steps": 2, "relora.cycle_length": 3, "relora.first_warmup": 0,
       "relora.restart_warmup": 1, "relora.r": 8, "train.max_steps": 8}
# fp32 throughout. The run's forward adds the live adapters (W x + s B A x), the evaluated model has
# them merged ((W + s B A) x), and other batch sizes group the blocks otherwise: float rounding only.
# A loss near 8 has an fp32 spacing of 9.5e-7; measured on 2 cores: the checkpoint at the run's
# batches 0.0, the export in batches of 5 6.6e-7, 2 processes against 1 3.8e-7.
TOL = 1e-5


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    run_world(1, "relora_run", tiny_overrides(tiny_data, out / "run", **RUN), out / "r1")
    ckpt = find_latest(out / "run" / "checkpoints")
    hf = convert(ckpt, out / "hf")
    return out, ckpt, hf, read_manifest(ckpt)


def evaluate(capsys, *args) -> dict:
    """relora-eval in this process (the console script's main), its JSON result."""
    capsys.readouterr()  # earlier output
    path = os.path.join(os.getcwd(), "result.json")
    try:
        assert main([*map(str, args), "--out", path]) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out.strip().splitlines()
        assert len(printed) == 1 and printed[0].startswith("loss "), printed
        return json.loads(open(path).read())
    finally:
        if os.path.exists(path):
            os.remove(path)


def test_checkpoint_and_export_repeat_the_runs_last_eval(run, tiny_data, capsys):
    out, ckpt, hf, manifest = run
    logged = manifest["eval_loss"]  # the run's eval at its last step, as the trainer logged it
    assert manifest["global_step"] == 8 and manifest["adapters_active"] and logged is not None
    by_run = evaluate(capsys, out / "run" / "checkpoints", tiny_data, "--max_blocks", "run")
    assert by_run["blocks"] == 16 and by_run["tokens"] == 16 * 31 and by_run["run_eval_loss"] == logged
    exported = evaluate(capsys, hf, tiny_data, "--max_blocks", 16, "--batch_size", 5)
    assert exported["blocks"] == 16 and exported["seq_len"] == 32  # the prepared length: 32
    assert abs(by_run["loss"] - logged) < TOL and abs(exported["loss"] - logged) < TOL
    assert by_run["world_size"] == 1 and by_run["model"] == str(ckpt)


def test_two_processes_equal_one(run, tiny_data, capsys, tmp_path):
    """15 blocks: the ranks take 7 and 8, in batches unlike one process's."""
    out, ckpt, _, _ = run
    one = evaluate(capsys, ckpt, tiny_data, "--max_blocks", 15)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", "-m", "relora_dist.tools.eval", str(ckpt), str(tiny_data),
                           "--max_blocks", "15", "--out", str(tmp_path / "two.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("loss ") == 1, proc.stdout  # rank 0 only
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and (two["blocks"], two["tokens"]) == (one["blocks"], one["tokens"]) == (15, 465)
    assert abs(two["loss"] - one["loss"]) < TOL


def test_raw_text_is_packed_like_prepared_data(run, capsys, tmp_path):
    """A text file and the same file prepared by relora-prepare-data's code give the same blocks."""
    from relora_dist.data import DEFAULT_CORPUS, load_documents, prepare_dataset

    _, ckpt, hf, _ = run
    text = tmp_path / "some.txt"
    text.write_text("\n\n".join(load_documents([str(DEFAULT_CORPUS)])["text"][:6]))
    raw = evaluate(capsys, ckpt, text)
    prepare_dataset([str(text)], str(ckpt / "tokenizer"), str(tmp_path / "prep"), 32, val_fraction=0.0)
    prepared = evaluate(capsys, hf, tmp_path / "prep", "--split", "train")
    assert raw["blocks"] == prepared["blocks"] > 10 and raw["source"] == str(text)
    assert abs(raw["loss"] - prepared["loss"]) < TOL


def _fails(*args, cwd) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "relora_dist.tools.eval", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_bad_inputs_are_one_line_errors(run, tiny_data, tmp_path, capsys):
    _, ckpt, _, _ = run
    assert "does not exist" in _fails(tmp_path / "nowhere", tiny_data, cwd=tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    message = _fails(tmp_path / "notes", tiny_data, cwd=tmp_path)
    assert "neither a checkpoint" in message and "relora-convert" in message
    # data prepared with another tokenizer (same vocabulary size): meta.json's checksum differs
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "tokenizer_checksum": "0" * 64}))
    assert main([str(ckpt), str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different tokenizer" in err[0] and "relora-prepare-data" in err[0], err
