"""Bad inputs met after start-up: each case exits 2 with one line `error: ...` that names the
problem and the fix, no traceback, and every checkpoint file byte-identical afterwards. The cases
run concurrently; only "corrupt newest shard" and "disk full" get as far as the process group."""

import ctypes
import json
import os
import resource
import signal
import subprocess
import sys

from pathlib import Path

import pytest

from relora_dist.config import load_config
from tests.dist_utils import REPO, fake_checkpoint, tiny_overrides
from tests.test_own_model import make_model

PRETRAIN, CONVERT, INSPECT = "launchers/pretrain.py", "tools/convert_ckpt.py", "tools/inspect_ckpt.py"
PREPARE = "tools/prepare_data.py"


def _disk_full():  # writes past 1 MiB fail with EFBIG, as on a full disk (the process survives)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def _read_only(folder):
    """A preexec that makes `folder` read-only for the child alone: a read-only bind mount in a
    mount namespace of its own (root ignores the mode bits, but not a read-only mount)."""
    def preexec():
        libc = ctypes.CDLL(None, use_errno=True)
        path = str(folder).encode()
        ms_rdonly, ms_remount, ms_bind, ms_rec, ms_private = 1, 32, 4096, 16384, 1 << 18
        if (libc.unshare(0x00020000) or libc.mount(b"none", b"/", None, ms_rec | ms_private, None)
                or libc.mount(path, path, None, ms_bind, None)
                or libc.mount(path, path, None, ms_remount | ms_bind | ms_rdonly, None)):
            raise OSError(ctypes.get_errno(), "no read-only bind mount here")
    return preexec


def _read_only_case(folder):
    """(preexec or None, how) that makes `folder` unwritable for a child, or (None, None) where
    neither way works: mode bits for a non-root user; for root, a read-only bind mount."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return None, "chmod"
    probe = [sys.executable, "-c", f"open({str(folder / 'probe')!r}, 'w')"]
    try:
        written = subprocess.run(probe, preexec_fn=_read_only(folder), capture_output=True).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return None, None
    return (None, None) if written or (folder / "probe").exists() else (_read_only(folder), "mount")


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
    # Corpora that datasets cannot read: prepare-data and a run that prepares on first use.
    corpora = {"empty .txt": b"", "empty .jsonl": b"", "invalid UTF-8 .txt": b"In the beginning\n\nand \xff\xfe\n",
               "invalid UTF-8 .jsonl": b'{"text": "ok"}\n{"text": "bad \xe9 byte"}\n',
               "lone surrogate .jsonl": b'{"text": "ok"}\n{"text": "half \\ud800 a pair"}\n'}
    expect = {"empty .txt": "is empty (0 bytes)", "empty .jsonl": "is empty (0 bytes)",
              "invalid UTF-8 .txt": "is not valid UTF-8 at line 3 (byte 22:",
              "invalid UTF-8 .jsonl": "is not valid UTF-8 at line 2 (byte 29:",
              "lone surrogate .jsonl": "line 2 holds a lone UTF-16 surrogate escape"}
    for i, (label, content) in enumerate(corpora.items()):
        src = tmp / f"corpus{i}{label.rsplit(' ', 1)[1]}"
        src.write_bytes(content)
        cases[f"{label} corpus: prepare"] = ([PREPARE, "--input", str(src), "--out", str(tmp / f"prep{i}")],
                                             expect[label], None, None)
    sources = {"data.prepared_dir": "", "data.cache_dir": str(tmp / "cache")}
    cases["invalid UTF-8 .txt corpus: pretrain"] = (
        [PRETRAIN, *tiny_overrides(data, tmp / "utf8", **sources, **{"data.sources": str(tmp / "corpus2.txt")})],
        expect["invalid UTF-8 .txt"], None, None)
    # One line of text is one document, and the validation split takes whole documents.
    one = tmp / "one-line.txt"
    one.write_text(" ".join(["and the earth was without form and void"] * 250) + "\n")
    cases["single-document corpus"] = (
        [PRETRAIN, *tiny_overrides(data, tmp / "one", **sources, **{"data.sources": str(one)})],
        "split the text into documents", None, None)
    bad_ids = tmp / "bad-ids"
    bad_ids.mkdir()
    for name in ("meta.json", "train.bin", "val.bin"):
        (bad_ids / name).write_bytes(Path(data, name).read_bytes())
    tokens = bytearray((bad_ids / "train.bin").read_bytes())
    tokens[2000:2002] = (0xFFFF).to_bytes(2, "little")  # id 65535 at token 1000; the vocabulary has 8000
    (bad_ids / "train.bin").write_bytes(bytes(tokens))
    cases["token id >= vocab size"] = ([PRETRAIN, *tiny_overrides(bad_ids, tmp / "ids")],
                                       "train.bin holds token id 65535 at token 1000", None, None)
    for key, raw in (("train.max_steps", "[1"), ("model.hidden_size", "{")):
        cases[f"override --{key}={raw}"] = ([PRETRAIN, *tiny_overrides(data, tmp / "yaml"), f"--{key}={raw}"],
                                            f"--{key}={raw}: the value is not valid YAML", None, None)
    a_file = tmp / "a-file"
    a_file.write_text("not a folder")
    dangling = tmp / "dangling"
    dangling.symlink_to(tmp / "nowhere")
    for label, out, expected in (("is a file", a_file, "a-file is a file, not a folder"),
                                 ("is under a file", a_file / "run", "a-file is a file, not a folder"),
                                 ("is a dangling symlink", dangling, "which does not exist")):
        cases[f"output_dir {label}"] = ([PRETRAIN, *tiny_overrides(data, out)], expected, None, None)
    # model.init_from folders that are refused before anything is written: each case's folder holds
    # the model (a tiny LLaMA) and the run's output_dir, so its snapshot also shows that no run
    # folder appeared
    def init_from(label, expected, edit=None, run=None, **kw):
        folder = tmp / f"init-{label.replace(' ', '-')}"
        model = make_model(folder / "model", "llama", **kw)
        if edit:
            config = json.loads((model / "config.json").read_text())
            (model / "config.json").write_text(json.dumps({**config, **edit}))
        cases[f"init_from {label}"] = ([PRETRAIN, *tiny_overrides(data, folder / "run", **{
            "model.init_from": model, **(run or {})})], expected, folder, None)

    init_from("without tokenizer", "holds weights but no tokenizer (tokenizer.model or tokenizer.json); set "
              "data.tokenizer_dir", tokenizer=None)
    init_from("vocab differs", "has vocab_size 4000 (embedding rows) but data.tokenizer_dir",
              vocab_size=4000)  # the bundled tokenizer beside it has 8000 ids
    init_from("model_type gpt2", "'gpt2' model; model_type must be one of llama, mistral, qwen2",
              {"model_type": "gpt2"})
    # a run that would prepare the bundled corpus on first use: no data cache is written either
    init_from("tying differs", "config.json has tie_word_embeddings true but the weights' lm_head.weight differs",
              {"tie_word_embeddings": True}, {"data.prepared_dir": "", "data.cache_dir": tmp / "init-tying-differs"
                                              / "cache"})
    preexec, how = _read_only_case(tmp / "read-only")
    if how:
        cases["output_dir on a read-only file system"] = (
            [PRETRAIN, *tiny_overrides(data, tmp / "read-only" / "run")], "read-only is not writable", None, preexec)
    return cases


def _snapshot(folder):
    """Every file's bytes and every folder (None) under `folder`: an added empty folder shows too."""
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))} if folder else {}


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
              "disk full during save",
              *(f"{label} corpus: prepare" for label in ("empty .txt", "empty .jsonl", "invalid UTF-8 .txt",
                                                          "invalid UTF-8 .jsonl", "lone surrogate .jsonl")),
              "invalid UTF-8 .txt corpus: pretrain", "single-document corpus", "token id >= vocab size",
              "override --train.max_steps=[1", "override --model.hidden_size={",
              *(f"init_from {label}" for label in ("without tokenizer", "vocab differs", "model_type gpt2",
                                                   "tying differs")),
              *(f"output_dir {label}" for label in ("is a file", "is under a file", "is a dangling symlink",
                                                    "on a read-only file system"))]


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.spawn
def test_one_line_error_exit_2_nothing_lost(results, case):
    _, done = results
    if case not in done:
        pytest.skip("no way to make a folder read-only here (root, and no mount namespace)")
    code, stdout, stderr, before, after, expected = done[case]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, (code, stdout[-2000:], stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines and lines[-1].startswith("error: ") and expected in lines[-1], stderr[-2000:]
    assert sum(ln.startswith("error:") for ln in lines) == 1
    assert after == before  # the checkpoint is untouched


@pytest.mark.spawn
def test_disk_full_publishes_nothing(results):
    tmp, _ = results
    root = tmp / "full" / "checkpoints"
    assert not root.exists() or not list(root.iterdir())
