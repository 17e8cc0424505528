"""Every command the documentation shows runs here, so the documentation cannot rot.

Sources: README.md, docs/*.md, configs/README.md, the benchmarks' READMEs, the Dockerfile's header
and the commands' --help texts (relora-pretrain's usage, the tools' and benchmarks' docstrings).
Each command falls in exactly one class, chosen by what it starts:

  run      the command itself, through bash, in a scratch folder laid out like a checkout
           (`python` is this interpreter), after README's default run has trained there;
  dry      training (python launchers/pretrain.py, relora-pretrain, deepspeed, torchrun, docker
           run, sbatch): its pretrain arguments with --dry_run at the world size the launcher
           would start, so config, world-size arithmetic and data paths are checked where no GPU
           or cluster is; output lines the docs show under a command must be printed by it;
  parse    benchmarks of minutes to hours (tools/bench.py, replicate.py): their arguments parse;
  skip     installs, image builds, downloads, `git clone` and README's test command (CI runs
           it), each with the reason in SKIP.

A command this file cannot classify fails the test: classify it here when you document it.
Sizes a small corpus cannot meet are scaled by SCALE (the only edits made to a command).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import json
import lzma
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import REPO

# Documents whose commands another test runs as written (on a model made for it).
RUN_ELSEWHERE = {"own-model.md": "tests/test_own_model_doc.py"}
DOCS = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name not in RUN_ELSEWHERE),
        REPO / "configs" / "README.md", *sorted((REPO / "benchmarks").rglob("README.md"))]
COMMANDS = ("python", "pip", "deepspeed", "torchrun", "docker", "sbatch", "git", "huggingface-cli")
SKIP = {"pip": "installs packages (CI runs README's install on a fresh machine)",
        "git": "clones this repository",
        "huggingface-cli": "downloads C4 (no network in tests)",
        "docker build": "builds an image (tools/docker_smoke.sh builds the CPU image and runs it)",
        "python -m pytest": "README's test command: CI runs it"}
# The user's corpus here is the bundled one (~4 MB): a 32k vocabulary does not fit it.
SCALE = {"--vocab_size 32000": "--vocab_size 2000", "/shared/data/": "shared-data/"}
WORLD_FLAGS = {"--num_gpus": "gpus", "--nproc_per_node": "gpus", "--nnodes": "nodes", "--nodes": "nodes",
               "--gpus-per-node": "gpus"}


def _is_command(words: list[str]) -> bool:
    head = _strip_env(words)[1]
    return bool(head) and (head[0] in COMMANDS or head[0].startswith("relora-"))


def _strip_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        k, v = words[0].split("=", 1)
        env[k], words = v, words[1:]
    return env, words


def _split(line: str) -> list[str] | None:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an output line with a lone quote
        return None


def _markdown_commands(path: Path) -> list[tuple[str, str, list[str]]]:
    """(where, command, output lines shown under it) for each command in a bash block or a `$ ` line."""
    found = []
    text = path.read_text()
    for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S):
        lang, body = m.group(1), m.group(2).replace("\\\n", " ")
        if lang not in ("bash", "sh", "console", "") or (lang == "" and not body.lstrip().startswith("$ ")):
            continue
        line_no = text[:m.start()].count("\n") + 2
        for i, line in enumerate(body.splitlines()):
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            words = _split(line)
            if not line or line.startswith("#"):
                continue
            if words and _is_command(words):
                found.append((f"{path.relative_to(REPO)}:{line_no + i}", line, []))
            elif found and found[-1][0].startswith(str(path.relative_to(REPO))):
                found[-1][2].append(line)
    return found


def _help_commands() -> list[tuple[str, str, list[str]]]:
    from relora_dist.cli import PRETRAIN_DOC

    texts = {"relora-pretrain --help": PRETRAIN_DOC}
    for f in [*sorted((REPO / "relora_dist" / "tools").glob("[!_]*.py")), REPO / "tools" / "bench.py",
              REPO / "benchmarks" / "replication" / "replicate.py"]:
        import ast

        texts[f"{f.relative_to(REPO)} docstring"] = ast.get_docstring(ast.parse(f.read_text())) or ""
    texts["Dockerfile header"] = "\n".join(ln.lstrip("#") for ln in (REPO / "Dockerfile").read_text().splitlines()
                                           if ln.startswith("#"))
    found = []
    for where, text in texts.items():
        for line in text.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[(--[^\]]+)\]", r"\1", line.strip())  # an optional flag, shown as [--dtype bf16]
            words = _split(line)
            if words and _is_command(words):
                found.append((where, line, []))
    return found


def _classify(line: str) -> tuple[str, object]:
    env, words = _strip_env(_split(line))
    joined = " ".join(words)
    for prefix, why in SKIP.items():
        if joined.startswith(prefix):
            return "skip", why
    if "tools/bench.py" in words or "benchmarks/replication/replicate.py" in words:
        return "parse", words
    pretrain = _pretrain_args(words)
    if pretrain is not None and "--help" not in pretrain:
        return "dry", (env, pretrain, _world(env, words))
    if words[0] == "python" or words[0].startswith("relora-"):
        return "run", line
    raise AssertionError(f"documented command of no known class: {line}")


def _pretrain_args(words: list[str]) -> list[str] | None:
    if words[0] == "relora-pretrain":
        return words[1:]
    for script in ("launchers/pretrain.py", "launchers/slurm.sbatch"):
        if script in words:
            return words[words.index(script) + 1:]
    if words[:2] == ["docker", "run"]:  # the image's entry point is relora-pretrain
        i, takes_value = 2, {"-v", "--volume", "--entrypoint", "--gpus", "--user", "-e", "--env"}
        while words[i].startswith("-"):
            i += 2 if words[i] in takes_value else 1
        return words[i + 1:]
    return None


def _world(env: dict[str, str], words: list[str]) -> int:
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    got = {"gpus": 1, "nodes": 1}
    for i, w in enumerate(words[:-1]):
        if w in WORLD_FLAGS and words[i + 1].isdigit():
            got[WORLD_FLAGS[w]] = int(words[i + 1])
    if "--hostfile" in words:
        from deepspeed.launcher.runner import fetch_hostfile

        got["nodes"], got["gpus"] = 1, sum(fetch_hostfile(str(REPO / words[words.index("--hostfile") + 1])).values())
    return got["gpus"] * got["nodes"]


ALL = [c for doc in DOCS for c in _markdown_commands(doc)] + _help_commands()


LAYOUT = ("configs", "ds_configs", "launchers", "tools", "benchmarks")
# What documents assume exists beside them: the C4 tokenizer and blocks configs/README.md prepares (the
# paper presets read them), the tokenizer README trains from the user's corpus. A document whose own
# commands write one of them (`--out NAME`) makes it itself.
MADE_ELSEWHERE = {"my_tok": "relora-train-tokenizer --input my.jsonl --out my_tok --vocab_size 2000",
                  "data/c4-tok32k": "relora-train-tokenizer --input c4/en/c4-train.00000-of-01024.json.gz "
                                    "--out data/c4-tok32k --vocab_size 2000",
                  "data/c4-512": "relora-prepare-data --input c4/en/c4-train.000*.json.gz "
                                 "--tokenizer data/c4-tok32k --out data/c4-512 --seq_len 512"}


def _lay_out(root: Path, shared: Path | None = None) -> None:
    """A folder laid out like the checkout, with the user's corpus (the bundled one) as my.jsonl,
    corpus.jsonl and two C4-named shards. The bundled tokenizer is not linked: a docstring rebuilds
    it into assets/tokenizer. With `shared`: its runs/ (README's default run) linked."""
    for name in LAYOUT:
        (root / name).symlink_to(REPO / name)
    (root / "assets").mkdir()
    (root / "assets" / "corpus").symlink_to(REPO / "relora_dist" / "assets" / "corpus")
    (root / "bin").mkdir()  # `python` = this interpreter (a link would lose the venv it belongs to)
    (root / "bin" / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (root / "bin" / "python").chmod(0o755)
    (root / "data").mkdir()
    if shared is not None:
        for name in ("my.jsonl", "corpus.jsonl", "c4", "runs"):
            (root / name).symlink_to(shared / name)
        return
    text = lzma.decompress((REPO / "relora_dist" / "assets" / "corpus" / "corpus.jsonl.xz").read_bytes())
    (root / "my.jsonl").write_bytes(text)
    (root / "corpus.jsonl").write_bytes(text)
    lines = text.splitlines(keepends=True)
    (root / "c4" / "en").mkdir(parents=True)
    for k in range(2):
        (root / "c4" / "en" / f"c4-train.{k:05d}-of-01024.json.gz").write_bytes(gzip.compress(b"".join(lines[k::2])))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """README's default run (its first command) trained here, and MADE_ELSEWHERE made."""
    root = tmp_path_factory.mktemp("shared")
    _lay_out(root)
    # The default run is one process: both cores' threads (127 s with one thread, 92 s with two, measured).
    out = _bash("python launchers/pretrain.py", root, threads=2)
    first, last = (float(x) for x in re.search(r"first eval ppl ([0-9.]+) -> final eval ppl ([0-9.]+)", out).groups())
    assert last < first / 50, out[-2000:]  # measured: 8,174 -> 76
    for command in MADE_ELSEWHERE.values():
        _bash(command, root)
    return root


def _bash(line: str, cwd: Path, threads: int = 1) -> str:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(cwd / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _dry(env: dict[str, str], args: list[str], world: int, cwd: Path, monkeypatch) -> str:
    from relora_dist.cli import main

    monkeypatch.chdir(cwd)
    for k in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--dry_run"])
    assert code == 0, err.getvalue()
    return out.getvalue()


def _parse(words: list[str]) -> None:
    if "tools/bench.py" in words:
        from relora_dist.bench import build_parser

        build_parser().parse_args(words[words.index("tools/bench.py") + 1:])
        return
    spec = importlib.util.spec_from_file_location("replicate", REPO / "benchmarks" / "replication" / "replicate.py")
    replicate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replicate)
    assert words[words.index("benchmarks/replication/replicate.py") + 1] in replicate.SUITES


def test_every_documented_command_has_a_class():
    for doc, test in RUN_ELSEWHERE.items():
        assert "```bash" in (REPO / "docs" / doc).read_text() and (REPO / test).is_file()
    classes = {}
    for where, line, _ in ALL:
        classes.setdefault(_classify(line)[0], []).append(where)
    assert {"run", "dry", "parse", "skip"} <= classes.keys(), classes
    assert len(ALL) >= 60, len(ALL)  # the extraction still finds the docs' commands


def _source(where: str) -> str:
    return where.split(":")[0].split(" ")[0]


@pytest.mark.parametrize("source", sorted({_source(w) for w, _, _ in ALL}))
@pytest.mark.spawn
def test_documented_commands_run(source, shared, tmp_path, monkeypatch):
    """The commands of one document or help text, in their order, in a checkout of its own that
    shares README's default run and what MADE_ELSEWHERE names."""
    commands = [c for c in ALL if _source(c[0]) == source]
    _lay_out(tmp_path, shared)
    for name in MADE_ELSEWHERE:
        if not any(f"--out {name}" in line for _, line, _ in commands):
            (tmp_path / name).symlink_to(shared / name)
    previous = []
    for where, line, shown in commands:
        for big, small in SCALE.items():
            line = line.replace(big, small)
        kind, what = _classify(line)
        if kind == "run":
            _bash(line, tmp_path)
        elif kind == "dry":
            env, args, world = what
            printed = _dry(env, args, world, tmp_path, monkeypatch)
            for expected in shown:
                assert expected in printed.splitlines(), f"{where}: docs show\n{expected}\nbut it printed\n{printed}"
        elif kind == "parse":
            if "..." in what:  # `tools/bench.py ... --override=X`: the command above it, plus X
                what = previous + what[what.index("...") + 1:]
            _parse(what)
            previous = what
