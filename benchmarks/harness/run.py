"""The run loop's pieces: log lines, error text, errors that end a run, and the time limit.

Every benchmark records a failure in its row and goes on, except after a CUDA error that leaves
the device unusable (:func:`is_fatal`); none starts a new measurement after its time limit
(:class:`Deadline`), so that it ends with its tables inside a GPU job's limit.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

# Errors after which the CUDA context is gone: every later call would fail too.
FATAL_PATTERNS = ("illegal memory access", "illegal address", "ILLEGAL_ADDRESS",
                  "unspecified launch failure", "LAUNCH_FAILED", "misaligned address",
                  "device-side assert", "CUDA_ERROR_ASSERT", "an illegal instruction")


def logger(tag: str) -> Callable[[str], None]:
    """``log(msg)``: one line ``[tag HH:MM:SS] msg`` on stderr."""

    def log(msg: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


def error_text(e: BaseException, limit: int = 500) -> str:
    """``"Type: message"``, cut to ``limit`` characters: what a row records of a failure."""
    return f"{type(e).__name__}: {e}"[:limit]


def is_fatal(msg: Optional[str]) -> bool:
    """Whether an error message says the device is unusable from now on."""
    return bool(msg) and any(p.lower() in msg.lower() for p in FATAL_PATTERNS)


class Deadline:
    """The time limit of a run, from its creation: ``limit_s`` 0 or None means none."""

    def __init__(self, limit_s: Optional[float]):
        self.limit_s = limit_s or 0.0
        self.start = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def left_s(self) -> float:
        """Seconds left (infinite without a limit; negative once passed)."""
        return self.limit_s - self.elapsed_s() if self.limit_s else float("inf")

    def passed(self) -> bool:
        return self.left_s() <= 0
