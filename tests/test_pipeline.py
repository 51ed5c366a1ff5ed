"""The runtime: every frame through every stage, in order, timed, with nothing unbounded."""

import json
import queue
import threading
import time

import numpy as np
import pytest

from or_agent.pipelines.backends import InferenceBackend
from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
from or_agent.pipelines.errors import ModelError
from or_agent.pipelines.manifest import find_model
from or_agent.pipelines.messages import STAGE_MARKS
from or_agent.pipelines.runtime import Pipeline, PipelineConfig
from or_agent.pipelines.sources import Backoff, StreamSource, VideoFileSource
from or_agent.pipelines.stages import PhaseStage, SegmentationStage, VisibilityStage
from or_agent.synth.dataset import read_phase_file
from tests.conftest import ROOT
from tests.test_sources import MjpegServer

MODELS = ROOT / "models" / "synthetic"


def stages():
    return (SegmentationStage(OnnxRuntimeBackend(find_model("segmentation", MODELS))),
            PhaseStage(OnnxRuntimeBackend(find_model("phase", MODELS))),
            VisibilityStage(OnnxRuntimeBackend(find_model("visibility", MODELS))))


def test_every_frame_in_order_with_stage_timestamps(small_dataset):
    results = []
    p = Pipeline(VideoFileSource(small_dataset / "video01.mp4"), stages(), PipelineConfig(anatomy_every=2))
    p.subscribe(results.append)
    p.run()
    meta = json.loads((small_dataset / "video01.json").read_text())
    assert [r.seq for r in results] == list(range(meta["frames"]))
    for r in results:
        ts = [r.marks_ns[m] for m in STAGE_MARKS]
        assert ts == sorted(ts), "stage boundaries are crossed in order"
    stats = p.stats()
    assert stats["frames_out"] == meta["frames"] and stats["frames_dropped_source"] == 0
    assert stats["latency_ms"]["end_to_end"]["count"] == meta["frames"]
    assert set(stats["latency_ms"]) == {"capture->preprocess", "preprocess->inference", "inference->postprocess",
                                        "postprocess->publish", "end_to_end"}
    # phase steps at 5 Hz of media time, anatomy on every 2nd in-body frame
    steps = sum(r.phase_fresh for r in results)
    in_body = sum(not r.out_of_body for r in results)
    assert abs(steps - in_body / 5) <= 3
    assert all(r.segmentation is None for r in results if r.out_of_body)
    assert all(r.segmentation_fresh == (r.seq % 2 == 0) for r in results if not r.out_of_body)


def test_pipeline_results_match_ground_truth(held_out_video):
    results = []
    p = Pipeline(VideoFileSource(held_out_video / "video01.mp4"), stages())
    p.subscribe(results.append)
    p.run()
    truth = read_phase_file(held_out_video / "video01-phase.txt")
    flags = np.loadtxt(held_out_video / "video01-flags.csv", delimiter=",", skiprows=1, dtype=int)
    pred = np.array([r.phase.phase if r.phase else -1 for r in results])
    assert (pred == truth).mean() > 0.9  # the phase model's held-out figure is 0.955
    oob = np.array([r.out_of_body for r in results])
    assert (oob == flags[:, 2].astype(bool)).mean() > 0.97


class _Exploding(InferenceBackend):
    name = "exploding"

    def __init__(self, inner, after):
        super().__init__(inner.manifest)
        self.inner, self.after, self.calls = inner, after, 0

    def run(self, inputs):
        self.calls += 1
        if self.calls > self.after:
            raise ModelError("anatomy: inference failed (simulated device loss)")
        return self.inner.run(inputs)


def test_a_failing_stage_stops_the_run_with_its_error_and_no_thread_left(small_dataset):
    anatomy, phase, vis = stages()
    anatomy = SegmentationStage(_Exploding(anatomy.backend, after=10))
    before = threading.active_count()
    p = Pipeline(VideoFileSource(small_dataset / "video01.mp4"), [anatomy, phase, vis])
    t0 = time.monotonic()
    with pytest.raises(ModelError, match="simulated device loss"):
        p.run()
    assert time.monotonic() - t0 < 30  # a hang bound, not a speed check: the video takes minutes to play out
    time.sleep(0.3)
    assert threading.active_count() <= before


def test_stop_midway_returns_promptly_and_twice(small_dataset):
    p = Pipeline(VideoFileSource(small_dataset / "video01.mp4"), stages())
    seen = []
    p.subscribe(seen.append)
    p.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    p.stop()
    p.stop()
    assert time.monotonic() - t0 < 10 and len(seen) > 0  # a hang bound: it did not wait for the video's end


def test_no_unbounded_queue(small_dataset):
    p = Pipeline(VideoFileSource(small_dataset / "video01.mp4"), stages(), PipelineConfig(queue_size=3))
    p.start()
    try:
        assert p._queues and all(isinstance(q, queue.Queue) and q.maxsize == 3 for q in p._queues)
    finally:
        p.stop()


def test_slow_subscriber_never_loses_a_frame_from_a_recording(small_dataset):
    from or_agent.pipelines.sinks import QueuedSubscriber

    got = []

    def slow(r):
        time.sleep(0.002)
        got.append(r.seq)

    sink = QueuedSubscriber(slow, maxsize=2).start()
    p = Pipeline(VideoFileSource(small_dataset / "video01.mp4"), stages())
    p.subscribe(sink)
    p.run()
    sink.stop()
    assert got == list(range(p.frames_out))


def test_live_style_subscriber_drops_oldest_and_counts():
    from or_agent.pipelines.sinks import QueuedSubscriber

    release = threading.Event()
    got = []
    sink = QueuedSubscriber(lambda x: (release.wait(), got.append(x)), maxsize=2, drop_oldest=True).start()
    for i in range(10):
        sink(i)
    release.set()
    sink.stop()
    assert sink.dropped >= 6 and got[-1] == 9 and got == sorted(got)


def test_the_composed_pipeline_gives_exactly_what_the_plain_loop_gives(held_out_video, tmp_path):
    """Behaviour pinned across the move to composed stages: on held-out frames that leave the body and come
    back, the threaded pipeline's results equal a plain loop's that runs the documented rules (visibility
    every frame; the phase stepped at its manifest's 5 Hz of media time and only inside, held with its clock
    running in between; anatomy on every inside frame, none outside; the inputs of the models due on a
    frame made together by the CPU frame path)."""
    from dataclasses import replace

    import cv2

    from or_agent.pipelines.frame_path import HostFramePath
    from or_agent.pipelines.preprocess import ContentAreaTracker
    from or_agent.pipelines.schedule import frame_stepper

    cap = cv2.VideoCapture(str(held_out_video / "video01.mp4"))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 1700)  # the camera leaves the body at frame 1810 and is back at 1925
    clip = tmp_path / "clip.avi"
    out = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (854, 480))
    for _ in range(300):
        ok, img = cap.read()
        assert ok
        out.write(img)
    out.release()
    cap.release()

    anatomy, phase, vis = stages()
    results = []
    p = Pipeline(VideoFileSource(clip), [anatomy, phase, vis])
    p.subscribe(results.append)
    p.run()

    src = VideoFileSource(clip)
    src.start()
    phase.reset()
    steps = frame_stepper(phase.cadence, 25.0)
    tracker = ContentAreaTracker()
    last = None
    expected = []
    for f in range(300):
        frame = src.read()
        t = frame.media_ms / 1000.0
        area = tracker.update(frame.image)
        step = steps(f)  # (a stepper is asked once per frame)
        due = [anatomy, phase, vis] if step else [anatomy, vis]  # what the schedule asks, before the gate
        x = dict(zip(due, HostFramePath().prepare(frame.image, area, due)))
        v = vis.post_process(vis.predict(x[vis]), area, t)
        if step and not v.out_of_body:
            ph = phase.post_process(phase.predict(x[phase]), area, t)
            last = (ph, t)
        elif last is not None:
            ph = replace(last[0], time_in_phase_s=last[0].time_in_phase_s + (t - last[1]))
        else:
            ph = None
        expected.append((v, ph, None if v.out_of_body else anatomy.post_process(anatomy.predict(x[anatomy]), area, t)))
    src.stop()
    for stage in (anatomy, phase, vis):
        stage.backend.close()

    assert len(results) == 300 and sum(r.out_of_body for r in results) > 50
    for r, (v, ph, a) in zip(results, expected):
        assert r.visibility == v and r.phase == ph, f"frame {r.seq}"
        assert (r.segmentation is None) == (a is None)
        if a is not None:
            assert np.array_equal(r.segmentation.class_map, a.class_map) and r.segmentation.area_fraction == a.area_fraction
            assert r.segmentation.confidence == a.confidence


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def test_a_stalled_stream_is_reported_lost_while_it_stalls_not_once_it_is_back():
    """No frame flows while a stream stalls, so nothing is published: the source's events must still reach
    the subscribers then (the agent raises "source lost" from them), not with the first frame after."""
    server = MjpegServer()
    source = StreamSource(server.url, open_timeout_s=2.0, read_timeout_s=1.0, backoff=Backoff(0.1, 0.5))
    p = Pipeline(source, stages())
    results, events = [], []
    p.subscribe(results.append)
    p.subscribe_events(events.append)
    try:
        p.start()
        _wait_for(lambda: len(results) >= 5, 30, "results from the stream")
        server.stall()
        _wait_for(lambda: any(e.kind == "disconnected" for e in events), 20, "the loss while the stream stalls")
        assert server.stalled
        seen = len(results)
        server.resume()
        _wait_for(lambda: any(e.kind == "reconnected" for e in events) and len(results) > seen, 30,
                  "the stream and its results to come back")
    finally:
        p.stop()
        server.close()
    assert p.error is None
    assert [e.kind for e in events] == ["opened", "disconnected", "reconnected"]
