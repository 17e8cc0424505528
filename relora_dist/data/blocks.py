"""Reading prepared data: the on-disk format and its block view.

Prepared data (one directory) = ``train.bin`` / ``val.bin`` (flat token ids, uint16 when the
vocabulary fits) + ``meta.json``. Blocks are ``seq_len`` consecutive tokens; documents are
concatenated with an EOS after each, so blocks cross document boundaries (standard packing).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from relora_dist.tokenizer import tokenizer_checksum

__all__ = ["DataError", "FORMAT_VERSION", "SPLITS", "read_meta", "check_tokenizer_matches",
           "PackedBlocks"]

FORMAT_VERSION = 1
SPLITS = ("train", "val")


class DataError(ValueError):
    """A data problem the user can fix; the message is one line naming the fix."""


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
