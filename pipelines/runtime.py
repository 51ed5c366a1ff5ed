"""The pipeline runtime: stages on their own threads, joined by small bounded queues.

    source -> capture -> preprocess -> light models -> heavy models -> postprocess -> publish

The models are a ``StageGraph`` (``stages.compose``): the gate (visibility) and the other light
models share one inference thread, the heavy ones (segmentation) have their own. The runtime holds
no model semantics: the frame schedule says which models are due on a frame, each stage's own
attributes say whether it is the gate and what it shows while the gate blocks.

Each arrow is a queue of ``queue_size`` items, so a frame waits behind at most a couple of
others and memory never grows. OpenCV, numpy and ONNX Runtime release the GIL, so the stages
overlap on separate cores and throughput approaches the slowest stage's own rate instead of
the sum of all of them. Queues block rather than drop: a live source drops in its own grabber
(keeping the newest frame) and counts it, and a file replayed offline must not lose frames.

Every frame's result carries the time it crossed each stage boundary; the runtime keeps
per-interval and end-to-end histograms. Results and events go out through one publish point
(``subscribe`` / ``subscribe_events``) that the gRPC service, the alert rules and recorders
attach to. Source events travel with the results while frames flow; while none do (a lost or
stalled feed) the capture thread hands them on itself, within one read timeout, so a lost source
is known while it is lost and not once it is back. Cleanup is in ``stop()``, which always runs,
whatever failed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from or_agent.pipelines.errors import InputError, ModelError, OrAgentError
from or_agent.pipelines.frame_path import FramePath, HostFramePath
from or_agent.pipelines.manifest import Task
from or_agent.pipelines.masks import segmentation_polygons
from or_agent.pipelines.messages import (
    STAGE_MARKS,
    Estimate,
    Frame,
    FrameResult,
    PhaseEstimate,
    SegmentationEstimate,
    SourceEvent,
)
from or_agent.pipelines.preprocess import ContentArea, ContentAreaTracker
from or_agent.pipelines.schedule import Cadence, FrameSchedule
from or_agent.pipelines.stages import ModelStage, StageGraph, compose
from or_agent.pipelines.telemetry import StageClock

_END = object()  # end-of-stream marker that flows through every queue


@dataclass(frozen=True)
class PipelineConfig:
    # run each segmentation model every k frame periods of media time instead of its manifest's cadence
    # (a box too slow for every frame); 0: the manifests' cadences. Every other model's is its manifest's alone
    anatomy_every: int = 0
    # outputs computed but not published, with why (the model set's ``withheld``): their results are
    # None on every FrameResult, so no display, recording or rule acts on them
    withheld: tuple[tuple[str, str], ...] = ()
    queue_size: int = 2
    content_every: int = 25  # re-estimate the endoscope's circle every N frames
    keep_images: bool = True  # attach the frame to each result (drawing, recording, JPEG stream)
    encode_polygons: bool = False  # outline segmentations as frame-coordinate polygons (for the wire)

    def __post_init__(self):
        for key, least in (("anatomy_every", 0), ("queue_size", 1), ("content_every", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InputError(f"{key}: must be a whole number of frames, at least {least}, got {value!r}"
                                 + (" (0: the models' own cadence)" if key == "anatomy_every" else ""))
        for key in ("keep_images", "encode_polygons"):
            if not isinstance(getattr(self, key), bool):
                raise InputError(f"{key}: must be true or false, got {getattr(self, key)!r}")


@dataclass
class _Work:
    """A frame on its way through the stages (mutable while in flight, owned by one stage at a time)."""

    frame: Frame
    marks: dict[str, int]
    area: ContentArea | None = None
    inputs: dict[str, Any] = field(default_factory=dict)  # model -> input from the frame path (arrays or device buffers)
    raw: dict[str, Any] = field(default_factory=dict)  # model -> its output, for post-processing
    gate_estimate: Estimate | None = None  # the gate's verdict for this frame (it holds between the gate's runs)
    blocked: bool = False  # the gate ruled the frame out (out of body): the others neither run nor show
    fresh: set[str] = field(default_factory=set)  # the models that ran on this frame
    result: FrameResult | None = None


class Pipeline:
    def __init__(self, source, stages: StageGraph | Sequence[ModelStage], config: PipelineConfig | None = None,
                 frame_path: FramePath | None = None):
        self.source = source
        # Where inputs are made and logits reduced (CPU or GPU kernels); one pipeline at a time uses it.
        self.frame_path = frame_path or HostFramePath()
        self.stages = stages if isinstance(stages, StageGraph) else compose(stages)
        self.config = config or PipelineConfig()
        withheld = {out for out, _ in self.config.withheld}
        self._withheld = [s for s in self.stages.stages if str(s.task) in withheld]
        self.clock = StageClock(STAGE_MARKS)
        self._subscribers: list[Callable[[FrameResult], None]] = []
        self._event_subscribers: list[Callable[[SourceEvent], None]] = []
        self._inference_observers: list[Callable[[str, float], None]] = []
        self._threads: list[threading.Thread] = []
        self._queues: list[queue.Queue] = []
        self._stop = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._events_lock = threading.Lock()  # one forwarder at a time: events reach subscribers in order
        self.frames_in = 0
        self.frames_out = 0
        self._started_ns = 0
        self._schedule: FrameSchedule | None = None
        self._gate_estimate: Estimate | None = None  # the gate's verdict holds between its runs
        self._last: dict[str, Estimate] = {}  # model -> its newest estimate (postprocess thread)
        self._polygons: dict[str, dict] = {}  # model -> outlines of its newest estimate
        self._tracker = ContentAreaTracker(self.config.content_every)

    def frame_schedule(self, nominal_fps: float | None) -> FrameSchedule:
        """When each model runs: its manifest's cadence (segmentation's overridden by ``anatomy_every``)."""
        every = self.config.anatomy_every
        return FrameSchedule({s.name: Cadence(every_frames=every) if every and s.task == Task.SEGMENTATION
                              else s.cadence for s in self.stages.stages}, nominal_fps)

    # ----- subscription ---------------------------------------------------------------------
    def subscribe(self, callback: Callable[[FrameResult], None]) -> None:
        """Called on the publish thread for every result, in frame order. Keep it quick:
        a slow subscriber needs its own queue (see the gRPC service)."""
        self._subscribers.append(callback)

    def subscribe_events(self, callback: Callable[[SourceEvent], None]) -> None:
        self._event_subscribers.append(callback)

    def observe_inference(self, callback: Callable[[str, float], None]) -> None:
        """Called on an inference thread with (model, seconds) after each model's run on a frame: the
        time its backend's ``infer`` took, input already made, output not yet post-processed. Keep it quick."""
        self._inference_observers.append(callback)

    def _run_model(self, s: ModelStage, x):
        if not self._inference_observers:
            return s.infer(x, self.frame_path)
        t0 = time.perf_counter()
        out = s.infer(x, self.frame_path)
        took = time.perf_counter() - t0
        for cb in self._inference_observers:
            cb(s.name, took)
        return out

    # ----- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            raise RuntimeError("pipeline already started")
        self.frame_path.reset()
        self.source.start()
        self.stages.reset()
        self._last, self._polygons, self._gate_estimate = {}, {}, None
        self._schedule = self.frame_schedule(getattr(self.source, "nominal_fps", None))
        self._started_ns = time.monotonic_ns()
        steps = [self._preprocess, self._infer_light] + ([self._infer_heavy] if self.stages.heavy else []) + [
            self._postprocess, self._publish]
        self._queues = [queue.Queue(maxsize=self.config.queue_size) for _ in steps]
        self._threads = [threading.Thread(target=self._capture_loop, name="capture", daemon=True)]
        for i, step in enumerate(steps):
            out_q = self._queues[i + 1] if i + 1 < len(steps) else None
            self._threads.append(threading.Thread(target=self._stage_loop, args=(step, self._queues[i], out_q),
                                                  name=step.__name__.strip("_"), daemon=True))
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop every stage and release the source; safe to call twice and after a failure."""
        self._stop.set()
        for q in self._queues:  # unblock producers waiting on full queues
            try:
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        try:
            self.source.stop()
        finally:
            self._forward_source_events()
            self._done.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the end of the stream (or a failure); True when finished."""
        return self._done.wait(timeout_s)

    def run(self) -> None:
        """Start, process the whole source, stop. Raises the first stage failure, if any."""
        self.start()
        try:
            while not self.wait(0.2):
                pass
        finally:
            self.stop()
        if self._error is not None:
            raise self._error

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def threads_alive(self) -> bool:
        """Whether any of its threads still runs (started, and not yet all ended by the stream's end, a
        failure or ``stop``): what the systemd watchdog asks of a running case."""
        return any(t.is_alive() for t in self._threads)

    # ----- metrics --------------------------------------------------------------------------
    def stats(self) -> dict:
        elapsed = max(1e-9, (time.monotonic_ns() - self._started_ns) / 1e9) if self._started_ns else 0.0
        return {
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "frames_dropped_source": int(getattr(self.source, "frames_dropped", 0)),
            "fps_out": self.frames_out / elapsed if elapsed else 0.0,
            "latency_ms": self.clock.summary(),
        }

    # ----- the stages -----------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc if isinstance(exc, OrAgentError) else ModelError(
                    f"pipeline stage failed: {type(exc).__name__}: {exc}")
        self._stop.set()
        self._done.set()

    def _put(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _forward_source_events(self) -> None:
        drain = getattr(self.source, "drain_events", None)
        if drain is None:
            return
        with self._events_lock:
            for ev in drain():
                for cb in self._event_subscribers:
                    cb(ev)

    def _capture_loop(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self.source.read(timeout_s=0.2)
                if frame is None:
                    if getattr(self.source, "ended", True):
                        break
                    # No frame, so no publish soon: what the source says (lost, stalled) goes out now.
                    self._forward_source_events()
                    continue
                self.frames_in += 1
                if not self._put(self._queues[0], _Work(frame, {"capture": frame.capture_ns})):
                    return
            self._put(self._queues[0], _END)
        except BaseException as exc:
            self._fail(exc)

    def _stage_loop(self, step, in_q: queue.Queue, out_q: queue.Queue | None) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item = in_q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _END:
                    if out_q is not None:
                        self._put(out_q, _END)
                    else:
                        self._done.set()
                    return
                step(item)
                if out_q is not None and not self._put(out_q, item):
                    return
        except BaseException as exc:
            self._fail(exc)

    def _preprocess(self, w: _Work) -> None:
        img = w.frame.image
        w.area = self._tracker.update(img)
        assert self._schedule is not None, "frames flow only after start()"
        due = self._schedule.due(w.frame.media_ms)
        stages = [s for s in self.stages.stages if s.name in due]
        w.inputs = {s.name: x for s, x in zip(stages, self.frame_path.prepare(img, w.area, stages))}
        w.marks["preprocess"] = time.monotonic_ns()

    def _infer(self, w: _Work, stages: Sequence[ModelStage]) -> None:
        try:
            for s in stages:
                x = w.inputs.pop(s.name, None)
                if x is None:
                    continue
                try:
                    if s.gate:  # decided at once: whether the others run on this frame
                        self._gate_estimate = s.post_process(self._run_model(s, x), w.area, w.frame.media_ms / 1000.0)
                        w.fresh.add(s.name)
                    elif not w.blocked:
                        w.raw[s.name] = self._run_model(s, x)
                finally:
                    self.frame_path.release(x)
        finally:
            for s in stages:  # a failure above must not keep the others' buffers
                self.frame_path.release(w.inputs.pop(s.name, None))

    def _infer_light(self, w: _Work) -> None:
        gate = self.stages.gate
        if gate is not None:
            self._infer(w, (gate,))
            w.gate_estimate = self._gate_estimate
            w.blocked = w.gate_estimate is not None and gate.blocks_others(w.gate_estimate)
        self._infer(w, [s for s in self.stages.light if s is not gate])
        if not self.stages.heavy:
            w.marks["inference"] = time.monotonic_ns()

    def _infer_heavy(self, w: _Work) -> None:
        self._infer(w, self.stages.heavy)
        w.marks["inference"] = time.monotonic_ns()

    def _postprocess(self, w: _Work) -> None:
        t_s = w.frame.media_ms / 1000.0
        estimates: list[Estimate] = []
        unfamiliar = False  # the familiarity verdict of a phase estimate, shown or withheld
        for s in self.stages.stages:
            est: Estimate | None
            if s.gate:
                est = w.gate_estimate
            elif s.name in w.raw:
                est = self._last[s.name] = s.post_process(w.raw.pop(s.name), w.area, t_s)
                if self.config.encode_polygons and isinstance(est, SegmentationEstimate):
                    # Outlined once per estimate: frames between runs reuse the estimate and its polygons.
                    self._polygons[s.name] = segmentation_polygons(est)
                w.fresh.add(s.name)
            elif s.name in self._last and (s.holds_out_of_body or not w.blocked):
                est = s.carry(self._last[s.name], t_s)
            else:
                est = None
            if isinstance(est, PhaseEstimate) and not est.familiar:
                unfamiliar = True
            if est is not None and s not in self._withheld and (s.gate or s.holds_out_of_body or not w.blocked):
                estimates.append(est)
        shown = {e.model for e in estimates}
        polygons = {m: p for m, p in self._polygons.items() if m in shown} if self.config.encode_polygons else None
        w.marks["postprocess"] = time.monotonic_ns()
        w.result = FrameResult.of(
            estimates, seq=w.frame.seq, media_ms=w.frame.media_ms, frame_size=w.frame.size, marks_ns=w.marks,
            fresh=frozenset(w.fresh & shown), image=w.frame.image if self.config.keep_images else None,
            polygons=polygons, withheld=self.config.withheld, unfamiliar_scene=unfamiliar)

    def _publish(self, w: _Work) -> None:
        self._forward_source_events()
        w.marks["publish"] = time.monotonic_ns()
        self.clock.record(w.marks)
        self.frames_out += 1
        for cb in self._subscribers:
            cb(w.result)
