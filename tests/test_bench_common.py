"""The benchmarks' per-thread CPU reading (bench.common.ThreadCpu): each thread's CPU time lands under its
name, the sampler's own does not, and a thread that started before the block counts only what it spent in it."""

import sys
import threading
import time

import pytest

from bench.common import ThreadCpu

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task (Linux)")


def _burn(seconds: float, done: threading.Event, release: threading.Event) -> None:
    """Spend ``seconds`` of this thread's own CPU time (however loaded the machine), then wait."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    done.set()
    release.wait()


def test_each_threads_cpu_time_is_counted_under_its_name():
    done, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=_burn, args=(0.3, done, release), name="burner:job-1")
    try:
        with ThreadCpu(interval=0.05) as cpu:
            worker.start()
            assert done.wait(60)
        # read at the block's end while the worker still lives: nothing it spent is lost
        assert cpu.seconds["burner"] >= 0.28
        assert "thread-cpu-sampler" not in cpu.seconds
        assert cpu.seconds.get("MainThread", 0.0) < 0.28  # the main thread mostly waited
    finally:
        release.set()
        worker.join()


def test_a_thread_started_before_the_block_counts_only_its_time_inside():
    done, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=_burn, args=(0.3, done, release), name="early")
    worker.start()
    try:
        assert done.wait(60)
        with ThreadCpu(interval=0.05) as cpu:
            pass
        assert cpu.seconds.get("early", 0.0) < 0.1
    finally:
        release.set()
        worker.join()
