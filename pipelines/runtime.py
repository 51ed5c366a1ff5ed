"""The pipeline runtime: stages on their own threads, joined by small bounded queues.

    source -> capture -> preprocess -> visibility+phase -> anatomy -> postprocess -> publish

Each arrow is a queue of ``queue_size`` items, so a frame waits behind at most a couple of
others and memory never grows. OpenCV, numpy and ONNX Runtime release the GIL, so the stages
overlap on separate cores and throughput approaches the slowest stage's own rate instead of
the sum of all of them. Queues block rather than drop: a live source drops in its own grabber
(keeping the newest frame) and counts it, and a file replayed offline must not lose frames.

Every frame's result carries the time it crossed each stage boundary; the runtime keeps
per-interval and end-to-end histograms. Results and events go out through one publish point
(``subscribe`` / ``subscribe_events``) that the gRPC service, the alert rules and recorders
attach to. Cleanup is in ``stop()``, which always runs, whatever failed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from or_agent.pipelines.errors import ModelError, OrAgentError
from or_agent.pipelines.frame_path import FramePath, HostFramePath
from or_agent.pipelines.masks import anatomy_polygons
from or_agent.pipelines.messages import STAGE_MARKS, Frame, FrameResult, SourceEvent
from or_agent.pipelines.preprocess import ContentArea, ContentAreaTracker
from or_agent.pipelines.schedule import Cadence, FrameSchedule
from or_agent.pipelines.stages import AnatomyStage, PhaseEstimate, PhaseStage, VisibilityEstimate, VisibilityStage
from or_agent.pipelines.telemetry import StageClock

_END = object()  # end-of-stream marker that flows through every queue


@dataclass(frozen=True)
class PipelineConfig:
    # run anatomy every k frame periods of media time instead of its manifest's cadence (a box too slow
    # for every frame); the phase model's rate is its manifest's alone
    anatomy_every: int | None = None
    # outputs computed but not published, with why (the model set's ``withheld``): their results are
    # None on every FrameResult, so no display, recording or rule acts on them
    withheld: tuple[tuple[str, str], ...] = ()
    queue_size: int = 2
    content_every: int = 25  # re-estimate the endoscope's circle every N frames
    keep_images: bool = True  # attach the frame to each result (drawing, recording, JPEG stream)
    encode_polygons: bool = False  # outline anatomy as frame-coordinate polygons (for the wire)

    def __post_init__(self):
        if (self.anatomy_every is not None and self.anatomy_every < 1) or self.queue_size < 1 or self.content_every < 1:
            raise ValueError("anatomy_every, queue_size and content_every must be at least 1")


@dataclass
class _Work:
    """A frame on its way through the stages (mutable while in flight, owned by one stage at a time)."""

    frame: Frame
    marks: dict[str, int]
    area: ContentArea | None = None
    vis_x: object = None  # model inputs from the frame path: arrays, or device buffers to release
    phase_x: object = None
    anatomy_x: object = None
    anatomy_logits: object = None  # logits, or their AnatomyReduction when reduced next to the model
    visibility: VisibilityEstimate | None = None
    phase: PhaseEstimate | None = None
    phase_fresh: bool = False
    anatomy_fresh: bool = False
    result: FrameResult | None = None

    @property
    def out_of_body(self) -> bool:
        assert self.visibility is not None, "visibility is decided before anything reads it"
        return self.visibility.out_of_body


class Pipeline:
    def __init__(self, source, anatomy: AnatomyStage, phase: PhaseStage, visibility: VisibilityStage,
                 config: PipelineConfig | None = None, frame_path: FramePath | None = None):
        self.source = source
        # Where inputs are made and logits reduced (CPU or GPU kernels); one pipeline at a time uses it.
        self.frame_path = frame_path or HostFramePath()
        self.anatomy = anatomy
        self.phase = phase
        self.visibility = visibility
        self.config = config or PipelineConfig()
        self.clock = StageClock(STAGE_MARKS)
        self._subscribers: list[Callable[[FrameResult], None]] = []
        self._event_subscribers: list[Callable[[SourceEvent], None]] = []
        self._threads: list[threading.Thread] = []
        self._queues: list[queue.Queue] = []
        self._stop = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.frames_in = 0
        self.frames_out = 0
        self._started_ns = 0
        self._last_anatomy = None
        self._last_polygons = None
        self._last_phase: PhaseEstimate | None = None
        self._last_phase_s = 0.0
        self._schedule: FrameSchedule | None = None
        self._last_visibility: VisibilityEstimate | None = None  # every model runs on the first frame
        self._tracker = ContentAreaTracker(self.config.content_every)

    def frame_schedule(self, nominal_fps: float | None) -> FrameSchedule:
        """When each stage runs: its manifest's cadence (anatomy's overridden by ``anatomy_every``)."""
        anatomy = (Cadence(every_frames=self.config.anatomy_every) if self.config.anatomy_every is not None
                   else self.anatomy.backend.manifest.cadence)
        return FrameSchedule({"visibility": self.visibility.backend.manifest.cadence,
                              "phase": self.phase.backend.manifest.cadence, "anatomy": anatomy}, nominal_fps)

    # ----- subscription ---------------------------------------------------------------------
    def subscribe(self, callback: Callable[[FrameResult], None]) -> None:
        """Called on the publish thread for every result, in frame order. Keep it quick:
        a slow subscriber needs its own queue (see the gRPC service)."""
        self._subscribers.append(callback)

    def subscribe_events(self, callback: Callable[[SourceEvent], None]) -> None:
        self._event_subscribers.append(callback)

    # ----- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            raise RuntimeError("pipeline already started")
        self.frame_path.reset()
        self.source.start()
        self.phase.reset()
        self._schedule = self.frame_schedule(getattr(self.source, "nominal_fps", None))
        self._started_ns = time.monotonic_ns()
        steps = [self._preprocess, self._infer_light, self._infer_anatomy, self._postprocess, self._publish]
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
        stages = [stage for name, stage in (("visibility", self.visibility), ("phase", self.phase),
                                            ("anatomy", self.anatomy)) if name in due]
        inputs = dict(zip(stages, self.frame_path.prepare(img, w.area, stages)))
        w.vis_x, w.phase_x, w.anatomy_x = inputs.get(self.visibility), inputs.get(self.phase), inputs.get(self.anatomy)
        w.marks["preprocess"] = time.monotonic_ns()

    def _infer_light(self, w: _Work) -> None:
        try:
            if w.vis_x is not None:  # between its runs (a cadence below every frame) its verdict holds
                self._last_visibility = self.visibility.post_process(self.visibility.predict(w.vis_x))
            w.visibility = self._last_visibility
            if w.phase_x is not None and not w.out_of_body:
                # Out of the body the phase model is not stepped: the room says nothing about the phase.
                self._last_phase = self.phase.post_process(self.phase.predict(w.phase_x), w.frame.media_ms / 1000.0)
                w.phase_fresh = True
                self._last_phase_s = w.frame.media_ms / 1000.0
                w.phase = self._last_phase
            elif self._last_phase is not None:
                # Between steps the phase holds; its clock keeps running with the media.
                since = w.frame.media_ms / 1000.0 - self._last_phase_s
                w.phase = replace(self._last_phase, time_in_phase_s=self._last_phase.time_in_phase_s + since)
        finally:
            self.frame_path.release(w.vis_x)
            self.frame_path.release(w.phase_x)
            w.vis_x = w.phase_x = None

    def _infer_anatomy(self, w: _Work) -> None:
        try:
            if w.anatomy_x is not None and not w.out_of_body:
                logits = self.anatomy.predict(w.anatomy_x, on_device=self.frame_path.reduces_on_device)
                # Reduced here when the logits are on the device: the engine reuses that buffer next frame.
                w.anatomy_logits = self.frame_path.reduce(logits)
        finally:
            self.frame_path.release(w.anatomy_x)
            w.anatomy_x = None
        w.marks["inference"] = time.monotonic_ns()

    def _postprocess(self, w: _Work) -> None:
        if w.out_of_body:
            anatomy = None  # nothing is drawn or measured on the room
        elif w.anatomy_logits is not None:
            anatomy = self.anatomy.post_process(w.anatomy_logits, w.area)
            # Outlined once per estimate: frames between anatomy runs reuse the estimate and its polygons.
            self._last_anatomy = anatomy
            self._last_polygons = anatomy_polygons(anatomy) if self.config.encode_polygons else None
            w.anatomy_fresh = True
        else:
            anatomy = self._last_anatomy
        polygons = None if anatomy is None else self._last_polygons
        w.marks["postprocess"] = time.monotonic_ns()
        phase_shown = not any(task == "phase" for task, _ in self.config.withheld)
        w.result = FrameResult(
            seq=w.frame.seq, media_ms=w.frame.media_ms, frame_size=w.frame.size, marks_ns=w.marks,
            visibility=w.visibility, phase=w.phase if phase_shown else None, anatomy=anatomy,
            phase_fresh=w.phase_fresh and phase_shown, anatomy_fresh=w.anatomy_fresh,
            image=w.frame.image if self.config.keep_images else None, polygons=polygons, withheld=self.config.withheld)

    def _publish(self, w: _Work) -> None:
        self._forward_source_events()
        w.marks["publish"] = time.monotonic_ns()
        self.clock.record(w.marks)
        self.frames_out += 1
        for cb in self._subscribers:
            cb(w.result)
