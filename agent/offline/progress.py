"""A progress line with rate and ETA on stderr, for long command-line work."""

from __future__ import annotations

import sys
import time


class Progress:
    """Redraws one line on a terminal; on a pipe, prints a line every ``log_every_s`` seconds."""

    def __init__(self, label: str, total: int, stream=None, log_every_s: float = 5.0):
        self.label = label
        self.total = max(1, total)
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every_s = log_every_s
        self.t0 = time.monotonic()
        self._last = 0.0
        self.done = 0

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self._last < (0.1 if self.tty else self.log_every_s) and done < self.total:
            return
        self._last = now
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        frac = min(1.0, done / self.total)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        eta_s = f"{eta:5.0f}s" if eta != float("inf") else "    ?"
        line = f"{self.label} [{bar}] {100 * frac:5.1f}% {done}/{self.total} {rate:7.1f}/s ETA {eta_s}"
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
