"""Shared benchmark helpers: pin to one core, time a loop, print figures beside references."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


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


def models_option(ap) -> None:
    """``--models SET|DIR`` for a benchmark (the same option and default as the agent's commands)."""
    from or_agent.agent.options import add_models_option

    add_models_option(ap, "the model set to measure")


def select_models(args) -> str:
    """Make ``--models`` the set every loader in this process uses (they default to ``$OR_AGENT_MODELS``);
    returns the folder, validated as a set, for the benchmark's header."""
    from or_agent.pipelines.model_set import load_model_set

    model_set = load_model_set(args.models_dir)
    os.environ["OR_AGENT_MODELS"] = str(model_set.path)
    return f"model set {model_set.name} ({model_set.path})"
