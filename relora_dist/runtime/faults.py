"""What a run does when something other than its input goes wrong: non-finite training values,
a peer that stops answering, preemption while blocked in a collective, a stale build lock.

Every such stop is a `RunAborted`: the launcher prints its one line (`error: ...`) and exits 3,
never with a traceback; checkpoints already published are left as they are.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import Callable

EXIT_ABORTED = 3
# Each stops a run the same way (save at the next step boundary, one line, exit 0). SIGINT used to
# end a 1- or 2-rank run with KeyboardInterrupt tracebacks, exit 1, and no save; SIGHUP (a closed
# terminal or ssh session) killed the ranks without a word.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class RunAborted(RuntimeError):
    """Training cannot go on (non-finite values, a lost peer); one line that says why and what to do."""


def is_finite(*values: float | None) -> bool:
    """True when every given value is a finite number (None = not measured, ignored)."""
    return all(v is None or math.isfinite(v) for v in values)


def on_nonfinite(state, train_cfg, metrics: dict, newest: Callable[[], object]) -> str | None:
    """train.on_nonfinite after a step: None for a finite step, the console line of a skipped one,
    or RunAborted. DeepSpeed has already discarded the update of a step whose gradients are
    non-finite (its overflow check runs in fp32 and bf16 too, "OVERFLOW! Skipping step", and the
    grad norm reads inf), so the model is still the last finite one; a run at --optimizer.lr=1e6
    otherwise skipped every step, sat at loss ln(vocab), printed "done" and saved that."""
    if not metrics.pop("nonfinite"):
        state.skipped_in_a_row = 0
        return None
    state.skipped_steps += 1
    state.skipped_in_a_row += 1
    what = f"loss {metrics['loss']:.4g}, grad norm {metrics['grad_norm']:.4g}"
    kept = f"the newest checkpoint is {newest() or 'none (no checkpoint was saved)'}"
    if train_cfg.on_nonfinite == "stop":
        raise RunAborted(f"step {state.step}: non-finite training values ({what}); stopped without saving, "
                         f"{kept}; lower optimizer.lr / relora.lr, or set train.on_nonfinite=skip")
    if state.skipped_in_a_row > train_cfg.max_skipped_steps:
        raise RunAborted(f"step {state.step}: {state.skipped_in_a_row} non-finite steps in a row ({what}), more "
                         f"than train.max_skipped_steps={train_cfg.max_skipped_steps}; stopped without saving, "
                         f"{kept}; lower optimizer.lr / relora.lr")
    return (f"step {state.step} | non-finite {what}: update skipped ({state.skipped_in_a_row} in a row, "
            f"{state.skipped_steps} in all)")


# --- lost peers and preemption while blocked ------------------------------------------------------
GRACE_ENV = "RELORA_DIST_GRACE_S"
DEFAULT_GRACE_S = 30.0
_HEARTBEAT_S = 1.0


def _store_client(timeout_s: float = 5.0):
    """A client connection of our own to the rendezvous store (MASTER_ADDR:MASTER_PORT)."""
    import datetime
    import os

    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


class Watchdog:
    """Runs beside training on every rank of a multi-process launch (started by the launcher):

    - takes SIGTERM in a thread of its own (the signal is blocked in every other thread, so it is
      not lost while the main thread sits in a collective, where a Python handler would not run),
      asks the trainer to save and stop at the next step boundary, and if the main thread makes
      no progress for the grace period (a peer stopped answering) exits 3 with one line;
    - bumps a heartbeat counter per rank in the rendezvous store, so a rank whose collective fails
      can name the peers that stopped (their counters no longer move)."""

    def __init__(self, rank: int, world_size: int, grace_s: float, newest: Callable[[], str]):
        self.rank, self.world_size, self.grace_s, self.newest = rank, world_size, grace_s, newest
        self.stop_requested = threading.Event()
        self.signal_name = ""
        self.progress_at = time.monotonic()

    def start(self) -> None:
        """Before the process group and any other thread: SIGTERM is blocked in every thread
        started after this (they inherit the mask) and taken by the watchdog's own."""
        signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
        threading.Thread(target=self._on_sigterm, name="relora-sigterm", daemon=True).start()

    def start_heartbeat(self) -> None:
        """Once the rendezvous store is up."""
        if self.world_size > 1:
            threading.Thread(target=self._heartbeat, name="relora-heartbeat", daemon=True).start()

    def progress(self) -> None:
        self.progress_at = time.monotonic()

    def _heartbeat(self) -> None:
        try:
            store = _store_client()
            while True:
                store.add(f"relora/heartbeat/{self.rank}", 1)
                time.sleep(_HEARTBEAT_S)
        except Exception:  # noqa: BLE001 - the store is gone; the collectives will say so
            return

    def _on_sigterm(self) -> None:
        self.signal_name = signal.Signals(signal.sigwait(set(STOP_SIGNALS))).name
        self.stop_requested.set()
        self.progress()
        while time.monotonic() - self.progress_at < self.grace_s:
            time.sleep(0.5)
        print(f"error: rank {self.rank}: {self.signal_name}, but no step finished within {GRACE_ENV}={self.grace_s:g} s "
              f"({self.stalled_peers()}); no checkpoint was written, the newest is {self.newest()}",
              file=sys.stderr, flush=True)
        os._exit(EXIT_ABORTED)

    def stalled_peers(self, window_s: float = 3 * _HEARTBEAT_S) -> str:
        """Which peers stopped answering: their heartbeat counters do not move over `window_s`."""
        if self.world_size == 1:
            return "no peers"
        try:
            store = _store_client()
            keys = [f"relora/heartbeat/{r}" for r in range(self.world_size)]
            before = [store.add(k, 0) for k in keys]
            time.sleep(window_s)
            after = [store.add(k, 0) for k in keys]
        except Exception:  # noqa: BLE001 - DistStoreError, RuntimeError
            return "rank 0, which hosts the rendezvous store, no longer answers"
        stalled = [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]
        if not stalled:
            return "every peer is still alive: a collective timed out"
        return f"rank {', '.join(map(str, stalled))} stopped answering"


_WATCHDOG: Watchdog | None = None


def start_watchdog(rank: int, world_size: int, grace_s: float, newest: Callable[[], str]) -> Watchdog:
    global _WATCHDOG
    _WATCHDOG = Watchdog(rank, world_size, grace_s, newest)
    _WATCHDOG.start()
    return _WATCHDOG


def stop_requested() -> bool:
    """SIGTERM reached the watchdog (launcher runs only)."""
    return _WATCHDOG is not None and _WATCHDOG.stop_requested.is_set()


def stop_signal() -> str:
    """The name of the signal that asked this run to stop ('' if none reached the watchdog)."""
    return _WATCHDOG.signal_name if _WATCHDOG is not None and _WATCHDOG.stop_requested.is_set() else ""


def progress() -> None:
    """The main thread finished a step or a stage of a save (the grace period restarts)."""
    if _WATCHDOG is not None:
        _WATCHDOG.progress()


def is_peer_failure(e: BaseException) -> bool:
    """A collective failed because a peer died or stopped (gloo/NCCL errors, store errors)."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "gloo", "Connection closed", "Connection reset", "Timed out", "timed out", "NCCL", "Broken pipe"))


def peer_failure_line(e: BaseException, rank: int, timeout_s: float, newest: str) -> str:
    first = " ".join(str(e).split())[:160]
    who = _WATCHDOG.stalled_peers() if _WATCHDOG is not None else "a peer stopped answering"
    return (f"rank {rank}: lost its peers ({who}; {type(e).__name__}: {first}); RELORA_DIST_TIMEOUT_S="
            f"{timeout_s:g}; the newest checkpoint is {newest}; rerun the same command to resume from it")
