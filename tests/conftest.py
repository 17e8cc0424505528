import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session", autouse=True)
def away_from_the_working_directory(tmp_path_factory):
    """Every test runs in an empty folder of its own, so the user's working directory is never read
    (README's first command leaves `runs/default` there, which a config's relative default
    `run.output_dir` would find) nor written. Both are checked at the end of the session."""
    home = Path.cwd()
    before = set(os.listdir(home))
    work = tmp_path_factory.mktemp("cwd")
    os.chdir(work)
    yield work
    os.chdir(home)
    left = sorted(p.name for p in work.iterdir())
    assert not left, f"tests wrote {left} into their working directory; use tmp_path"
    added = sorted(set(os.listdir(home)) - before)
    assert not added, f"tests wrote {added} into the directory pytest was started in; use tmp_path"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The bundled corpus packed into 32-token blocks once per test session (~3 s)."""
    from relora_dist.data import DEFAULT_CORPUS, DEFAULT_TOKENIZER, ensure_prepared

    cache = tmp_path_factory.mktemp("data")
    return ensure_prepared([DEFAULT_CORPUS], DEFAULT_TOKENIZER, str(cache), 32, 0.05, 0)


# --- the `spawn` marker ------------------------------------------------------------------------------------------
# Tests that start processes (trainings at 2 ranks, launchers, CLIs) carry `@pytest.mark.spawn`, so
# `python -m pytest -m "not spawn"` is a development loop of about a minute. The marker is kept honest
# here: an unmarked test (its fixtures included) that starts a process fails, naming the marker.
class _Unmarked(RuntimeError):
    pass


def _refuse(*args, **kwargs):
    raise _Unmarked("this test starts a process: mark it @pytest.mark.spawn (conftest.py)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _guard(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _guard(item):
        yield


def _guard(item):
    import contextlib
    import multiprocessing.process
    import subprocess
    from unittest import mock

    if item.get_closest_marker("spawn"):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(subprocess.Popen, "_execute_child", _refuse))
    stack.enter_context(mock.patch.object(multiprocessing.process.BaseProcess, "start", _refuse))
    return stack
