"""Data prepared on first use: no collective waits on it (relora_dist/data/first_use.py)."""

import time

import pytest

from relora_dist.data import DataError
from relora_dist.data.first_use import WaitError, wait_for_prepared
from tests.dist_utils import run_world, tiny_overrides


class _Store:
    def __init__(self, **values):
        self.values = {k: str(v).encode() for k, v in values.items()}
        self.counts = {}

    def check(self, keys):
        return all(k in self.values for k in keys)

    def get(self, key):
        return self.values[key]

    def add(self, key, n):
        self.counts[key] = self.counts.get(key, 0) + n
        return self.counts[key]


def test_waiter_returns_fails_with_the_preparer_and_has_its_own_bound(tmp_path, capsys):
    done = tmp_path / "done"
    done.mkdir()
    (done / "meta.json").write_text("{}")
    assert wait_for_prepared(str(done), 5, rank=1, preparer=0) == str(done)

    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"^rank 1: preparing the data failed on rank 0: DataError: bad bytes$"):
        wait_for_prepared(str(tmp_path / "x"), 60, rank=1, preparer=0, store=_Store(k="error DataError: bad bytes"),
                          key="k")
    assert time.monotonic() - t0 < 1  # at the first poll, not after the bound

    store = _Store()
    with pytest.raises(WaitError, match=r"waited data.prepare_timeout_s=1.5 s for rank 0 .* "
                                        r"run relora-prepare-data --input a.txt"):
        wait_for_prepared(str(tmp_path / "x"), 1.5, rank=1, preparer=0, store=store, key="k",
                          hint="run relora-prepare-data --input a.txt", progress_every_s=0.5)
    assert store.counts["k/gave_up"] == 1  # the preparer learns it and stops the run too
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith(f"rank 1: waiting for rank 0 to prepare the data into {tmp_path / 'x'}")
                         for line in lines), lines


@pytest.mark.spawn
def test_two_ranks_prepare_longer_than_the_process_group_timeout(tmp_path):
    """One 2-rank launch whose process groups time out after 5 s: a source that does not decode
    fails both ranks within seconds, with rank 0's reason; then rank 0 prepares the bundled
    corpus for over 8 s while rank 1 waits on the file system, and training runs."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa not text\n\n\x80\x81\n")
    overrides = tiny_overrides("", tmp_path / "run", **{"data.prepared_dir": "", "data.cache_dir": tmp_path / "cache",
                                                       "data.prepare_timeout_s": 120, "train.max_steps": 2,
                                                       "relora.enabled": False})
    results = run_world(2, "first_use_without_collective", overrides, tmp_path / "out", pg_timeout_s=5,
                        bad_source=str(bad), delay_s=8.0)
    r0, r1 = results
    assert "bad.txt" in r0["failure"] and "\n" not in r0["failure"], r0["failure"]
    assert r1["failure"].startswith("rank 1: preparing the data failed on rank 0: "), r1["failure"]
    assert r1["fail_s"] < 30, r1  # not data.prepare_timeout_s
    assert r0["steps"] == r1["steps"] == 2
    assert "rank 0: preparing the data into" in r0["output"]
    assert "rank 1: waiting for rank 0 to prepare the data into" in r1["output"], r1["output"]
    # Both ranks read one folder, holding the bytes one process prepares from the same inputs.
    from relora_dist.data import DEFAULT_CORPUS, DEFAULT_TOKENIZER, prepare_dataset

    one = prepare_dataset([DEFAULT_CORPUS], DEFAULT_TOKENIZER, str(tmp_path / "one"), 32, progress=False)
    assert r0["data_dir"] == r1["data_dir"] and r0["data_sha256"] == r1["data_sha256"] == one["data_sha256"]
