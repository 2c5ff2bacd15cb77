"""The GPU lock: a file whose flock several benchmark processes share, so that they compile side
by side (shared lock) and run on the GPU one at a time (exclusive lock).

A process waiting for the exclusive lock has priority over later shared ones: every taker first
passes the turnstile ``path + ".turn"``, which a waiting exclusive taker holds until it has the
lock (otherwise overlapping compilations could keep a timer waiting for ever).
"""

from __future__ import annotations

import contextlib
from typing import Optional


@contextlib.contextmanager
def file_lock(path: Optional[str], shared: bool = False):
    """flock on ``path`` (created if missing) for the duration, exclusive or ``shared``; no-op
    for None or ''."""
    if not path:
        yield
        return
    import fcntl

    with open(path + ".turn", "a") as turn, open(path, "a") as fh:
        fcntl.flock(turn, fcntl.LOCK_EX)
        try:
            fcntl.flock(fh, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        finally:
            fcntl.flock(turn, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
