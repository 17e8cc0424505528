"""Checkpoint and export integrity: a reader (resume, relora-inspect with and without --verify,
relora-convert) opens only the checkpoint's own files, follows `latest` only to a sibling step_*
folder, checks the manifest's own sha256, and turns every disagreement into one line `error: ...`
with exit 2; an export holds only the model it wrote and the tokenizer's own files, and appears
whole or not at all. Two identical 1-process runs (run concurrently) give the base checkpoint;
every case works on its own copy."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from relora_dist.checkpoint import integrity
from relora_dist.tools import convert_ckpt, inspect_ckpt
from tests.dist_utils import REPO, tiny_overrides

PRETRAIN = "launchers/pretrain.py"
EXTRA = {"train.max_steps": 2, "relora.enabled": False, "logging.tensorboard": False}
STEP = "step_00000002"


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def base(tiny_data, tmp_path_factory):
    """Two identical 2-step runs; run b reads its tokenizer from a whole "model folder" (weights,
    config.json, code, a link beside the tokenizer files)."""
    tmp = tmp_path_factory.mktemp("integrity")
    model_dir = tmp / "model_folder"
    shutil.copytree(REPO / "assets" / "tokenizer", model_dir)
    (model_dir / "model.safetensors").write_bytes(b"not these weights")
    (model_dir / "config.json").write_text('{"auto_map": {}}')
    (model_dir / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    (tmp / "secret.json").write_text("{}")
    os.symlink(tmp / "secret.json", model_dir / "special_tokens_map.json")
    procs = [subprocess.Popen([sys.executable, PRETRAIN, *tiny_overrides(tiny_data, tmp / run, **EXTRA, **extra)],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for run, extra in (("a", {}), ("b", {"data.tokenizer_dir": str(model_dir)}))]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return tmp


@pytest.mark.spawn
def test_identical_runs_write_identical_shards(base):
    a, b = (base / run / "checkpoints" / STEP / "rank00000.safetensors" for run in "ab")
    assert _sha(a) == _sha(b)


@pytest.mark.spawn
def test_checkpoint_copies_only_tokenizer_files(base):
    tok = base / "b" / "checkpoints" / STEP / "tokenizer"
    # the link in the user's tokenizer folder (as in a Hugging Face cache snapshot) is copied as a file
    assert sorted(p.name for p in tok.iterdir()) == ["special_tokens_map.json", "tokenizer.model",
                                                     "tokenizer_config.json"]
    assert not any(p.is_symlink() for p in tok.iterdir())


def _copy(base, name):
    """A copy of run a (its output_dir) as `name`; returns (run dir, checkpoint dir)."""
    run = base / "cases" / name
    shutil.copytree(base / "a", run, symlinks=True)
    return run, run / "checkpoints" / STEP


def _edit(ckpt, change, sign=True):
    m = json.loads((ckpt / "manifest.json").read_text())
    change(m)
    (ckpt / "manifest.json").write_text(json.dumps(integrity.with_checksum(m) if sign else m))


def _outside_shard(base, run):
    outside = base / "cases" / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(run / "checkpoints" / STEP / "rank00000.safetensors", outside / "x.safetensors")
    return outside


def _build(base, data):
    """{case: (tools, expected text, run dir)}; tools: pretrain, inspect, verify, convert."""
    cases = {}
    run, ckpt = _copy(base, "escape")
    _outside_shard(base, run)
    _edit(ckpt, lambda m: m["files"][0].update(file="../../../outside/x.safetensors"))
    cases["shard name ../ escapes"] = ("pretrain inspect verify convert", "names shard '../../../outside", run)
    run, ckpt = _copy(base, "absolute")
    outside = _outside_shard(base, run)
    _edit(ckpt, lambda m: m["files"][0].update(file=str(outside / "x.safetensors")))
    cases["absolute shard name"] = ("inspect verify convert", "not the writer's own rank%05d", run)
    run, ckpt = _copy(base, "link")
    outside = _outside_shard(base, run)
    (ckpt / "rank00000.safetensors").unlink()
    os.symlink(outside / "x.safetensors", ckpt / "rank00000.safetensors")
    cases["shard is a symlink"] = ("pretrain inspect verify convert", "as a symbolic link", run)
    run, _ = _copy(base, "latest")
    _copy(base, "other")
    (run / "checkpoints" / "latest").write_text(f"../../other/checkpoints/{STEP}")
    cases["latest leaves the folder"] = ("pretrain inspect convert", "not a step_* folder beside it", run)
    run, ckpt = _copy(base, "edited")
    _edit(ckpt, lambda m: m.update(tokens_seen=1), sign=False)
    cases["manifest edited"] = ("pretrain inspect verify convert", "manifest.json fails its sha256 check", run)
    run, ckpt = _copy(base, "unsigned")
    _edit(ckpt, lambda m: m.pop(integrity.CHECKSUM), sign=False)
    cases["format 2 without checksum"] = ("inspect convert", "lacks manifest_sha256", run)
    run, ckpt = _copy(base, "notok")
    shutil.rmtree(ckpt / "tokenizer")
    cases["no tokenizer/"] = ("verify convert", "tokenizer is missing", run)
    run, ckpt = _copy(base, "toklink")
    (ckpt / "tokenizer" / "tokenizer_config.json").unlink()
    os.symlink(base / "secret.json", ckpt / "tokenizer" / "tokenizer_config.json")
    cases["tokenizer file is a symlink"] = ("verify convert", "tokenizer_config.json is a symbolic link", run)
    name = "model.embed_tokens.weight"
    run, ckpt = _copy(base, "rank7")
    _edit(ckpt, lambda m: m["tensors"][name]["fields"]["master"][0].__setitem__(0, 7))
    cases["fragment on a rank without shard"] = ("convert", "on rank 7, whose shard does not exist", run)
    run, ckpt = _copy(base, "range")
    _edit(ckpt, lambda m: (m["tensors"][name]["fields"]["master"][0].__setitem__(2, 10),
                           m["tensors"][name].update(shape=[10])))
    cases["range disagrees with shard"] = ("convert", "elements 0..10 on rank 0, the shard holds", run)
    run, ckpt = _copy(base, "world")
    _edit(ckpt, lambda m: m.update(world_size=2))
    cases["files disagree with world_size"] = ("verify convert", "lists shards of ranks [0] for world_size 2", run)
    run, ckpt = _copy(base, "r0")
    _edit(ckpt, lambda m: (m.update(adapters_active=True), m["relora"].update(r=0)))
    cases["relora r=0 with adapters"] = ("convert", "relora r=0", run)
    return cases


@pytest.fixture(scope="module")
def results(base, tiny_data):
    """Every case through every tool it names: pretrain as a real process (all at once), inspect
    and convert through their mains in this process. {(case, tool): (code, stderr, expected,
    untouched)}."""
    cases = _build(base, tiny_data)
    outside = _snapshot(base / "cases" / "outside")
    procs, done = {}, {}
    for case, (tools, expected, run) in cases.items():
        if "pretrain" in tools:
            argv = tiny_overrides(tiny_data, run, **EXTRA, **{"checkpoint.resume": "auto"})
            procs[case] = (subprocess.Popen([sys.executable, PRETRAIN, *argv], cwd=REPO, env=_env(),
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                           _snapshot(run))
    for case, (tools, expected, run) in cases.items():
        root = run / "checkpoints"
        for tool in tools.split():
            if tool == "pretrain":
                continue
            before, err = _snapshot(run), _Capture()
            target = root if case == "latest leaves the folder" else root / STEP
            with err:
                if tool == "convert":
                    code = convert_ckpt.main([str(target), str(run / "hf")])
                else:
                    code = inspect_ckpt.main([str(target), *(["--verify"] if tool == "verify" else [])])
            done[case, tool] = (code, err.text, expected, _snapshot(run) == before and not (run / "hf").exists())
    for case, (p, before) in procs.items():
        _, stderr = p.communicate(timeout=300)
        run = cases[case][2]
        done[case, "pretrain"] = (p.returncode, stderr, cases[case][1], _snapshot(run / "checkpoints") ==
                                  {k: v for k, v in before.items() if run / "checkpoints" in k.parents})
    return done, outside, _snapshot(base / "cases" / "outside")


class _Capture:
    """stderr of an in-process main, as text."""

    def __enter__(self):
        import io

        self._old, sys.stderr = sys.stderr, io.StringIO()
        return self

    def __exit__(self, *exc):
        self.text, sys.stderr = sys.stderr.getvalue(), self._old


CASES = [("shard name ../ escapes", t) for t in ("pretrain", "inspect", "verify", "convert")] + \
    [("absolute shard name", t) for t in ("inspect", "verify", "convert")] + \
    [("shard is a symlink", t) for t in ("pretrain", "inspect", "verify", "convert")] + \
    [("latest leaves the folder", t) for t in ("pretrain", "inspect", "convert")] + \
    [("manifest edited", t) for t in ("pretrain", "inspect", "verify", "convert")] + \
    [("format 2 without checksum", t) for t in ("inspect", "convert")] + \
    [("no tokenizer/", t) for t in ("verify", "convert")] + \
    [("tokenizer file is a symlink", t) for t in ("verify", "convert")] + \
    [("files disagree with world_size", t) for t in ("verify", "convert")] + \
    [("fragment on a rank without shard", "convert"), ("range disagrees with shard", "convert"),
     ("relora r=0 with adapters", "convert")]


@pytest.mark.parametrize("case,tool", CASES, ids=[f"{c}: {t}" for c, t in CASES])
@pytest.mark.spawn
def test_one_line_error_exit_2_nothing_written(results, case, tool):
    done, outside_before, outside_after = results
    code, stderr, expected, untouched = done[case, tool]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines and lines[-1].startswith("error: ") and expected in lines[-1], stderr[-2000:]
    assert sum(ln.startswith("error:") for ln in lines) == 1
    if case == "manifest edited":
        assert "--checkpoint.resume=previous" in lines[-1]
    assert untouched  # the checkpoint byte-identical, no export folder
    assert outside_after == outside_before


@pytest.mark.spawn
def test_latest_escape_does_not_touch_the_other_run(results, base):
    other = base / "cases" / "other"
    assert not (other / "config.step_2.yaml").exists()
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["latest", STEP]


def _convert(*argv):
    err = _Capture()
    with err:
        code = convert_ckpt.main([str(a) for a in argv])
    return code, err.text


@pytest.mark.spawn
def test_overwrite_replaces_an_earlier_export_whole(base):
    """--overwrite onto an export with one model.safetensors, writing shards: the old file goes
    (transformers would load it instead), and nothing is left beside the folder."""
    out = base / "exports" / "hf"
    ckpt = base / "a" / "checkpoints" / STEP
    assert _convert(ckpt, out)[0] == 0
    assert (out / "model.safetensors").is_file()
    code, err = _convert(ckpt, out, "--overwrite", "--max_shard_size", "1MB")
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]


@pytest.mark.spawn
def test_overwrite_never_replaces_a_foreign_folder(base):
    out = base / "exports" / "mine"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("keep")
    code, err = _convert(base / "a" / "checkpoints" / STEP, out, "--overwrite")
    assert code == 2 and err.count("error:") == 1 and "'notes.txt', which an export does not write" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.spawn
def test_export_holds_only_the_model_and_tokenizer_files(base):
    """auto_map and unknown keys in the manifest's model_config, code and weights in tokenizer/:
    the export's config.json has no auto_map (no trust_remote_code), no .py, and its weights are
    the checkpoint's."""
    run, ckpt = _copy(base, "crafted")
    _edit(ckpt, lambda m: m["model_config"].update(auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"},
                                                   not_a_llama_key=1))
    (ckpt / "tokenizer" / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    (ckpt / "tokenizer" / "model.safetensors").write_bytes(b"stale")
    clean, crafted = base / "exports" / "clean", base / "exports" / "crafted"
    assert _convert(base / "a" / "checkpoints" / STEP, clean)[0] == 0
    code, err = _convert(ckpt, crafted)
    assert code == 0, err
    config = json.loads((crafted / "config.json").read_text())
    assert "auto_map" not in config and "not_a_llama_key" not in config
    assert sorted(p.name for p in crafted.iterdir()) == sorted(p.name for p in clean.iterdir())
    assert _sha(crafted / "model.safetensors") == _sha(clean / "model.safetensors")


@pytest.mark.spawn
def test_export_to_unwritable_target_is_one_line(base, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = _convert(base / "a" / "checkpoints" / STEP, blocker / "hf")
    assert code == 2 and err.count("error:") == 1 and "cannot write" in err and "Traceback" not in err
    if os.geteuid() != 0:  # root writes through permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        code, err = _convert(base / "a" / "checkpoints" / STEP, ro / "hf")
        ro.chmod(0o755)
        assert code == 2 and err.count("error:") == 1 and "cannot write" in err
        assert list(ro.iterdir()) == []


@pytest.mark.spawn
def test_interrupted_export_leaves_no_folder(base, tmp_path, monkeypatch):
    from relora_dist.checkpoint import export

    def boom(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "tokenizer_files", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_ckpt.convert(base / "a" / "checkpoints" / STEP, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_format_1_manifest_without_checksum_still_reads(tmp_path):
    from relora_dist.checkpoint.format import read_manifest
    from relora_dist.config import load_config
    from tests.dist_utils import fake_checkpoint

    ckpt = fake_checkpoint(tmp_path, 2, load_config(None, []))
    assert integrity.CHECKSUM not in read_manifest(ckpt)
