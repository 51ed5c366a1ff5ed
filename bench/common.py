"""Shared benchmark helpers: pin to one core, time a loop, print figures beside references."""

from __future__ import annotations

import os
import time
from typing import Callable


def pin_one_core() -> str:
    """Run this process on one CPU core, with OpenCV single-threaded: the issue's 'one core'."""
    import cv2

    cv2.setNumThreads(1)
    try:
        core = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {core})
        return f"core {core}"
    except (AttributeError, OSError):
        return "affinity not settable here"


def rate(fn: Callable[[int], None], n: int) -> float:
    """Calls per second of fn(i) for i in range(n)."""
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 10) -> float:
    """Median wall time of fn() in milliseconds over ``runs`` calls, after ``warmup`` unmeasured ones."""
    import numpy as np

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def row(label: str, value: float, unit: str, reference: float | None = None, ref_label: str = "") -> str:
    text = f"  {label:<44} {value:9.2f} {unit}"
    if reference:
        text += f"   ratio {value / reference:5.2f} x {ref_label}"
    return text
