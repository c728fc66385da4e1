"""Periodic progress lines for long training loops: step N of TOTAL, rate and ETA.

Training logs one line every ``every`` steps, or sooner when ``interval`` seconds have
passed since the last line (so that a slow model is never silent for long), and at the
last step.  The rate is measured over this invocation only, so it is right after a
resume too.
"""
from __future__ import annotations

import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours may exceed 24); ``?`` when unknown."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class StepMeter:
    """Decides when to log a step and words the line.

    Args:
        total: the last step of the run.
        start: the step this invocation starts from (0, or the resumed step).
        every: log every this many steps.
        interval: log at the latest after this many seconds.
        clock: monotonic clock in seconds (a parameter for tests).
    """

    def __init__(self, total: int, start: int = 0, every: int = 50, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = int(total)
        self.start = int(start)
        self.every = max(1, int(every))
        self.interval = float(interval)
        self.clock = clock
        self.t0 = clock()
        self.last = self.t0

    def due(self, step: int) -> bool:
        """Whether step ``step`` gets a line (and, if so, restart the interval)."""
        now = self.clock()
        if step % self.every == 0 or step >= self.total or now - self.last >= self.interval:
            self.last = now
            return True
        return False

    def rate(self, step: int) -> float:
        """Steps per second over this invocation (0 before the first step)."""
        elapsed = self.clock() - self.t0
        done = step - self.start
        return done / elapsed if done > 0 and elapsed > 0 else 0.0

    def line(self, step: int) -> str:
        """``step N of TOTAL (P%), R steps/s, ETA H:MM:SS``."""
        rate = self.rate(step)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        pct = 100.0 * step / self.total if self.total else 100.0
        return (f"step {step} of {self.total} ({pct:.1f}%), {rate:.3g} steps/s, "
                f"ETA {format_duration(eta)}")
