"""Progress of long server-side work (index builds, re-embedding on a reload) as log lines: a server's
stderr is a log, not a terminal, so a redrawn bar would only add noise. Prometheus has the reload's
numbers too (m2rec_reembed_{total,done}_items)."""

from __future__ import annotations

import logging
import time

EVERY_SECONDS = 5.0  # at most one line this often, plus the last


class ProgressLog:
    """`advance(n)` as work is done; a line with the count, the total, the rate and an ETA."""

    def __init__(self, log: logging.Logger, what: str, total: int, every: float = EVERY_SECONDS) -> None:
        self.log, self.what, self.total, self.every = log, what, total, every
        self.done = 0
        self.started = self._last = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._line(now)

    def finish(self) -> None:
        self._line(time.monotonic())

    def _line(self, now: float) -> None:
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = max(self.total - self.done, 0)
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        self.log.info("%s: %d of %d items (%.0f%%), %.1f s, %.0f items/s, eta %s", self.what, self.done, self.total,
                      100.0 * self.done / max(self.total, 1), elapsed, rate, eta)
