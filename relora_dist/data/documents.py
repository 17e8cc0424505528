"""Reading documents from local files (and Hugging Face datasets): the first stage of the data
pipeline, and what tokenizer training reads. It needs no tokenizer, so both relora_dist.data.tokenizer
and relora_dist.data build on it (it lives outside the data package so that importing it does
not import the package's tokenizer-dependent modules).
"""
from __future__ import annotations

import os

from relora_dist import resources

__all__ = ["DataError", "check_sources", "load_documents"]

DEFAULT_CORPUS = resources.CORPUS


class DataError(ValueError):
    """A data problem the user can fix; the message is one line naming the fix."""


_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json",
             ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSION = (".xz", ".gz", ".bz2", ".zst", ".lz4")


def check_sources(sources: list[str], key: str = "data file", refuse_empty: bool = False) -> None:
    """Every source is an existing file of a supported type (`refuse_empty`: and not 0 bytes)."""
    for src in sources:
        if not os.path.isfile(src):
            raise DataError(f"{key} '{src}' not found; pass an existing file (.txt, .jsonl, .jsonl.xz, .parquet) "
                            f"or leave the sources empty for the bundled corpus {DEFAULT_CORPUS}")
        if refuse_empty and os.path.getsize(src) == 0:
            raise DataError(f"{key} '{src}' is empty (0 bytes); pass a file with text, or drop it")
        _builder_for(src, key)


def _builder_for(path: str, key: str = "data file") -> str:
    name = path.lower()
    for ext in _COMPRESSION:  # datasets decompresses these transparently
        if name.endswith(ext):
            name = name[: -len(ext)]
    for ext, builder in _BUILDERS.items():
        if name.endswith(ext):
            return builder
    raise DataError(f"unsupported {key} '{path}'; use .txt, .jsonl, .jsonl.xz or .parquet")


def load_documents(sources: list[str] | None, text_field: str = "text",
                   txt_split: str = "paragraph", hf_dataset: str | None = None,
                   hf_split: str = "train"):
    """Load documents as a ``datasets.Dataset`` with one column ``"text"``, in source order.

    Local files go through ``datasets.load_dataset("text"|"json"|"parquet")``; ``text_field``
    names the column of json/parquet files. In text files a document is a blank-line
    separated paragraph (``txt_split="paragraph"``), a line (``"line"``) or the whole file
    (``"document"``). ``hf_dataset`` ("name" or "name:config") is loaded with ``hf_split``.
    Empty documents are dropped (they would only add a lone EOS).
    """
    import datasets

    if txt_split not in ("paragraph", "line", "document"):
        raise DataError(f"txt_split={txt_split!r} is invalid; use paragraph, line or document")
    sources = list(sources or [])
    if not sources and not hf_dataset:
        raise DataError("no data given; pass source files (e.g. DEFAULT_CORPUS) or hf_dataset")
    parts = []
    # Consecutive files of the same kind load in one call (order is preserved inside it).
    groups: list[tuple[str, list[str]]] = []
    check_sources(sources, refuse_empty=True)  # datasets fails on a 0-byte file with a long traceback
    for src in sources:
        builder = _builder_for(src)
        if groups and groups[-1][0] == builder:
            groups[-1][1].append(os.path.abspath(src))
        else:
            groups.append((builder, [os.path.abspath(src)]))
    for builder, files in groups:
        kwargs = {"sample_by": txt_split} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
            if builder == "text" and txt_split == "paragraph":
                # datasets keeps separator newlines on paragraph edges; they belong to no document.
                ds = ds.map(lambda b: {"text": [t.strip("\n") for t in b["text"]]}, batched=True)
            # Filtering reads every row, so text that does not decode fails here, inside the try.
            parts.append(_nonempty(_text_column(ds, "text" if builder == "text" else text_field, files[0])))
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - datasets wraps UnicodeDecodeError, ArrowInvalid, ... in its own
            raise _unreadable(files, builder, e) from None
    if hf_dataset:
        name, _, config = hf_dataset.partition(":")
        ds = datasets.load_dataset(name, config or None, split=hf_split)
        parts.append(_nonempty(_text_column(ds, text_field, hf_dataset)))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _nonempty(ds):
    return ds.filter(lambda b: [bool(t) for t in b["text"]], batched=True)


def _unreadable(files: list[str], builder: str, e: BaseException) -> DataError:
    """The one-line error for files datasets could not read: the first file whose bytes explain
    it (invalid UTF-8, a lone surrogate escape, a line that is not JSON, no text at all), else the
    innermost cause datasets reported. Only runs after a failure, so a good corpus is read once."""
    for path in files:
        problem = _find_problem(path, builder)
        if problem:
            return DataError(f"data file '{path}' {problem}")
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    cause = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    return DataError(f"could not read {', '.join(repr(f) for f in files)} as {builder} ({cause}); check that each "
                     f"is valid UTF-8 {builder} text with a column of documents")


_FIX_UTF8 = ("re-encode it as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8 IN > OUT) or drop the bad bytes "
             "(iconv -c -f UTF-8 -t UTF-8 IN > OUT)")


def _find_problem(path: str, builder: str) -> str | None:
    """What makes `path` unreadable, with its line and byte offset, or None if the bytes look fine
    (or cannot be scanned here: parquet, .zst/.lz4)."""
    import bz2
    import gzip
    import json
    import lzma

    if builder == "parquet":
        return None
    opener = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}.get(os.path.splitext(path)[1].lower(), open)
    if path.lower().endswith((".zst", ".lz4")):
        return None
    jsonl = builder == "json" and ".jsonl" in path.lower()  # a .json file may be one multi-line array
    offset, has_text = 0, False
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as u:
                return (f"is not valid UTF-8 at line {lineno} (byte {offset + u.start}: "
                        f"{raw[u.start:u.start + 4]!r}); {_FIX_UTF8}")
            offset += len(raw)
            has_text = has_text or bool(line.strip())
            if not jsonl or not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as j:
                return f"line {lineno} is not valid JSON ({j}); fix or drop that line (one JSON object per line)"
            try:
                json.dumps(record, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as u:
                return (f"line {lineno} holds a lone UTF-16 surrogate escape ({u.object[u.start:u.end]!r} is half a "
                        f"character pair); replace that escape with the character it stands for, or drop it")
    if not has_text:
        return "holds no text (only blank lines); pass a file with text, or drop it"
    return None


def _text_column(ds, field: str, where: str):
    if field not in ds.column_names:
        raise DataError(f"{where!r} has no column {field!r} (columns: {ds.column_names}); "
                        f"pass --text_field with the right one")
    ds = ds.select_columns([field])
    return ds.rename_column(field, "text") if field != "text" else ds
