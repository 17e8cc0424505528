"""Preparing data at scale: streamed inputs, a process pool, sharded output, resume after a kill, and
reading blocks across shards (the same blocks, batches and data position as one file). Tiny corpora
and small --shard_tokens keep it to seconds."""
import gzip
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydoc_data.topics
import pytest
import torch

from relora_dist.data import (DEFAULT_CORPUS, DEFAULT_TOKENIZER, BlockLoader, DataError, PackedBlocks,
                              load_documents, prepare_dataset, read_meta)
from relora_dist.data.prepare import _val_mask
from relora_dist.data.stream import usable_cores
from relora_dist.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
DOCS = [t for t in pydoc_data.topics.topics.values() if t]  # 79 docs, ~0.46 MB
SEQ = 64


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One input of each streamed kind: plain .jsonl (byte ranges), .jsonl.gz (ranges of its decompressed
    bytes, each unit's worker decompressing up to its start),
    a CRLF .txt of paragraphs and a parquet file of several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("scale-src")
    lines = [json.dumps({"text": t}) + "\n" for t in DOCS]
    (root / "a.jsonl").write_text("".join(lines[:40]))
    (root / "b.jsonl.gz").write_bytes(gzip.compress("".join(lines[40:]).encode()))
    (root / "c.txt").write_bytes("\r\n\r\n\r\n".join(DOCS[:20]).replace("\n", "\r\n").encode())
    pq.write_table(pa.table({"body": DOCS[20:50]}), root / "d.parquet", row_group_size=4)
    return [str(root / n) for n in ("a.jsonl", "b.jsonl.gz", "c.txt", "d.parquet")]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def _stream(folder, split):
    meta = read_meta(str(folder))
    names = [n for n, *_ in meta["shards"][split]] if "shards" in meta else [f"{split}.bin"]
    return np.concatenate([np.fromfile(Path(folder, n), dtype=meta["dtype"]) for n in names])


@pytest.mark.spawn
def test_same_bytes_for_any_num_proc_and_same_documents_as_load_documents(sources, tmp_path):
    kw = dict(val_fraction=0.2, seed=3, text_field="body", shard_tokens=20_000, progress=False)
    with pytest.raises(DataError, match="--text_field"):  # the jsonl files hold "text", not "body"
        prepare_dataset(sources, DEFAULT_TOKENIZER, str(tmp_path / "x"), SEQ, **kw)
    src = sources[:3] + [sources[3]]
    kw["text_field"] = "text"
    pq_src = tmp_path / "d.parquet"  # the parquet copy with a "text" column
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(sources[3]).rename_columns(["text"]), pq_src, row_group_size=4)
    src[3] = str(pq_src)
    one = prepare_dataset(src, DEFAULT_TOKENIZER, str(tmp_path / "p1"), SEQ, num_proc=1, **kw)
    two = prepare_dataset(src, DEFAULT_TOKENIZER, str(tmp_path / "p2"), SEQ, num_proc=2, **kw)
    assert one == two and one["format_version"] == 2 and len(one["shards"]["train"]) > 3
    assert _files(tmp_path / "p1") == _files(tmp_path / "p2")  # byte-identical, meta.json included
    # The streamed readers see the documents datasets reads, split by the seeded document permutation.
    tok = load_tokenizer(DEFAULT_TOKENIZER)
    docs = list(load_documents(src)["text"])
    assert len(docs) == sum(one["num_documents"].values()) > 79 + 30
    mask = _val_mask(len(docs), 0.2, 3)
    for split in ("train", "val"):
        ref = [i for d, v in zip(docs, mask) if v == (split == "val") for i in tok.encode(d) + [tok.eos_id]]
        assert _stream(tmp_path / "p1", split).tolist() == ref


def _cli(out, *extra, **popen):
    code = "import sys; from relora_dist.tools.prepare_data import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code, "--out", str(out), "--seq_len", str(SEQ), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.spawn
def test_killed_preparation_resumes_after_its_finished_shards(tmp_path):
    """SIGKILL once the first shards are recorded; the same command keeps them (same inode and mtime:
    not tokenized again) and the result is byte-identical to an uninterrupted preparation."""
    args = ("--shard_tokens", "40000", "--num_proc", "2")
    out = tmp_path / "out"
    p = _cli(out, *args)
    deadline = time.time() + 60
    manifest = None
    while time.time() < deadline and p.poll() is None:
        found = list(tmp_path.glob(".out.tmp-*/manifest.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 3:  # header + 2 shards
            manifest = found[0]
            p.kill()
            break
        time.sleep(0.005)
    p.communicate(timeout=30)
    assert manifest is not None and p.returncode == -signal.SIGKILL, "the preparation ended before the kill"
    tmp = manifest.parent
    recorded = [json.loads(x) for x in manifest.read_text().splitlines()[1:]]
    kept = {n: (os.stat(tmp / n).st_ino, os.stat(tmp / n).st_mtime_ns)
            for e in recorded for n in (f"train-{e['shard']:05d}.bin", f"val-{e['shard']:05d}.bin")}
    assert not out.exists() and len(kept) >= 4
    again = _cli(out, *args)
    stdout, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    assert f"{len(recorded)} finished shards kept" in stderr
    for name, stamp in kept.items():  # renamed into --out with the folder, never rewritten
        assert (os.stat(out / name).st_ino, os.stat(out / name).st_mtime_ns) == stamp, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    ref = tmp_path / "ref"
    meta = prepare_dataset([DEFAULT_CORPUS], DEFAULT_TOKENIZER, str(ref), SEQ, shard_tokens=40_000, progress=False)
    assert _files(out) == _files(ref) and len(meta["shards"]["train"]) > len(recorded)


@pytest.mark.spawn
def test_sigterm_stops_the_pool_and_keeps_the_shards(tmp_path):
    p = _cli(tmp_path / "out", "--shard_tokens", "40000", "--num_proc", "2")
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:
        found = list(tmp_path.glob(".out.tmp-*/manifest.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 2:
            p.send_signal(signal.SIGTERM)
            break
        time.sleep(0.005)
    _, stderr = p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM, stderr
    assert "run the same command again" in stderr and "Traceback" not in stderr


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The bundled corpus prepared as one file and as ~24 shards (blocks then span shards)."""
    root = tmp_path_factory.mktemp("layouts")
    one = prepare_dataset([DEFAULT_CORPUS], DEFAULT_TOKENIZER, str(root / "one"), SEQ, progress=False)
    many = prepare_dataset([DEFAULT_CORPUS], DEFAULT_TOKENIZER, str(root / "many"), SEQ, shard_tokens=40_000,
                           progress=False)
    return root / "one", root / "many", one, many


def test_sharded_blocks_batches_and_resume_equal_one_file(layouts):
    one, many, m1, m2 = layouts
    assert m1["format_version"] == 1 and "shards" not in m1 and sorted(os.listdir(one)) == [
        "meta.json", "train.bin", "val.bin"]
    assert m2["num_blocks"] == m1["num_blocks"] and m2["num_tokens"] == m1["num_tokens"]
    for split, seq in (("train", SEQ), ("val", SEQ), ("train", SEQ // 4)):
        a, b = PackedBlocks(str(one), split, seq), PackedBlocks(str(many), split, seq)
        assert len(a) == len(b) and torch.equal(a.get_batch(range(len(a))), b.get_batch(range(len(b))))
        assert torch.equal(a[len(a) - 1], b[-1])
    starts = np.cumsum([n for _, n, _ in m2["shards"]["train"]])[:-1]
    assert any(s % SEQ for s in starts)  # some blocks do span two shards
    blocks = PackedBlocks(str(many), "train", SEQ)
    assert len(pickle.dumps(blocks)) < 20_000 and torch.equal(pickle.loads(pickle.dumps(blocks))[5], blocks[5])
    # the loader: same batches as one file, and a resume from a saved position continues exactly
    mk = lambda d: BlockLoader(PackedBlocks(str(d), "train", SEQ), 4, 2, 0, 1, seed=5)  # noqa: E731
    a, b = mk(one), mk(many)
    spe = b.steps_per_epoch
    first = [torch.cat(b.next_batch()) for _ in range(spe + 2)]
    assert all(torch.equal(x, torch.cat(a.next_batch())) for x in first)
    state = b.state_dict()
    expected = [torch.cat(b.next_batch()) for _ in range(3)]
    c = mk(many)
    c.load_state_dict(state)
    assert state == {"epoch": 1, "step_in_epoch": 2}
    assert all(torch.equal(x, torch.cat(c.next_batch())) for x in expected)


def test_fingerprint_covers_every_shard_and_damage_is_named(layouts, tmp_path):
    import shutil

    from relora_dist.runtime.run_guard import data_fingerprint

    _, many, _, m2 = layouts
    listed = {s: [[n, t, hashlib.sha256((many / n).read_bytes()).hexdigest()] for n, t, _ in m2["shards"][s]]
              for s in ("train", "val")}
    assert listed == m2["shards"]
    assert data_fingerprint(many) == m2["data_sha256"] == hashlib.sha256(
        json.dumps(listed, sort_keys=True).encode()).hexdigest()
    bad = tmp_path / "bad"
    shutil.copytree(many, bad)
    name = m2["shards"]["train"][3][0]
    (bad / name).write_bytes((bad / name).read_bytes()[:-2])
    with pytest.raises(DataError, match=f"{name} has .* bytes, meta.json expects"):
        PackedBlocks(str(bad), "train", SEQ)


def test_single_file_folders_of_earlier_versions_still_load(layouts, tmp_path):
    import shutil

    one, _, m1, _ = layouts
    old = tmp_path / "old"
    shutil.copytree(one, old)
    meta = {k: v for k, v in m1.items() if k not in ("split_rule", "shard_tokens")}  # what they wrote
    (old / "meta.json").write_text(json.dumps(meta))
    a, b = PackedBlocks(str(one), "train", SEQ), PackedBlocks(str(old), "train", SEQ)
    assert torch.equal(a.get_batch(range(len(a))), b.get_batch(range(len(b))))
    (old / "meta.json").write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(DataError, match="data format 3, this code reads 1 and 2"):
        PackedBlocks(str(old), "train", SEQ)


@pytest.mark.spawn
def test_cli_defaults():
    from relora_dist.data import prepare
    from relora_dist.tools import prepare_data

    assert prepare_data.DEFAULT_SHARD_TOKENS == prepare.DEFAULT_SHARD_TOKENS
    assert usable_cores() == len(os.sched_getaffinity(0))
    help_text = subprocess.run([sys.executable, "-c", "from relora_dist.tools.prepare_data import main; main()",
                                "--help"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                               cwd=REPO).stdout
    assert f"the usable cores, here {usable_cores()}" in " ".join(help_text.split())


def test_compressed_file_is_cut_into_units_that_read_the_same_documents(tmp_path):
    """A .gz input is one counting task; its worker cuts it into units of decompressed byte ranges, and
    each unit's documents (read by decompressing up to its start) are the file's, in order, once."""
    from relora_dist.data import stream
    from relora_dist.data.pool import Pool

    lines = "".join(json.dumps({"text": t}) + "\n" for t in DOCS)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "a.jsonl").write_text(lines)
    with Pool((DEFAULT_TOKENIZER, "uint16", "text"), 1):
        for name in ("a.jsonl.gz", "a.jsonl"):
            tasks = list(stream.plan_tasks([str(tmp_path / name)], "paragraph", 1 << 16))
            units = [u for t in tasks for u in stream.count(t, 1 << 16)]
            assert len(units) > 4 and (len(tasks) == 1) == name.endswith(".gz")
            docs = [list(stream._documents(*u[1:3], name)) for u, _ in units]
            assert [len(d) for d in docs] == [n for _, n in units]
            assert [t for d in docs for t in d] == DOCS
