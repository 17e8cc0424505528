"""Batching prepared blocks: rank-sharded training batches and evaluation batches.

Batching contract (the trainer relies on it so that N ranks == 1 rank at the same global
batch): see :class:`BlockLoader`.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from relora_dist.data.blocks import DataError, PackedBlocks

__all__ = ["BlockLoader", "eval_batches", "check_train_blocks", "check_eval_blocks",
           "eval_fix"]


def check_train_blocks(n_blocks: int, global_batch: int, what: str, batch: str, fix: str) -> None:
    """Training needs at least one global batch of blocks (an incomplete last batch is dropped).
    `what` names the data, `batch` how the global batch is made, `fix` the fix."""
    if n_blocks < global_batch:
        raise DataError(f"{what} has {n_blocks} training sequences, fewer than one global batch ({batch}); {fix}")


def check_eval_blocks(n_blocks: int, micro_batch_size: int, world_size: int, max_blocks: int | None, what: str,
                      fix: str) -> int:
    """The blocks one evaluation reads: the first `max_blocks` (all if None) rounded down to a
    multiple of world_size x micro_batch_size, so every rank runs the same number of batches;
    DataError if that leaves none."""
    n = n_blocks if max_blocks is None else min(max_blocks, n_blocks)
    unit = world_size * micro_batch_size
    if n // unit == 0:
        raise DataError(f"{what} has {n_blocks} validation sequences (max_blocks={max_blocks}), fewer than world_size "
                        f"x micro_batch_size = {unit}; {fix}")
    return n // unit * unit


ONE_DOCUMENT = ("the data is a single document and the validation split holds whole documents, so no "
                "val_fraction can fill it; split the text into documents (in .txt: blank lines between "
                "paragraphs; in .jsonl: one record each)")


def eval_fix(meta: dict, fix: str) -> str:
    """The fix for too few validation blocks: `fix` (more val_fraction, smaller batches), unless the
    data is one document, which the split by document cannot divide."""
    docs = sum(int(v) for v in meta.get("num_documents", {}).values()) if isinstance(meta, dict) else 0
    return ONE_DOCUMENT if docs == 1 else fix


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
        check_train_blocks(len(blocks), self.global_batch, f"split '{blocks.split}'",
                           f"{micro_batch_size} x {grad_accum} x {world_size} = {self.global_batch}",
                           "lower the batch size / grad_accum or use more data")
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



def eval_batches(blocks: PackedBlocks, micro_batch_size: int, rank: int, world_size: int,
                 max_blocks: int | None = None) -> Iterator[torch.Tensor]:
    """Yield this rank's share of the first ``max_blocks`` blocks (all if None), rounded down
    to a multiple of ``world_size * micro_batch_size``, as LongTensor ``[mb, seq_len]``.

    Every rank yields the same number of batches (needed for collective loss averaging).
    Raises DataError (eagerly) when that leaves no block at all.
    """
    n = check_eval_blocks(len(blocks), micro_batch_size, world_size, max_blocks, f"split '{blocks.split}'",
                          eval_fix(getattr(blocks, "meta", {}),
                                   "raise val_fraction / max_blocks or lower the eval micro batch size"))
    share = n // world_size
    lo = rank * share

    def gen():
        for s in range(lo, lo + share, micro_batch_size):
            yield blocks.get_batch(np.arange(s, s + micro_batch_size))

    return gen()
