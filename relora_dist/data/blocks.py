"""Reading prepared data: the on-disk format and its block view.

Prepared data (one directory) = per split, flat token ids (uint16 when the vocabulary fits) in
``train.bin`` / ``val.bin`` or, for a preparation of several shards, ``train-00000.bin`` ... (listed
in ``meta["shards"]``, see :mod:`relora_dist.data.shards`) + ``meta.json``. Blocks are ``seq_len``
consecutive tokens of the split's stream; documents are concatenated with an EOS after each, so
blocks cross document (and shard) boundaries (standard packing).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from relora_dist.data.shards import SHARDED_FORMAT_VERSION, TokenShards
from relora_dist.data.documents import DataError
from relora_dist.data.tokenizer import tokenizer_checksum

__all__ = ["DataError", "FORMAT_VERSION", "SPLITS", "Wording", "check_seq_len", "read_meta", "check_blocks",
           "check_tokenizer_matches", "check_token_ids", "PackedBlocks"]

FORMAT_VERSION = 1  # train.bin / val.bin; SHARDED_FORMAT_VERSION (2): token shards listed in meta.json
READS = (FORMAT_VERSION, SHARDED_FORMAT_VERSION)
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Wording:
    """How the messages name things: the Python API's defaults, or config keys (data/check.py).
    `hint` tells how to (re)create the directory; `reprepare` how to prepare it for another seq_len
    (both may use {dir} and {seq_len})."""

    dir: str = "prepared data directory"
    seq_len: str = "requested seq_len"
    tokenizer: str = "tokenizer"
    model: str = "the model"
    hint: str = "run `python tools/prepare_data.py --out {dir}` first (or use ensure_prepared)"
    reprepare: str = "re-run tools/prepare_data.py --seq_len {seq_len}"


API = Wording()


def check_seq_len(seq_len: int, key: str = "seq_len") -> None:
    """A block holds at least one input token and the next token it predicts."""
    if seq_len < 2:
        raise DataError(f"{key}={seq_len} is too small; use a block length of at least 2")


def read_meta(data_dir: str, w: Wording = API) -> dict:
    """Load and check ``data_dir/meta.json``; raise DataError naming the fix if unusable."""
    hint = w.hint.format(dir=data_dir, seq_len="SEQ_LEN")
    if not os.path.isdir(data_dir):
        raise DataError(f"{w.dir} '{data_dir}' does not exist; {hint}")
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{w.dir} '{data_dir}' has no meta.json (not prepared, or preparation was interrupted); "
                        f"{hint}")
    try:
        with open(path) as f:
            meta = json.load(f)
        int(meta["seq_len"]), int(meta["vocab_size"]), np.dtype(meta["dtype"]), dict(meta["num_blocks"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{w.dir} '{data_dir}': meta.json is unreadable ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:100]}); {hint}") from None
    if meta.get("format_version") not in READS:
        raise DataError(f"{w.dir} '{data_dir}' has data format {meta.get('format_version')}, this code "
                        f"reads {' and '.join(map(str, READS))}; {hint}")
    return meta


def split_files(data_dir: str, meta: dict, split: str) -> list[tuple[str, int]]:
    """[(path, tokens it must hold)] of `split`, in stream order: one train.bin cut to whole blocks, or
    the shards meta.json lists (whole, the partial tail block in the last one)."""
    if "shards" in meta:
        return [(os.path.join(data_dir, str(name)), int(n)) for name, n, *_ in meta["shards"][split]]
    return [(os.path.join(data_dir, f"{split}.bin"), int(meta["num_blocks"][split]) * int(meta["seq_len"]))]


def check_blocks(data_dir: str, meta: dict, split: str, seq_len: int,
                 w: Wording = API) -> tuple[list[tuple[str, int]], int]:
    """`split` of the prepared data can be read as blocks of `seq_len` (a divisor of the prepared
    block length) and its files are complete; returns ([(path, tokens)], number of tokens in blocks)."""
    prepared, reprepare = meta["seq_len"], w.reprepare.format(dir="NEW_DIR", seq_len=seq_len)
    if split not in meta["num_blocks"]:
        raise DataError(f"unknown split '{split}' in {w.dir} '{data_dir}': meta.json lists "
                        f"{sorted(meta['num_blocks'])}; {w.hint.format(dir=data_dir, seq_len=seq_len)}")
    if seq_len > prepared:
        raise DataError(f"{w.seq_len}={seq_len} is longer than the prepared blocks ({prepared} tokens) in "
                        f"{w.dir} '{data_dir}'; use {w.seq_len}={prepared} (or a divisor of it), or re-prepare: "
                        f"{reprepare}")
    if prepared % seq_len:
        divisors = [x for x in range(2, prepared + 1) if prepared % x == 0]
        near = sorted(sorted(divisors, key=lambda x: (abs(x - seq_len), x))[:2])
        raise DataError(f"{w.seq_len}={seq_len} does not divide the prepared block length {prepared} in "
                        f"{w.dir} '{data_dir}'; use {w.seq_len}={' or '.join(map(str, near))}, or re-prepare: "
                        f"{reprepare}")
    n_tokens = int(meta["num_blocks"][split]) * prepared
    try:
        files = split_files(data_dir, meta, split)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{w.dir} '{data_dir}': meta.json lists no readable shards of '{split}' ({type(e).__name__}: "
                        f"{e}); {w.hint.format(dir=data_dir, seq_len=seq_len)}") from None
    for path, tokens in files:
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        want = tokens * np.dtype(meta["dtype"]).itemsize
        if size != want:
            raise DataError(f"{w.dir} '{data_dir}': {os.path.basename(path)} has {size} bytes, meta.json expects "
                            f"{want} (missing or truncated); {w.hint.format(dir=data_dir, seq_len=seq_len)}")
    if sum(t for _, t in files) < n_tokens:
        raise DataError(f"{w.dir} '{data_dir}': the '{split}' shards hold {sum(t for _, t in files)} tokens, fewer "
                        f"than num_blocks x seq_len = {n_tokens}; {w.hint.format(dir=data_dir, seq_len=seq_len)}")
    return files, n_tokens


def check_tokenizer_matches(data_dir: str, vocab_size_of_model: int,
                            tokenizer_dir: str | None = None, w: Wording = API) -> None:
    """Raise DataError unless the prepared data's vocab size equals the model's (and, when
    ``tokenizer_dir`` is given, the data was tokenized with that tokenizer)."""
    meta = read_meta(data_dir, w)
    hint = w.hint.format(dir=data_dir, seq_len=meta["seq_len"])
    if meta["vocab_size"] != vocab_size_of_model:
        raise DataError(f"{w.dir} '{data_dir}' was tokenized with a vocabulary of {meta['vocab_size']} but "
                        f"{w.model} has {vocab_size_of_model}; pass the tokenizer the data was prepared with "
                        f"(vocab_size {meta['vocab_size']}), or re-prepare: {hint}")
    checksum = meta.get("tokenizer_checksum")  # absent in hand-made data: only the size is compared
    if tokenizer_dir is not None and checksum and tokenizer_checksum(tokenizer_dir) != checksum:
        raise DataError(f"{w.dir} '{data_dir}' was tokenized with a different tokenizer than {w.tokenizer} "
                        f"'{tokenizer_dir}' (same vocabulary size {vocab_size_of_model}, different tokenizer.model "
                        f"checksum); pass the tokenizer the data was prepared with, or re-prepare: {hint}")


_SCAN_CHUNK = 1 << 24  # tokens per read: bounded memory for the int64 temporaries of max/argmax


def check_token_ids(tokens: np.ndarray, vocab_size: int, what: str, hint: str) -> None:
    """Every id in `tokens` indexes the embedding (< vocab_size): a larger one (a corrupted .bin, or
    ids written by another tokenizer) is an IndexError at the first step on CPU and a device assert
    on GPU. One pass over the file when it is opened (read at page-cache/disk speed)."""
    for start in range(0, tokens.shape[0], _SCAN_CHUNK):
        chunk = tokens[start:start + _SCAN_CHUNK]
        if int(chunk.max()) >= vocab_size:
            at = start + int(np.argmax(chunk >= vocab_size))
            raise DataError(f"{what} holds token id {int(tokens[at])} at token {at}, but the vocabulary has "
                            f"{vocab_size} ids (meta.json vocab_size): the file is corrupted or was written with "
                            f"another tokenizer; re-prepare it: {hint}")


class PackedBlocks(torch.utils.data.Dataset):
    """Read-only view of one split as blocks of ``seq_len`` tokens (``[i]`` -> LongTensor).

    ``seq_len`` may be a divisor of the prepared block length (each block is then split),
    never longer.
    """

    def __init__(self, data_dir: str, split: str, seq_len: int):
        self.meta = meta = read_meta(data_dir)
        files, n_tokens = check_blocks(data_dir, meta, split, seq_len)
        self.data_dir, self.split, self.seq_len = data_dir, split, seq_len
        self.dtype = np.dtype(meta["dtype"])
        self._files, self._n_tokens = files, n_tokens
        self._open()
        hint = API.hint.format(dir=data_dir, seq_len=meta["seq_len"])
        if self._shards is None:
            check_token_ids(self._blocks.reshape(-1), int(meta["vocab_size"]), f"{API.dir} '{data_dir}': {split}.bin",
                            hint)
        else:
            for (path, _), tokens in zip(files, self._shards.maps):
                check_token_ids(tokens, int(meta["vocab_size"]), f"{API.dir} '{data_dir}': {os.path.basename(path)}",
                                hint)

    def _open(self) -> None:
        self._shards = None
        if len(self._files) > 1:  # several shards: blocks are read across them
            self._shards = TokenShards(self._files, self.dtype, self._n_tokens)
            self._blocks = None
            return
        # np.memmap cannot map an empty file; an empty split is still a valid (empty) view.
        tokens = (np.memmap(self._files[0][0], dtype=self.dtype, mode="r") if self._n_tokens
                  else np.zeros(0, dtype=self.dtype))
        self._blocks = tokens[:self._n_tokens].reshape(-1, self.seq_len)

    def __getstate__(self) -> dict:
        # Pickling a memmap copies all its data (e.g. to spawned DataLoader workers);
        # send the paths instead and map the files again on the other side.
        return {k: v for k, v in self.__dict__.items() if k not in ("_blocks", "_shards")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def __len__(self) -> int:
        return self._n_tokens // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._shards is None:
            return torch.from_numpy(self._blocks[i].astype(np.int64))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"block {i} out of range for {n} blocks")
        return self.get_batch([i % n])[0]

    def get_batch(self, indices) -> torch.Tensor:
        """Blocks ``indices`` stacked as a LongTensor ``[len(indices), seq_len]``."""
        idx = np.asarray(indices, dtype=np.int64)
        if self._shards is None:
            return torch.from_numpy(self._blocks[idx].astype(np.int64))
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"block indices out of range for {len(self)} blocks")
        return torch.from_numpy(self._shards.blocks(idx, self.seq_len).astype(np.int64))
