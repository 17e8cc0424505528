"""Data pipeline: documents -> token ids -> packed fixed-length blocks -> per-rank batches.

Prepared data (one directory) = ``train.bin`` / ``val.bin`` (flat token ids, uint16 when the
vocabulary fits) + ``meta.json``. Blocks are ``seq_len`` consecutive tokens; documents are
concatenated with an EOS after each, so blocks cross document boundaries (standard packing).

Batching contract (the trainer relies on it so that N ranks == 1 rank at the same global
batch): see :class:`BlockLoader`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from relora_dist.tokenizer import load_tokenizer, tokenizer_checksum

__all__ = [
    "DataError", "DEFAULT_CORPUS", "DEFAULT_TOKENIZER", "FORMAT_VERSION", "SPLITS",
    "load_documents", "prepare_dataset", "ensure_prepared", "read_meta",
    "PackedBlocks", "BlockLoader", "DistributedBlockSampler", "eval_batches",
    "check_tokenizer_matches",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = str(REPO_ROOT / "assets" / "corpus" / "corpus.jsonl.xz")
DEFAULT_TOKENIZER = str(REPO_ROOT / "assets" / "tokenizer")

_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json",
             ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSION = (".xz", ".gz", ".bz2", ".zst", ".lz4")


class DataError(ValueError):
    """A data problem the user can fix; the message is one line naming the fix."""


# ----------------------------------------------------------------------------- loading
def _builder_for(path: str) -> str:
    name = path.lower()
    for ext in _COMPRESSION:  # datasets decompresses these transparently
        if name.endswith(ext):
            name = name[: -len(ext)]
    for ext, builder in _BUILDERS.items():
        if name.endswith(ext):
            return builder
    raise DataError(f"unsupported data file {path!r}; use .txt, .jsonl, .jsonl.xz or .parquet")


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
    for src in sources:
        if not os.path.isfile(src):
            raise DataError(f"data file {src!r} not found; check the path (or omit it to use "
                            f"the bundled corpus {DEFAULT_CORPUS})")
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

    if seq_len < 2:
        raise DataError(f"seq_len={seq_len} is too small; use a block length of at least 2")
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
        warnings.warn(f"validation split has {counts['val']['num_tokens']} tokens, fewer than "
                      f"one block of {seq_len}; raise val_fraction to evaluate")
    meta = {
        "format_version": FORMAT_VERSION,
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


def _cache_key(sources, tokenizer_dir, seq_len, val_fraction, seed, extra: dict) -> str:
    items = []
    for src in sources or []:
        if not os.path.isfile(src):
            raise DataError(f"data file {src!r} not found; check the path")
        st = os.stat(src)
        # path + size + mtime: cheap, and changes whenever the file is rewritten.
        items.append([os.path.abspath(src), st.st_size, st.st_mtime_ns])
    payload = {"format_version": FORMAT_VERSION, "sources": items,
               "tokenizer": tokenizer_checksum(tokenizer_dir), "seq_len": seq_len,
               "val_fraction": val_fraction, "seed": seed, **extra}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"L{seq_len}-{digest}"


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "meta.json"))


def _prepare_atomic(target: str, **kwargs) -> None:
    """Prepare into a temp dir beside ``target`` and rename it into place, so other
    processes never see a half-written directory; a lost race just discards our copy."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.tmp-")
    try:
        prepare_dataset(out_dir=tmp, **kwargs)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_prepared(sources: list[str] | None, tokenizer_dir: str, cache_dir: str, seq_len: int,
                    val_fraction: float = 0.05, seed: int = 0, *, hf_dataset: str | None = None,
                    hf_split: str = "train", text_field: str = "text",
                    txt_split: str = "paragraph", num_proc: int = 1) -> str:
    """Return a directory of prepared data for these inputs, preparing it on first use.

    Cached under ``cache_dir/<key>`` where the key hashes source paths+sizes+mtimes, the
    tokenizer checksum, seq_len, val_fraction and seed. Under an initialized
    ``torch.distributed`` only global rank 0 prepares; the others wait at a barrier.
    """
    extra = {"hf_dataset": hf_dataset, "hf_split": hf_split, "text_field": text_field,
             "txt_split": txt_split}
    target = os.path.join(os.path.abspath(cache_dir),
                          _cache_key(sources, tokenizer_dir, seq_len, val_fraction, seed, extra))
    kwargs = dict(sources=sources, tokenizer_dir=tokenizer_dir, seq_len=seq_len,
                  val_fraction=val_fraction, seed=seed, num_proc=num_proc, **extra)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        error = None
        if dist.get_rank() == 0 and not _is_complete(target):
            try:
                _prepare_atomic(target, **kwargs)
            except Exception as e:  # reach the barrier anyway, or the other ranks hang there
                error = e
        dist.barrier()
        if error is not None:
            raise error
    # Also the fallback when cache_dir is node-local in a multi-node run: a rank that still
    # does not see the data prepares its own copy (atomic rename keeps that race safe).
    if not _is_complete(target):
        _prepare_atomic(target, **kwargs)
    return target


# ----------------------------------------------------------------------------- reading
def read_meta(data_dir: str) -> dict:
    """Load and check ``data_dir/meta.json``; raise DataError naming the fix if unusable."""
    hint = f"run `python tools/prepare_data.py --out {data_dir}` first (or use ensure_prepared)"
    if not os.path.isdir(data_dir):
        raise DataError(f"prepared data directory {data_dir!r} does not exist; {hint}")
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{path!r} is missing (data not prepared or preparation interrupted); {hint}")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{data_dir!r} has data format {meta.get('format_version')}, this code "
                        f"reads {FORMAT_VERSION}; re-run tools/prepare_data.py")
    return meta


def check_tokenizer_matches(data_dir: str, vocab_size_of_model: int,
                            tokenizer_dir: str | None = None) -> None:
    """Raise DataError unless the prepared data's vocab size equals the model's (and, when
    ``tokenizer_dir`` is given, the data was tokenized with that tokenizer)."""
    meta = read_meta(data_dir)
    if meta["vocab_size"] != vocab_size_of_model:
        raise DataError(f"data in {data_dir!r} was tokenized with vocab_size {meta['vocab_size']} "
                        f"but the model has vocab_size {vocab_size_of_model}; set the model's "
                        f"vocab_size to {meta['vocab_size']} or re-prepare the data with its tokenizer")
    if tokenizer_dir is not None and tokenizer_checksum(tokenizer_dir) != meta["tokenizer_checksum"]:
        raise DataError(f"data in {data_dir!r} was tokenized with a different tokenizer than "
                        f"{tokenizer_dir!r}; re-run tools/prepare_data.py --tokenizer {tokenizer_dir}")


class PackedBlocks(torch.utils.data.Dataset):
    """Read-only view of one split as blocks of ``seq_len`` tokens (``[i]`` -> LongTensor).

    ``seq_len`` may be a divisor of the prepared block length (each block is then split),
    never longer.
    """

    def __init__(self, data_dir: str, split: str, seq_len: int):
        self.meta = meta = read_meta(data_dir)
        if split not in meta["num_blocks"]:
            raise DataError(f"unknown split {split!r} in {data_dir!r}; use one of "
                            f"{sorted(meta['num_blocks'])}")
        prepared = meta["seq_len"]
        if seq_len > prepared:
            raise DataError(f"requested seq_len {seq_len} is longer than the prepared blocks "
                            f"({prepared}) in {data_dir!r}; re-run tools/prepare_data.py "
                            f"--seq_len {seq_len} (or lower seq_len)")
        if prepared % seq_len:
            raise DataError(f"requested seq_len {seq_len} does not divide the prepared block "
                            f"length {prepared} in {data_dir!r}; use a divisor of {prepared} or "
                            f"re-run tools/prepare_data.py --seq_len {seq_len}")
        self.data_dir, self.split, self.seq_len = data_dir, split, seq_len
        self.dtype = np.dtype(meta["dtype"])
        n_tokens = meta["num_blocks"][split] * prepared
        path = os.path.join(data_dir, f"{split}.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        if size != n_tokens * self.dtype.itemsize:
            raise DataError(f"{path!r} has {size} bytes, meta.json expects "
                            f"{n_tokens * self.dtype.itemsize}; re-run tools/prepare_data.py")
        self._path, self._n_tokens = path, n_tokens
        self._open()

    def _open(self) -> None:
        # np.memmap cannot map an empty file; an empty split is still a valid (empty) view.
        tokens = (np.memmap(self._path, dtype=self.dtype, mode="r") if self._n_tokens
                  else np.zeros(0, dtype=self.dtype))
        self._blocks = tokens.reshape(-1, self.seq_len)

    def __getstate__(self) -> dict:
        # Pickling a memmap copies all its data (e.g. to spawned DataLoader workers);
        # send the path instead and map the file again on the other side.
        return {k: v for k, v in self.__dict__.items() if k != "_blocks"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def __len__(self) -> int:
        return self._blocks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._blocks[i].astype(np.int64))

    def get_batch(self, indices) -> torch.Tensor:
        """Blocks ``indices`` stacked as a LongTensor ``[len(indices), seq_len]``."""
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self._blocks[idx].astype(np.int64))


# ----------------------------------------------------------------------------- batching
class BlockLoader:
    """Deterministic, resumable, rank-sharded batches of blocks.

    Epoch ``e`` uses ``perm = torch.randperm(N, generator=manual_seed(seed*1000003 + e))``.
    With global batch ``G = micro_batch_size * grad_accum * world_size``, optimizer step
    ``k`` uses ``perm[k*G:(k+1)*G]`` (an incomplete last global batch is dropped); rank
    ``r`` takes ``[r*mb*ga, (r+1)*mb*ga)`` of that slice and micro-step ``m`` its
    ``[m*mb, (m+1)*mb)``. Hence the union over ranks of one step's blocks is the same for
    any (world_size, grad_accum) with equal G.
    """

    def __init__(self, blocks: PackedBlocks, micro_batch_size: int, grad_accum: int,
                 rank: int, world_size: int, seed: int):
        if micro_batch_size < 1 or grad_accum < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"invalid batching (micro_batch_size={micro_batch_size}, grad_accum="
                            f"{grad_accum}, rank={rank}, world_size={world_size}); use positive "
                            f"sizes and 0 <= rank < world_size")
        self.blocks, self.mb, self.ga = blocks, micro_batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = micro_batch_size * grad_accum * world_size
        if len(blocks) < self.global_batch:
            raise DataError(f"split {blocks.split!r} has {len(blocks)} blocks of {blocks.seq_len} "
                            f"tokens, fewer than one global batch ({micro_batch_size} x "
                            f"{grad_accum} x {world_size} = {self.global_batch}); lower the "
                            f"batch size / grad_accum or use more data")
        self.epoch, self.step_in_epoch = 0, 0
        self._perm_epoch, self._perm = None, None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.blocks) // self.global_batch

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:  # cache: one randperm per epoch, not per step
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.blocks), generator=g), epoch
        return self._perm

    def next_batch(self) -> list[torch.Tensor]:
        """This rank's ``grad_accum`` micro-batches (LongTensor ``[mb, seq_len]`` each) for
        the next optimizer step; advances the position."""
        perm = self._permutation(self.epoch)
        start = self.step_in_epoch * self.global_batch + self.rank * self.mb * self.ga
        mine = perm[start:start + self.mb * self.ga]
        batches = [self.blocks.get_batch(mine[m * self.mb:(m + 1) * self.mb].numpy())
                   for m in range(self.ga)]
        self.step_in_epoch += 1
        if self.step_in_epoch >= self.steps_per_epoch:  # roll over eagerly: state = next batch
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return batches

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Position of the next batch: ``{"epoch", "step_in_epoch"}``."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly at ``state`` (no replay of earlier batches)."""
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise DataError(f"loader state {state} is out of range for {self.steps_per_epoch} "
                            f"steps per epoch; the data or global batch size changed since the "
                            f"checkpoint; re-use them or start the data position afresh")
        self.epoch, self.step_in_epoch = epoch, step
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0


DistributedBlockSampler = BlockLoader  # alias: the name used in design notes


def eval_batches(blocks: PackedBlocks, micro_batch_size: int, rank: int, world_size: int,
                 max_blocks: int | None = None) -> Iterator[torch.Tensor]:
    """Yield this rank's share of the first ``max_blocks`` blocks (all if None), rounded down
    to a multiple of ``world_size * micro_batch_size``, as LongTensor ``[mb, seq_len]``.

    Every rank yields the same number of batches (needed for collective loss averaging).
    Raises DataError (eagerly) when that leaves no block at all.
    """
    n = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    unit = world_size * micro_batch_size
    n = n // unit * unit
    if n == 0:
        raise DataError(f"split {blocks.split!r} has {len(blocks)} blocks (max_blocks="
                        f"{max_blocks}), fewer than world_size x micro_batch_size = {unit}; "
                        f"raise val_fraction / max_blocks or lower the eval micro batch size")
    share = n // world_size
    lo = rank * share

    def gen():
        for s in range(lo, lo + share, micro_batch_size):
            yield blocks.get_batch(np.arange(s, s + micro_batch_size))

    return gen()
