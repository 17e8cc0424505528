"""Preparing data: documents -> token ids -> packed fixed-length blocks on disk (the format is
described in :mod:`relora_dist.data.blocks`). The cache that prepares a corpus on first use is in
first_use.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings

import numpy as np

from relora_dist import resources
from relora_dist.data.blocks import FORMAT_VERSION, SPLITS, DataError, check_seq_len
from relora_dist.documents import load_documents
from relora_dist.tokenizer import load_tokenizer, tokenizer_checksum

__all__ = ["DEFAULT_CORPUS", "DEFAULT_TOKENIZER", "prepare_dataset"]

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = resources.CORPUS
DEFAULT_TOKENIZER = resources.TOKENIZER

# ----------------------------------------------------------------------------- preparing
def _dtype_for(vocab_size: int) -> np.dtype:
    # ids are < vocab_size, so uint16 holds every id when vocab_size - 1 <= 65535.
    return np.dtype(np.uint16 if vocab_size - 1 <= np.iinfo(np.uint16).max else np.uint32)


def _val_mask(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation documents: a seeded random subset, so both splits span
    the whole corpus (the bundled one is ordered by book)."""
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)  # keep at least one doc on each side
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return mask


def prepare_dataset(sources: list[str] | None, tokenizer_dir: str, out_dir: str, seq_len: int,
                    val_fraction: float = 0.05, seed: int = 0, hf_dataset: str | None = None,
                    hf_split: str = "train", text_field: str = "text", num_proc: int = 1,
                    txt_split: str = "paragraph") -> dict:
    """Tokenize documents, split train/val by document, pack into ``seq_len`` blocks.

    Writes ``out_dir/{train,val}.bin`` (flat ids, tail shorter than a block dropped) and
    ``out_dir/meta.json`` (written last: its presence marks a complete directory).
    ``num_proc`` is the number of sentencepiece encoding threads. Returns the meta dict.
    """
    from tqdm.auto import tqdm

    check_seq_len(seq_len)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1); e.g. 0.05")
    tok = load_tokenizer(tokenizer_dir)
    dtype = _dtype_for(tok.vocab_size)
    docs = load_documents(sources, text_field=text_field, txt_split=txt_split,
                          hf_dataset=hf_dataset, hf_split=hf_split)
    n = len(docs)
    if n == 0:
        raise DataError("the sources contain no non-empty documents; check --input / --text_field")
    is_val = _val_mask(n, val_fraction, seed)
    eos = np.array([tok.eos_id], dtype=dtype)
    os.makedirs(out_dir, exist_ok=True)
    counts = {s: {"num_documents": 0, "num_tokens": 0} for s in SPLITS}
    files = {s: open(os.path.join(out_dir, f"{s}.bin"), "wb") for s in SPLITS}
    try:
        batch = 512
        with tqdm(total=n, unit="doc", desc="tokenizing", mininterval=1.0) as bar:
            for start in range(0, n, batch):
                texts = docs[start:start + batch]["text"]
                for j, ids in enumerate(tok.encode_batch(texts, num_threads=num_proc)):
                    split = "val" if is_val[start + j] else "train"
                    # Streamed to disk per document: memory stays flat for large corpora.
                    files[split].write(np.asarray(ids, dtype=dtype).tobytes())
                    files[split].write(eos.tobytes())
                    counts[split]["num_documents"] += 1
                    counts[split]["num_tokens"] += len(ids) + 1
                bar.update(len(texts))
        for s in SPLITS:
            blocks = counts[s]["num_tokens"] // seq_len
            counts[s]["num_blocks"] = blocks
            files[s].truncate(blocks * seq_len * dtype.itemsize)  # drop the partial tail
    finally:
        for f in files.values():
            f.close()
    if val_fraction > 0 and counts["val"]["num_blocks"] == 0:
        fix = ("the sources are a single document and the split takes whole documents, so no val_fraction "
               "helps: split the text into documents (blank lines between paragraphs, txt_split='line', or one "
               "jsonl record each)" if n == 1 else "raise val_fraction to evaluate")
        warnings.warn(f"validation split has {counts['val']['num_tokens']} tokens, fewer than "
                      f"one block of {seq_len}; {fix}")
    meta = {
        "format_version": FORMAT_VERSION,
        # what a resume compares (run_guard.data_fingerprint): the bytes a run reads
        "data_sha256": _sha256_files([os.path.join(out_dir, f"{s}.bin") for s in SPLITS]),
        "source_identity": source_identity(sources, hf_dataset, hf_split),
        "tokenizer_checksum": tokenizer_checksum(tokenizer_dir),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "seq_len": seq_len,
        "dtype": dtype.name,
        "num_documents": {s: counts[s]["num_documents"] for s in SPLITS},
        "num_tokens": {s: counts[s]["num_tokens"] for s in SPLITS},
        "num_blocks": {s: counts[s]["num_blocks"] for s in SPLITS},
        "val_fraction": val_fraction,
        "seed": seed,
        "sources": [os.path.abspath(s) for s in sources or []]
                   + ([f"hf:{hf_dataset}[{hf_split}]"] if hf_dataset else []),
        "text_field": text_field,
        "txt_split": txt_split,
    }
    tmp = os.path.join(out_dir, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "meta.json"))
    logger.info("prepared %s: %s", out_dir, meta["num_blocks"])
    return meta


def _sha256_files(paths: list[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def source_identity(sources, hf_dataset=None, hf_split="train") -> list:
    """What the inputs are, by content: [size, sha256] per local file in order, then "hf:name[split]".
    relora-prepare-data compares it to tell whether --out already holds this preparation. Content,
    not paths: the same corpus reached through an installed package or a checkout is the same input,
    and hashing (~1 GB/s) costs a fraction of tokenizing the same bytes (~10 MB/s per process)."""
    ids = []
    for src in sources or []:
        if os.path.isfile(src):
            ids.append([os.stat(src).st_size, _sha256_files([src])])
    return ids + ([f"hf:{hf_dataset}[{hf_split}]"] if hf_dataset else [])

