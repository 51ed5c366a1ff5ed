"""Archive replay on a local Ray against sequential replay, on the same short synthetic videos, in one run.

    python -m bench.archive_bench [--videos 8] [--size 320x240] [--time-scale 400]

Sequential: replay's ``replay_one`` over every video, one after another, on one ``LoadedModels`` (what
``or-agent replay`` does). Ray: ``or-agent archive run --ray local`` with 1 and then 2 workers, on one
local Ray session started once (its start-up is timed apart); each Ray figure includes creating the
workers and loading their models. Prints videos/h, frames/s and the ratios to sequential. On a machine
with C cores the Ray run can at best be C times the sequential one.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the synthetic videos (default 320x240)")
    ap.add_argument("--time-scale", type=float, default=400.0, help="time compression (default 400: ~400 frames each)")
    ap.add_argument("--workers", default="1,2", help="Ray worker counts to measure (default 1,2)")
    args = ap.parse_args(argv)
    import ray

    from or_agent.agent.archive.run import ArchiveOptions, run_archive
    from or_agent.agent.archive.sources import list_cases
    from or_agent.agent.offline.replay import replay_one
    from or_agent.agent.session import LoadedModels
    from or_agent.synth.dataset import SynthConfig, write_dataset

    width, height = (int(v) for v in args.size.lower().split("x"))
    worker_counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="archive-bench-") as tmp:
        videos = Path(tmp) / "videos"
        metas = write_dataset(videos, SynthConfig(videos=args.videos, seed=11, time_scale=args.time_scale, width=width,
                                                  height=height, mask_every=10_000))
        frames = sum(m["frames"] for m in metas)
        print(f"{args.videos} videos {width}x{height}, {frames} frames in all; {os.cpu_count()} CPUs")
        cases = list_cases([str(videos)])
        t0 = time.perf_counter()
        models = LoadedModels(None, live_session=False)
        try:
            for c in cases:
                replay_one(c.replay_inputs(), Path(tmp) / "sequential", models, False, None, c.case_id)
        finally:
            models.close()
        results = {"sequential": time.perf_counter() - t0}
        t0 = time.perf_counter()
        ray.init(num_cpus=max(worker_counts), include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        ray_start = time.perf_counter() - t0
        try:
            for w in worker_counts:
                t0 = time.perf_counter()
                outcome = run_archive([str(videos)], ArchiveOptions(out=Path(tmp) / f"ray-{w}", workers=w, retries=0),
                                      stream=io.StringIO())
                results[f"ray local, {w} worker{'s' if w > 1 else ''}"] = time.perf_counter() - t0
                assert len(outcome.replayed) == len(cases), outcome.failures
        finally:
            ray.shutdown()
    print(f"Ray local start-up (once, not in the figures below): {ray_start:.1f} s")
    print(f"{'run':<22} {'wall s':>8} {'videos/h':>9} {'frames/s':>9} {'vs sequential':>14}")
    for name, wall in results.items():
        print(f"{name:<22} {wall:8.1f} {3600 * args.videos / wall:9.0f} {frames / wall:9.1f} "
              f"{results['sequential'] / wall:13.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
