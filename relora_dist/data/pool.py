"""The process pool of a preparation: started once for the counting and the tokenizing pass
(stream.count, stream.work), with a bounded number of calls in flight and a shared token counter for
the progress bar."""
from __future__ import annotations

import os
from typing import Iterator

from relora_dist.data.stream import _init_worker

__all__ = ["Pool"]


class _Counter:
    value = 0

    def get_lock(self):
        import contextlib

        return contextlib.nullcontext()


class Pool:
    """`num_proc` spawned workers (none at 1: calls run here), started once for the counting and the
    tokenizing pass. `run` keeps at most 2 x num_proc calls in flight (bounded memory whatever the input
    size) and yields (args, result) in completion order; `progress` counts the tokens written."""

    def __init__(self, init_args: tuple, num_proc: int):
        import multiprocessing as mp

        self.num_proc, self.pool = num_proc, None
        if num_proc <= 1:  # no shared counter: it would start multiprocessing's resource tracker process
            self.progress = _Counter()
            _init_worker(*init_args, None, self.progress)
        else:
            ctx = mp.get_context("spawn")
            self.progress = ctx.Value("q", 0)
            self.pool = ctx.Pool(num_proc, _init_worker, (*init_args, os.getpid(), self.progress))

    def run(self, fn, calls: Iterator[tuple], tick=None) -> Iterator[tuple]:
        if self.pool is None:
            for args in calls:
                yield args, fn(*args)
                if tick:
                    tick()
            return
        pending: list = []
        calls = iter(calls)
        more = True
        while more or pending:
            while more and len(pending) < 2 * self.num_proc:
                args = next(calls, None)
                if args is None:
                    more = False
                else:
                    pending.append((args, self.pool.apply_async(fn, args)))
            pending[0][1].wait(0.5)
            if tick:
                tick()
            ready = [p for p in pending if p[1].ready()]
            for p in ready:
                pending.remove(p)
                yield p[0], p[1].get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
