"""Reading documents from local files (and Hugging Face datasets): the first stage of the data
pipeline, and what tokenizer training reads. It needs no tokenizer, so both relora_dist.tokenizer
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
            raise DataError(f"{key} '{src}' is empty (0 bytes); pass a file with text, or drop it from {key}")
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
    check_sources(sources)
    for src in sources:
        builder = _builder_for(src)
        if groups and groups[-1][0] == builder:
            groups[-1][1].append(os.path.abspath(src))
        else:
            groups.append((builder, [os.path.abspath(src)]))
    for builder, files in groups:
        kwargs = {"sample_by": txt_split} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
        if builder == "text" and txt_split == "paragraph":
            # datasets keeps separator newlines on paragraph edges; they belong to no document.
            ds = ds.map(lambda b: {"text": [t.strip("\n") for t in b["text"]]}, batched=True)
        parts.append(_text_column(ds, "text" if builder == "text" else text_field, files[0]))
    if hf_dataset:
        name, _, config = hf_dataset.partition(":")
        ds = datasets.load_dataset(name, config or None, split=hf_split)
        parts.append(_text_column(ds, text_field, hf_dataset))
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return ds.filter(lambda b: [bool(t) for t in b["text"]], batched=True)


def _text_column(ds, field: str, where: str):
    if field not in ds.column_names:
        raise DataError(f"{where!r} has no column {field!r} (columns: {ds.column_names}); "
                        f"pass --text_field with the right one")
    ds = ds.select_columns([field])
    return ds.rename_column(field, "text") if field != "text" else ds
