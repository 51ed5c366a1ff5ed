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


NATIVE_THREADS = "native pools"  # threads Python did not start: FFmpeg's, OpenCV's, ONNX Runtime's


class ThreadCpu:
    """CPU seconds of each thread of this process while a ``with`` block runs, summed by thread name
    (Linux ``/proc/self/task``; elsewhere ``seconds`` stays empty). A sampler thread reads every thread's
    cumulative time each ``interval`` seconds and once more at the end, so a thread that ends between two
    readings loses at most ``interval`` of its time. Names are the Python threads' up to a colon
    (``h264:annotated.mp4`` -> ``h264``); threads Python did not start count as ``NATIVE_THREADS``."""

    def __init__(self, interval: float = 0.1):
        import threading

        self.interval = interval
        self.seconds: dict[str, float] = {}
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._run, name="thread-cpu-sampler", daemon=True)

    @staticmethod
    def _read() -> dict[int, float]:
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return out
        for tid in tids:
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended meanwhile
                continue
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        return out

    def _sample(self) -> None:
        import threading

        for t in threading.enumerate():
            if t.native_id is not None:
                self._names[t.native_id] = t.name.split(":")[0]
        self._last.update(self._read())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> ThreadCpu:
        self._start = self._read()
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sampler.join()
        self._sample()
        sampler = self._sampler.native_id
        for tid, total in self._last.items():
            if tid == sampler:
                continue
            name = self._names.get(tid, NATIVE_THREADS)
            self.seconds[name] = self.seconds.get(name, 0.0) + total - self._start.get(tid, 0.0)
