"""The pipeline against its references, on one synthetic 854x480 25 fps surgery, in one run.

    python -m bench.pipeline_bench [--frames N] [--soak-minutes M]

Prints, side by side:
  (a) decode only;
  (b) each stage alone on preloaded inputs (the raw stage limits);
  (c) the naive sequential loop: read, preprocess, all three models, draw;
  (d) the pipeline doing the same work (drawing in a queued subscriber), unpaced;
then the ratios (pipeline / slowest stage, pipeline / naive loop, unpaced speed / real time), a
paced replay's capture-to-publish latency, and resident memory over a long replay.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import models_option, rate, select_models
from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
from or_agent.pipelines.manifest import find_model
from or_agent.pipelines.messages import Frame
from or_agent.pipelines.overlay import OverlayRenderer
from or_agent.pipelines.preprocess import ContentAreaTracker
from or_agent.pipelines.runtime import Pipeline, PipelineConfig
from or_agent.pipelines.sinks import QueuedSubscriber
from or_agent.pipelines.sources import FirstFrames, VideoFileSource
from or_agent.pipelines.stages import PhaseStage, SegmentationStage, VisibilityStage
from or_agent.synth.dataset import SynthConfig, write_dataset


def stages():
    return (SegmentationStage(OnnxRuntimeBackend(find_model("segmentation"), threads=1)),
            PhaseStage(OnnxRuntimeBackend(find_model("phase"), threads=1)),
            VisibilityStage(OnnxRuntimeBackend(find_model("visibility"), threads=1)))


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


class LoopingSource:
    """A file played over and over as one long stream, for the memory soak."""

    def __init__(self, path: Path, frames: int):
        self.path, self.total = path, frames
        self.frames_dropped = 0
        self._src: VideoFileSource | None = None
        self._seq = 0
        self._offset_ms = 0.0
        self._last_ms = 0.0
        self.ended = False

    def start(self):
        self._src = VideoFileSource(self.path)
        self._src.start()

    def read(self, timeout_s=None):
        if self._seq >= self.total:
            self.ended = True
            return None
        f = self._src.read(timeout_s)
        if f is None:  # wrap around: media time carries on from the last frame
            self._offset_ms += self._last_ms + 1000.0 / (self._src.nominal_fps or 25.0)
            self._src.stop()
            self.start()
            f = self._src.read(timeout_s)
        self._last_ms = f.media_ms
        out = Frame(self._seq, f.capture_ns, self._offset_ms + f.media_ms, f.image)
        self._seq += 1
        return out

    def stop(self):
        if self._src:
            self._src.stop()

    def drain_events(self):
        return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=600, help="frames per measurement (default 600)")
    ap.add_argument("--soak-minutes", type=float, default=2.0,
                    help="media minutes of the memory soak (default 2; the goal is stated for 10)")
    ap.add_argument("--preprocessing", choices=["cpu", "gpu"], default="cpu",
                    help="frame path of the pipeline runs (d) and the soak: cpu, or gpu (the pycuda kernels; needs a GPU)")
    models_option(ap)
    args = ap.parse_args(argv)
    print(select_models(args))
    from or_agent.pipelines.errors import DependencyError
    from or_agent.pipelines.frame_path import GpuFramePath, HostFramePath

    try:
        frame_path = GpuFramePath() if args.preprocessing == "gpu" else HostFramePath()
    except DependencyError as exc:
        print(f"pipeline_bench: --preprocessing gpu: {exc}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="or-agent-bench-"))
    write_dataset(tmp, SynthConfig(videos=1, seed=12, time_scale=20.0, mask_every=10_000))
    video = tmp / "video01.mp4"
    fps = 25.0
    n = args.frames

    # (a) decode only
    src = VideoFileSource(video)
    src.start()
    frames = []
    t0 = time.perf_counter()
    while len(frames) < n:
        f = src.read()
        if f is None:
            break
        frames.append(f)
    decode = len(frames) / (time.perf_counter() - t0)
    src.stop()
    n = len(frames)
    imgs = [f.image for f in frames]

    # (b) each stage alone on preloaded inputs
    anatomy, phase, vis = stages()
    tracker = ContentAreaTracker()
    areas = [tracker.update(im) for im in imgs]
    overlay = OverlayRenderer(anatomy.manifest.labels)

    def pre(i):
        vis.pre_process(imgs[i], areas[i])
        anatomy.pre_process(imgs[i], areas[i])
        if i % 5 == 0:
            phase.pre_process(imgs[i], areas[i])
    xs_a = [anatomy.pre_process(im, a) for im, a in zip(imgs, areas)]
    xs_v = [vis.pre_process(im, a) for im, a in zip(imgs, areas)]
    xs_p = [phase.pre_process(im, a) for im, a in zip(imgs, areas)]

    def light(i):
        vis.post_process(vis.predict(xs_v[i]))
        if i % 5 == 0:
            phase.post_process(phase.predict(xs_p[i]), t_s=i / fps)
    logits = [anatomy.predict(xs_a[i]) for i in range(min(n, 50))]
    ests = [anatomy.post_process(lg, areas[i]) for i, lg in enumerate(logits)]
    from or_agent.pipelines.messages import FrameResult
    no_marks = {"capture": 0, "preprocess": 0, "inference": 0, "postprocess": 0}
    results = [FrameResult.of([vis.post_process(vis.predict(xs_v[i])), phase.post_process(phase.predict(xs_p[i]), t_s=i / fps),
                               ests[i]], seq=i, media_ms=i * 40.0, frame_size=(imgs[i].shape[1], imgs[i].shape[0]),
                              marks_ns=no_marks) for i in range(len(ests))]
    stage_rates = {
        "preprocess (crop, resize, normalise x3)": rate(pre, n),
        "visibility + phase (5 Hz)": rate(light, n),
        "anatomy inference": rate(lambda i: anatomy.predict(xs_a[i]), n),
        "anatomy post-process": rate(lambda i: anatomy.post_process(logits[i % len(logits)], areas[i]), n),
        "overlay drawing": rate(lambda i: overlay.draw(imgs[i], results[i % len(results)]), n),
    }

    # (c) the naive sequential loop
    def naive():
        src = VideoFileSource(video)
        src.start()
        tr = ContentAreaTracker()
        phase.reset()
        k = 0
        t0 = time.perf_counter()
        while k < n:
            f = src.read()
            if f is None:
                break
            a = tr.update(f.image)
            v = vis(f.image, a)
            p = phase(f.image, a, f.media_ms / 1000) if k % 5 == 0 else None
            an = anatomy(f.image, a) if not v.out_of_body else None
            r = FrameResult.of([e for e in (v, p, an) if e is not None], seq=k, media_ms=f.media_ms, frame_size=f.size,
                               marks_ns={"capture": 0, "preprocess": 0, "inference": 0, "postprocess": 0})
            overlay.draw(f.image, r)
            k += 1
        src.stop()
        return k / (time.perf_counter() - t0)
    naive_rate = naive()

    # (d) the pipeline, same work
    def run_pipeline(source):
        # The same three loaded models throughout: a pipeline's start resets the phase state.
        pipe = Pipeline(source, [vis, phase, anatomy], PipelineConfig(), frame_path=frame_path)
        drawn = QueuedSubscriber(lambda r: overlay.draw(r.image, r), maxsize=4).start()
        pipe.subscribe(drawn)
        t0 = time.perf_counter()
        pipe.run()
        drawn.stop()
        return pipe, pipe.frames_out / (time.perf_counter() - t0)

    _, pipe_rate = run_pipeline(FirstFrames(VideoFileSource(video), n))
    paced, _ = run_pipeline(FirstFrames(VideoFileSource(video, paced=True), n))
    lat = paced.stats()["latency_ms"]["end_to_end"]
    paced_fps = paced.frames_out / (n / fps)

    slowest_name, slowest = min(stage_rates.items(), key=lambda kv: kv[1])
    cores = len(os.sched_getaffinity(0))
    print(f"pipeline benchmark: synthetic 854x480 {fps:g} fps surgery, {n} frames, {cores} cores, ONNX Runtime 1 thread per model, "
          f"pipeline inputs made on the {frame_path.name.upper()}")
    print(f"  {'(a) decode only':<46} {decode:8.1f} fps")
    for name, r in stage_rates.items():
        print(f"  {'(b) ' + name:<46} {r:8.1f} fps")
    print(f"  {'(c) naive sequential loop':<46} {naive_rate:8.1f} fps")
    print(f"  {'(d) pipeline, unpaced':<46} {pipe_rate:8.1f} fps")
    total_work = 1 / decode + sum(1 / r for r in stage_rates.values())
    print("ratios")
    print(f"  pipeline / slowest stage ({slowest_name}): {pipe_rate / slowest:5.2f} x   (goal >= 0.9)")
    print(f"  pipeline / naive loop:                     {pipe_rate / naive_rate:5.2f} x   (goal >= 1.5)")
    print(f"  pipeline / all-core limit (sum of stage times / {cores} cores): {pipe_rate * total_work / cores:5.2f} x")
    print(f"  unpaced speed / real time:                 {pipe_rate / fps:5.2f} x   (goal >= 3)")
    print(f"paced replay at {fps:g} fps: delivered {paced_fps:.1f} fps ({paced_fps / fps:.2f} x real time), "
          f"dropped {paced.stats()['frames_dropped_source']}, capture->publish p50 {lat['p50_ms']:.1f} ms, "
          f"p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms (goal p99 <= 100 ms)")

    # memory soak: one long unpaced replay, resident memory sampled as it goes
    total = int(args.soak_minutes * 60 * fps)
    samples = []
    pipe = Pipeline(LoopingSource(video, total), [vis, phase, anatomy], frame_path=frame_path)
    drawn = QueuedSubscriber(lambda r: overlay.draw(r.image, r), maxsize=4).start()
    pipe.subscribe(drawn)
    pipe.subscribe(lambda r: samples.append((r.seq, rss_mb())) if r.seq % 250 == 0 else None)
    pipe.run()
    drawn.stop()
    seqs = np.array([s for s, _ in samples], float)
    mem = np.array([m for _, m in samples])
    half = len(mem) // 2
    slope = (f"{np.polyfit(seqs[half:] / fps / 60, mem[half:], 1)[0]:+.2f} MB/min" if half > 2
             else "n/a (too few samples: soak at least 1 minute)")
    print(f"memory over a {args.soak_minutes:g}-minute replay ({total} frames): RSS start {mem[0]:.0f} MB, "
          f"end {mem[-1]:.0f} MB, max {mem.max():.0f} MB, second-half slope {slope} "
          f"(peak RSS of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
    frame_path.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
