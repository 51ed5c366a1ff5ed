"""Latency histograms and counters the runtime keeps, bounded in memory."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LatencySummary:
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    def as_dict(self) -> dict:
        return {"count": self.count, "p50_ms": round(self.p50_ms, 3), "p95_ms": round(self.p95_ms, 3),
                "p99_ms": round(self.p99_ms, 3), "max_ms": round(self.max_ms, 3), "mean_ms": round(self.mean_ms, 3)}


class LatencyHistogram:
    """Percentiles over the most recent ``window`` samples; count, mean and max over all of them.

    A bounded window keeps memory flat over a 10-hour case and makes percentiles describe the
    recent behaviour an engineer is watching, while the all-time maximum still shows any spike.
    """

    def __init__(self, window: int = 4096):
        self._recent: deque[float] = deque(maxlen=window)
        self._count = 0
        self._sum = 0.0
        self._max = 0.0
        self._lock = threading.Lock()

    def add(self, ms: float) -> None:
        with self._lock:
            self._recent.append(ms)
            self._count += 1
            self._sum += ms
            self._max = max(self._max, ms)

    def summary(self) -> LatencySummary:
        with self._lock:
            if not self._recent:
                return LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0)
            a = np.fromiter(self._recent, float)
            p50, p95, p99 = np.percentile(a, [50, 95, 99])
            return LatencySummary(self._count, float(p50), float(p95), float(p99), self._max, self._sum / self._count)


class StageClock:
    """Latency histograms per named stage interval plus end to end."""

    def __init__(self, marks: tuple[str, ...], window: int = 4096):
        self.marks = marks
        self.intervals = {f"{a}->{b}": LatencyHistogram(window) for a, b in zip(marks, marks[1:])}
        self.end_to_end = LatencyHistogram(window)

    def record(self, marks_ns: dict[str, int]) -> None:
        for a, b in zip(self.marks, self.marks[1:]):
            if a in marks_ns and b in marks_ns:
                self.intervals[f"{a}->{b}"].add((marks_ns[b] - marks_ns[a]) / 1e6)
        if self.marks[0] in marks_ns and self.marks[-1] in marks_ns:
            self.end_to_end.add((marks_ns[self.marks[-1]] - marks_ns[self.marks[0]]) / 1e6)

    def summary(self) -> dict:
        out = {name: h.summary().as_dict() for name, h in self.intervals.items()}
        out["end_to_end"] = self.end_to_end.summary().as_dict()
        return out
