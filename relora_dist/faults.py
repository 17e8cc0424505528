"""What a run does when something other than its input goes wrong: non-finite training values,
a peer that stops answering, preemption while blocked in a collective, a stale build lock.

Every such stop is a `RunAborted`: the launcher prints its one line (`error: ...`) and exits 3,
never with a traceback; checkpoints already published are left as they are.
"""

from __future__ import annotations

import math

EXIT_ABORTED = 3


class RunAborted(RuntimeError):
    """Training cannot go on (non-finite values, a lost peer); one line that says why and what to do."""


def is_finite(*values: float | None) -> bool:
    """True when every given value is a finite number (None = not measured, ignored)."""
    return all(v is None or math.isfinite(v) for v in values)
