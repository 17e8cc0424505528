"""Streaming documents to token shards on a pool of processes, in bounded memory.

The inputs are cut into *units* of about `unit_bytes` of text, in input order: a byte range of a plain
.jsonl/.txt file (cut at a line or paragraph break), a range of the decompressed bytes of a
.gz/.xz/.bz2/.zst file, a run of parquet row groups, or a list of texts of a Hugging Face dataset. Each
unit becomes one shard: the worker that takes it opens the input itself, decompresses, tokenizes and
writes ``train-NNNNN.bin`` / ``val-NNNNN.bin`` (fsynced, then renamed); this process only schedules
units and records the finished ones (shards.ShardLog). Units depend on the inputs and `unit_bytes`
only, never on the number of processes: the same inputs give the same bytes for any num_proc.
A worker holds one block of text (<= 4 MB) and its token ids at a time, whatever the unit's size.

Why the workers read their inputs: when this process decompressed the .gz inputs and sent the text
to the workers, 2 processes kept 0.92 cores busy (benchmarks/data/bench_prepare_100mb.json); now the
main process uses 1.8 s of CPU in a 20 s run and 2 processes tokenize 1.96x as fast as one
(bench_prepare_100mb_workers.json, .json.gz, machine alone). A compressed file cannot be entered in
the middle, so a unit after the first of a file decompresses and drops the bytes before it: at
~150 MB/s of gzip output (measured, one process) against ~3 MB/s of text tokenized per process, the
second 512 MB unit of a C4 file (~0.8 GB of JSON each) skips in ~3.5 s of its ~170 s. A single compressed file of many GB is where it adds up (each unit skips half
the file on average, and one process counts the whole file first): split it or decompress it.

Split by document, as a seeded permutation of the whole document list (the rule of every earlier
preparation, so a corpus prepared again gives the same split and the documented figures hold):
`count` runs first over the same units (parsing only, no tokenizing, on the same pool), then each
unit's `work` gets its slice of the validation mask. The counting pass reads the inputs twice:
measured, 7 % of tokenizing for the bundled corpus at one process. A streamed --hf_dataset is
downloaded twice (this process reads it; download its files and pass them as --input instead). A
per-document hash rule needs no count, but it moved the default run's final eval perplexity from
75.8 to 98.2 (another 51 of 1,189 documents held out), which would have stranded every figure
measured before.

Workers import no torch (numpy, the tokenizer and pyarrow only): a spawned worker then costs ~30 MB
and ~0.2 s instead of ~220 MB and ~2 s (measured, torch 2.x CPU).
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import itertools
import json
import lzma
import os
import re
import threading
import time
from typing import Iterator

import numpy as np

from relora_dist.data.documents import DataError, _builder_for, _find_problem, check_sources

__all__ = ["usable_cores", "plan_tasks", "hf_units", "count", "work", "BLOCK_BYTES", "BYTES_PER_TOKEN"]

BLOCK_BYTES = 4 << 20  # text a worker holds at once: ~1M tokens, ~0.5 s of one process
BYTES_PER_TOKEN = 4  # unit size = shard_tokens x this (measured 4.3 bytes of C4-like text per token, 32k BPE)
_ENCODE_CHARS = 1 << 20  # documents per encode call: up to ~1 MB of text (bounds the Python id lists)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a Slurm or taskset allocation)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- the inputs as units
_COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


def _compression(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    if ext in _COMPRESSED:
        return ext
    if ext == ".zst":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise DataError(f"data file '{path}' is zstd-compressed; pip install zstandard, or decompress it "
                            f"(zstd -d)") from None
        return ext
    if ext == ".lz4":
        raise DataError(f"data file '{path}' is lz4-compressed, which is not streamed; decompress it (lz4 -d) or "
                        f"recompress it as .gz / .xz")
    return None


def _open_binary(path: str):
    comp = _compression(path)
    if comp == ".zst":
        import io

        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return _COMPRESSED[comp](path, "rb") if comp else open(path, "rb")


def _format(path: str, txt_split: str) -> str:
    """jsonl | json (one JSON array) | line | paragraph | document | parquet."""
    builder = _builder_for(path)
    if builder == "parquet":
        return "parquet"
    if builder == "text":
        return txt_split
    if ".jsonl" in os.path.basename(path).lower():
        return "jsonl"
    with _open_binary(path) as f:  # a .json file may be JSON lines or one array
        head = f.read(4096).lstrip()
    return "json" if head[:1] == b"[" else "jsonl"


# Where a unit may end: after a line (jsonl, line) or after an empty line (paragraph; CRLF too).
_BREAK = {"jsonl": re.compile(rb"\n"), "line": re.compile(rb"\n"), "paragraph": re.compile(rb"\n\r?\n")}


def _next_break(f, pos: int, pattern) -> int:
    """Offset just after the first break at or after `pos` in the seekable binary file `f` (EOF if none)."""
    f.seek(pos)
    carry = b""
    while True:
        block = f.read(1 << 16)
        if not block:
            return pos + len(carry)
        m = pattern.search(carry + block)
        if m:
            return pos + m.end()
        keep = carry + block
        tail = min(2, len(keep))  # a break may straddle two blocks
        pos, carry = pos + len(keep) - tail, keep[len(keep) - tail:]


def plan_tasks(sources: list[str], txt_split: str, unit_bytes: int) -> Iterator[tuple]:
    """The counting tasks of the local inputs, in order: (source index, format, payload, where). A
    task is one unit, except a compressed file or a parquet file: `count` cuts those into units.
    Payloads: ("range", path, start, end), ("scan", path), ("parquet", path), ("file", path)."""
    check_sources(sources, refuse_empty=True)
    for i, path in enumerate(sources):
        fmt = _format(path, txt_split)
        if fmt == "parquet":
            yield i, fmt, ("parquet", path), path
        elif fmt in ("json", "document"):  # one JSON array / one document: the whole file is one unit
            yield i, fmt, ("file", path), path
        elif _compression(path) is None:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                start = 0
                while start < size:
                    end = min(size, _next_break(f, start + unit_bytes - 1, _BREAK[fmt]))
                    yield i, fmt, ("range", path, start, end), path
                    start = end
        else:
            yield i, fmt, ("scan", path), path


def hf_units(index: int, hf: tuple[str, str], text_field: str, unit_bytes: int) -> Iterator[tuple]:
    """Units of a Hugging Face dataset: lists of texts, read by this process (no file to hand over)."""
    import datasets

    name, split = hf
    repo, _, config = name.partition(":")
    # A sliced split ("train[:1%]") needs the non-streaming loader; a whole split is streamed.
    ds = datasets.load_dataset(repo, config or None, split=split, streaming="[" not in split)
    if text_field not in (ds.column_names or [text_field]):
        raise DataError(f"{name!r} has no column {text_field!r} (columns: {ds.column_names}); pass --text_field "
                        f"with the right one")
    texts, size = [], 0
    for row in ds:
        t = row.get(text_field)
        if t:
            texts.append(t)
            size += len(t)
        if size >= unit_bytes:
            yield index, "texts", ("texts", texts), name
            texts, size = [], 0
    if texts:
        yield index, "texts", ("texts", texts), name


class _Limited:
    """The next `n` bytes of a binary stream."""

    def __init__(self, f, n: int):
        self.f, self.n = f, n

    def read(self, k: int) -> bytes:
        b = self.f.read(min(k, self.n)) if self.n > 0 else b""
        self.n -= len(b)
        return b


def _chunks(f, size: int, pattern) -> Iterator[bytes]:
    """A stream cut into pieces of >= size bytes (the last may be shorter) that end at a break."""
    rest = b""
    while True:
        block = f.read(size)
        if not block:
            if rest:
                yield rest
            return
        data = rest + block
        if len(data) < size:
            rest = data
            continue
        m = None
        for m in pattern.finditer(data, max(0, size - 2)):
            break
        if m is None:
            rest = data
            continue
        yield data[:m.end()]
        rest = data[m.end():]


# ----------------------------------------------------------------------------- the worker side
_W: dict = {}


def _init_worker(tokenizer_dir: str, dtype: str, text_field: str, parent: int | None = None, progress=None) -> None:
    from relora_dist.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    _W.update(tok=tok, dtype=np.dtype(dtype), eos=tok.eos_id, field=text_field, progress=progress)
    if parent is not None:  # a killed parent (SIGKILL) cannot stop its pool: leave on our own
        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def _decode_error(path: str, fmt: str, e: Exception) -> DataError:
    problem = _find_problem(path, "json" if fmt in ("jsonl", "json") else "text")
    return DataError(f"data file '{path}' {problem}" if problem else
                     f"could not read '{path}' as {fmt} ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                     f"check that it is valid UTF-8")


def _blocks(fmt: str, payload: tuple) -> Iterator[bytes]:
    """The unit's bytes as blocks of <= ~BLOCK_BYTES that end at breaks (a whole file for json/document)."""
    kind, path = payload[0], payload[1]
    if kind == "file":
        with _open_binary(path) as f:
            yield f.read()
        return
    with (open(path, "rb") if kind == "range" else _open_binary(path)) as f:
        start, end = payload[2], payload[3]
        if kind == "range":
            f.seek(start)
        else:  # a compressed stream: decompress and drop what precedes the unit
            while start > 0:
                start -= len(f.read(min(start, BLOCK_BYTES)) or b"\0" * start)  # (EOF: the file shrank)
        yield from _chunks(_Limited(f, end - payload[2]), BLOCK_BYTES, _BREAK[fmt])


def _parse(fmt: str, data: bytes, where: str) -> Iterator[str]:
    if fmt in ("jsonl", "json"):
        yield from _json_texts(data, fmt, where)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _decode_error(where, fmt, e) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads them
    if fmt == "document":
        pieces = [text]
    elif fmt == "line":
        pieces = text.split("\n")
    else:  # paragraph: blank-line separated, separator newlines belong to no document
        pieces = (p.strip("\n") for p in text.split("\n\n"))
    yield from (p for p in pieces if p)


def _parquet_texts(path: str, groups: list[int], where: str) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if _W["field"] not in pf.schema_arrow.names:
        raise DataError(f"{where!r} has no column {_W['field']!r} (columns: {pf.schema_arrow.names}); pass "
                        f"--text_field with the right one")
    for g in groups:
        yield [t for b in pf.iter_batches(batch_size=1024, row_groups=[g], columns=[_W["field"]])
               for t in b.column(0).to_pylist() if t]


def _documents(fmt: str, payload: tuple, where: str) -> Iterator[str]:
    if payload[0] == "texts":
        yield from payload[1]
    elif payload[0] == "rowgroups":
        for texts in _parquet_texts(payload[1], payload[2], where):
            yield from texts
    else:
        for data in _blocks(fmt, payload):
            yield from _parse(fmt, data, where)


def _json_texts(data: bytes, fmt: str, where: str) -> Iterator[str]:
    field, records, found = _W["field"], 0, False
    try:
        rows = json.loads(data) if fmt == "json" else (json.loads(line) for line in data.split(b"\n") if line.strip())
        for row in rows:
            records += 1
            t = row.get(field) if isinstance(row, dict) else None
            found = found or (isinstance(row, dict) and field in row)
            if t:
                if not isinstance(t, str):
                    raise DataError(f"{where!r}: column {field!r} holds {type(t).__name__}, not text; pass "
                                    f"--text_field with the text column")
                yield t
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, DataError):
            raise
        raise _decode_error(where, fmt, e) from None
    if records and not found:
        raise DataError(f"{where!r} has no column {field!r} in its records; pass --text_field with the right one")


def count(task: tuple, unit_bytes: int) -> list[tuple[tuple, int]]:
    """The units of one counting task with their numbers of documents (what `work` will see), without
    tokenizing. A compressed file is decompressed once here and cut every >= unit_bytes at a break."""
    index, fmt, payload, where = task
    kind = payload[0]
    if kind == "parquet":  # runs of whole row groups of >= unit_bytes of text
        units, groups, docs, size = [], [], 0, 0
        import pyarrow.parquet as pq

        for g in range(pq.ParquetFile(payload[1]).num_row_groups):
            texts = next(_parquet_texts(payload[1], [g], where))
            groups.append(g)
            docs, size = docs + len(texts), size + sum(map(len, texts))
            if size >= unit_bytes:
                units.append(((index, fmt, ("rowgroups", payload[1], groups), where), docs))
                groups, docs, size = [], 0, 0
        if groups or not units:
            units.append(((index, fmt, ("rowgroups", payload[1], groups), where), docs))
        return units
    if kind != "scan":
        return [(task, sum(1 for _ in _documents(fmt, payload, where)))]
    units, start, pos, docs = [], 0, 0, 0
    with _open_binary(payload[1]) as f:
        for data in _chunks(f, min(BLOCK_BYTES, unit_bytes), _BREAK[fmt]):
            pos += len(data)
            docs += sum(1 for _ in _parse(fmt, data, where))
            if pos - start >= unit_bytes:
                units.append(((index, fmt, ("zrange", payload[1], start, pos), where), docs))
                start, docs = pos, 0
    if pos > start or not units:
        units.append(((index, fmt, ("zrange", payload[1], start, pos), where), docs))
    return units


class _Split:
    """One split's shard file being written: ids appended, hashed, counted; fsynced and renamed at close."""

    def __init__(self, path: str):
        self.path, self.f, self.sha, self.docs, self.tokens = path, open(path + ".tmp", "wb"), hashlib.sha256(), 0, 0

    def add(self, ids: list, eos: int, dtype) -> None:
        raw = memoryview(np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype)).cast("B")
        self.f.write(raw)
        self.sha.update(raw)
        self.tokens += len(raw) // dtype.itemsize

    def close(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.path + ".tmp", self.path)
        return {"documents": self.docs, "tokens": self.tokens, "sha256": self.sha.hexdigest()}


def work(unit: tuple, val: bytes, out_dir: str, shard: int) -> dict:
    """Tokenize one unit into its shard ``{train,val}-<shard>.bin`` (every document ends with EOS); `val`
    holds one byte per document of the unit, 1 for a validation document. Returns the shard's
    manifest entry, written by the caller once the files are durable."""
    _index, fmt, payload, where = unit
    tok, dtype, eos = _W["tok"], _W["dtype"], _W["eos"]
    out = [_Split(os.path.join(out_dir, f"{s}-{shard:05d}.bin")) for s in ("train", "val")]
    batch, size, seen = [], 0, 0

    def flush():
        nonlocal seen
        ids = [[], []]
        for text_ids in tok.encode_batch(batch):
            if seen >= len(val):
                raise DataError(f"'{where}' changed while it was prepared (more documents than counted); "
                                f"prepare again from inputs nobody writes to")
            v = val[seen]
            seen += 1
            ids[v].append(text_ids)
            ids[v].append((eos,))
            out[v].docs += 1
        for s in (0, 1):
            out[s].add(ids[s], eos, dtype)
        if _W["progress"] is not None:
            with _W["progress"].get_lock():
                _W["progress"].value += sum(len(x) for s in (0, 1) for x in ids[s])
        batch.clear()

    try:
        for text in _documents(fmt, payload, where):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as u:
                problem = _find_problem(where, "json" if fmt in ("jsonl", "json") else "text") \
                    if payload[0] != "texts" else None
                raise DataError(f"data file '{where}' {problem}" if problem else
                                f"data file '{where}' holds a lone UTF-16 surrogate escape "
                                f"({u.object[u.start:u.end]!r} is half a character pair); replace that escape with "
                                f"the character it stands for, or drop it") from None
            batch.append(text)
            size += len(text)
            if size >= _ENCODE_CHARS:
                flush()
                size = 0
        if batch:
            flush()
        if seen != len(val):
            raise DataError(f"'{where}' changed while it was prepared (fewer documents than counted); "
                            f"prepare again from inputs nobody writes to")
        return {"shard": shard, "train": out[0].close(), "val": out[1].close()}
    finally:
        for s in out:
            s.f.close()
