"""The gRPC service (``oragent.v1.OrAgent`` on ``grpc.aio``), its fan-out and its safety nets.

Overlays: the pipeline's publish thread turns each result into wire bytes once (with and without
anatomy, as subscribers asked) and offers them to every subscriber's own bounded queue on the event
loop; a full queue drops its oldest overlay, so a slow or stuck display never slows the pipeline or
the other displays, and a display that keeps dropping for ``behind_limit_s`` is ended with
RESOURCE_EXHAUSTED. Composited JPEGs are made once per frame and quality, on their own thread, only
when someone asked.

Alerts: an ``AlertLog`` with sequence numbers; a display resumes after the last number it saw.

Health: ``grpc.health.v1`` says SERVING only while fresh results flow (checked every 100 ms).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import grpc
from google.protobuf.message import DecodeError

from or_agent.agent import VERSION
from or_agent.agent.alert_log import AlertLog, AlertRecord
from or_agent.agent.config import AgentConfig, is_loopback, is_plain_name, listen_host
from or_agent.agent.decision import DecisionSupport
from or_agent.agent.session import CaseSession, CaseSpec, LoadedModels
from or_agent.pipelines.errors import OrAgentError
from or_agent.pipelines.messages import FrameResult, SourceEvent
from or_agent.pipelines.overlay import AlertBanner, OverlayRenderer
from or_agent.pipelines.sinks import QueuedSubscriber
from or_agent.proto.oragent.v1 import agent_pb2 as pb

log = logging.getLogger("or-agent.service")
SERVICE_NAME = "oragent.v1.OrAgent"
SEVERITY_PB = {"info": pb.INFO, "warning": pb.WARNING, "critical": pb.CRITICAL}
KIND_PB = {"raised": pb.AlertEvent.RAISED, "updated": pb.AlertEvent.UPDATED, "cleared": pb.AlertEvent.CLEARED,
           "acknowledged": pb.AlertEvent.ACKNOWLEDGED, "reannounced": pb.AlertEvent.REANNOUNCED}
_SHUTDOWN = object()
_MALFORMED = object()


def loggable(text: str, limit: int = 200) -> str:
    """A client-supplied string as it may appear in a log line: control characters (a newline would
    forge a line) escaped, and at most ``limit`` characters."""
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


def alert_to_pb(rec: AlertRecord, models: list, instance: str = "") -> pb.AlertEvent:
    return pb.AlertEvent(sequence=rec.sequence, alert_id=rec.alert_id, rule=rec.rule, severity=SEVERITY_PB[rec.severity],
                         kind=KIND_PB[rec.kind], message=rec.message, evidence=rec.evidence,
                         frame_sequence=rec.frame_sequence, frame_media_ms=rec.frame_media_ms,
                         event_unix_ms=rec.unix_ms, acknowledged_by=rec.acknowledged_by, models=models,
                         agent_instance=instance)


def overlay_to_pb(r: FrameResult, models: list, alerts: list, class_names, include_anatomy: bool,
                  anatomy_model: str = "", model_set: str = "") -> pb.Overlay:
    """The wire form of one result. Out-of-body frames carry no anatomy and say AI paused."""
    now_ns, now_ms = time.monotonic_ns(), time.time() * 1000
    msg = pb.Overlay(sequence=r.seq, media_ms=r.media_ms,
                     capture_unix_ms=int(now_ms - (now_ns - r.marks_ns["capture"]) / 1e6),
                     capture_to_publish_ms=r.latency_ms("capture", "publish") if "publish" in r.marks_ns else 0.0,
                     frame_width=r.frame_size[0], frame_height=r.frame_size[1], models=models, active_alerts=alerts,
                     model_set=model_set, withheld=[pb.Withheld(output=o, reason=why) for o, why in r.withheld])
    if r.visibility is not None:
        v = r.visibility
        msg.visibility.CopyFrom(pb.VisibilityState(out_of_body=v.out_of_body, low_visibility=v.low_visibility,
                                                   p_out_of_body=v.p_out_of_body, p_low_visibility=v.p_low_visibility))
    if r.out_of_body:
        msg.ai_paused, msg.paused_reason = True, "camera out of body"
    if r.phase is not None:
        p = r.phase
        msg.phase.CopyFrom(pb.PhaseState(id=p.phase, name=p.name, probabilities=p.probabilities,
                                         confidence=p.confidence, time_in_phase_s=p.time_in_phase_s))
    if include_anatomy and r.anatomy is not None and not r.out_of_body:
        fractions = r.anatomy.frame_fractions(r.frame_size)
        for c, polys in sorted((r.polygons or {}).items()):
            msg.anatomy.append(pb.AnatomyRegion(
                class_id=c, name=class_names[c], confidence=r.anatomy.confidence[c],
                area_fraction=fractions[c], model=anatomy_model,
                polygons=[pb.Polygon(xy=poly.reshape(-1).tolist()) for poly in polys]))
    if r.anatomy is not None and r.anatomy.cvs and not r.out_of_body:
        msg.classifications.append(pb.Classification(
            model=anatomy_model, name="critical_view_of_safety",
            labels=[pb.LabelProbability(label=k, probability=v) for k, v in r.anatomy.cvs]))
    return msg


@dataclass(eq=False)
class _Subscriber:
    client_id: str
    peer: str
    include_anatomy: bool
    jpeg_key: tuple[int, int] | None  # (quality, max side) when the display wants composited JPEG
    queue: asyncio.Queue
    dropped: int = 0
    sent: int = 0
    behind_since: float | None = None

    def over_limit(self, limit_s: float) -> bool:
        return self.behind_since is not None and time.monotonic() - self.behind_since > limit_s

    def offer(self, payload) -> None:
        """On the event loop: enqueue, dropping the oldest overlay when full."""
        if self.queue.full():
            try:
                self.queue.get_nowait()
                self.dropped += 1
                if self.behind_since is None:
                    self.behind_since = time.monotonic()
            except asyncio.QueueEmpty:
                pass
        self.queue.put_nowait(payload)


def source_kind(spec: str) -> str:
    """What kind of source, without its path or URL (either may carry a patient's name)."""
    if spec.isdigit() or spec.startswith("/dev/"):
        return "camera"
    if "://" in spec:
        return "stream"
    return "image folder" if Path(spec).is_dir() else "file"


def config_digest(config: AgentConfig) -> str:
    return hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()


class AgentService:
    """State shared by the RPC handlers: the models, the case, subscribers, alerts, health."""

    def __init__(self, config: AgentConfig, models: LoadedModels, loop: asyncio.AbstractEventLoop):
        self.config = config
        self.models = models
        self.loop = loop
        self.alerts = AlertLog(config.server.alert_history)
        self.alerts.listen(self._alert_recorded)
        self.session: CaseSession | None = None
        self.started = time.monotonic()
        self.subscribers: set[_Subscriber] = set()
        self.shutting_down = False
        self._alert_wakeup = asyncio.Event()
        self._session_lock = asyncio.Lock()
        self.class_names = [lab.name for lab in models.manifests["segmentation"].labels]
        self.anatomy_model = models.manifests["segmentation"].name
        self.model_set = models.model_set.name
        self.model_info = [pb.ModelInfo(task=t, name=m.name, version=m.version, sha256=m.sha256,
                                        backend=models.backend_name(t)) for t, m in models.manifests.items()]
        self.preprocessing = models.frame_path_reason
        self.renderer = OverlayRenderer(models.manifests["segmentation"].labels)
        self._jpeg_worker: QueuedSubscriber | None = None
        self.published = 0
        self._published_at: deque[float] = deque(maxlen=1024)  # monotonic times of recent results
        self.rules = models.rules(config.alerts.rules_file or None, overrides={"phase_too_long": {"time_scale": config.alerts.time_scale}})
        self.decision: DecisionSupport | None = None
        self.alert_streams = 0  # open StreamAlerts calls (on the event loop)
        # set by the server: sets the health service at once where the state changes outside its watchdog
        self.health_hook: Callable[[bool], Awaitable[None]] | None = None
        self._audit_writer: QueuedSubscriber | None = None
        self._audit_log = None
        self._case_started = 0.0

    # ----- from the pipeline's publish thread -------------------------------------------------
    def on_result(self, r: FrameResult) -> None:
        if self.decision is not None:
            self.decision.on_result(r)  # first, so the alerts this frame raised are on its overlay
        subs = list(self.subscribers)
        self.published += 1
        self._published_at.append(time.monotonic())
        if not subs:
            return
        active = self._active_alerts_pb()
        payload = {}
        for want in {s.include_anatomy for s in subs}:
            payload[want] = overlay_to_pb(r, self.model_info, active, self.class_names, want, self.anatomy_model,
                                          self.model_set).SerializeToString()
        plain = [s for s in subs if s.jpeg_key is None]
        if plain:
            self.loop.call_soon_threadsafe(self._deliver, [(s, payload[s.include_anatomy]) for s in plain])
        if len(plain) < len(subs) and self._jpeg_worker is not None:
            self._jpeg_worker((r, payload, [s for s in subs if s.jpeg_key is not None]))

    def _compose_jpegs(self, item) -> None:
        r, payload, subs = item
        banners = [AlertBanner(a.severity, a.message) for a in self.alerts.active()]
        composed = self.renderer.draw(r.image, r, banners)
        encoded: dict[tuple[int, int], bytes] = {}
        deliveries = []
        for s in subs:
            if s.jpeg_key not in encoded:
                quality, max_side = s.jpeg_key
                img = composed
                h, w = img.shape[:2]
                if max_side and max(w, h) > max_side:
                    k = max_side / max(w, h)
                    img = cv2.resize(img, (max(1, int(w * k)), max(1, int(h * k))), interpolation=cv2.INTER_AREA)
                ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
                # A serialised message is the concatenation of its fields: append field 14.
                encoded[s.jpeg_key] = pb.Overlay(composited_jpeg=buf.tobytes()).SerializeToString() if ok else b""
            deliveries.append((s, payload[s.include_anatomy] + encoded[s.jpeg_key]))
        self.loop.call_soon_threadsafe(self._deliver, deliveries)

    def _active_alerts_pb(self) -> list[pb.ActiveAlert]:
        return [pb.ActiveAlert(alert_id=a.alert_id, rule=a.rule, severity=SEVERITY_PB[a.severity], message=a.message,
                               acknowledged=a.acknowledged) for a in self.alerts.active()]

    def publish_unavailable(self, reason: str) -> None:
        """On the event loop: tell every display, explicitly, that there is no current AI result.
        Sent while the pipeline is stalled or the source lost, so no display keeps an old overlay."""
        data = pb.Overlay(ai_paused=True, paused_reason=reason, capture_unix_ms=int(time.time() * 1000),
                          active_alerts=self._active_alerts_pb(), models=self.model_info).SerializeToString()
        self._deliver([(s, data) for s in self.subscribers])

    def _deliver(self, deliveries) -> None:
        if self.shutting_down:
            return  # each stream's queue ends with the shutdown marker; nothing may push it out
        for s, data in deliveries:
            if s in self.subscribers:
                s.offer(data)

    def on_source_event(self, e: SourceEvent) -> None:
        """Source trouble becomes system alerts, so the team sees why the AI went quiet."""
        if e.kind == "disconnected":
            self.alerts.raise_alert("source_lost", "critical", f"video source lost: {e.message}", {"source": e.source}, e.seq or 0)
        elif e.kind == "reconnected":
            self.alerts.clear("source_lost", f"video source back after {e.gap_s or 0:.1f} s", e.seq or 0)
        elif e.kind == "frozen":
            self.alerts.raise_alert("frozen_feed", "warning", f"video feed frozen: {e.message}", {"source": e.source}, e.seq or 0)
        elif e.kind == "unfrozen":
            self.alerts.clear("frozen_feed", f"video feed moving again after {e.gap_s or 0:.1f} s", e.seq or 0)
        elif e.kind == "error":
            self.alerts.raise_alert("source_error", "warning", e.message, {"source": e.source}, e.seq or 0)

    def _alert_recorded(self, _rec: AlertRecord) -> None:
        self.loop.call_soon_threadsafe(self.wake_alert_streams)

    def wake_alert_streams(self) -> None:
        """On the event loop: wake every alert stream. Each waits on the event that was current when
        it last read the log, so none can miss a wakeup another stream has already consumed."""
        wakeup, self._alert_wakeup = self._alert_wakeup, asyncio.Event()
        wakeup.set()

    def recent_fps(self, window_s: float = 2.0) -> float:
        """Results published per second over the last ``window_s`` of the current case."""
        now = time.monotonic()
        span = min(window_s, now - self._case_started)
        if span <= 0:
            return 0.0
        return sum(1 for t in list(self._published_at) if now - t <= span) / span

    # ----- case lifecycle -------------------------------------------------------------------
    async def start_case(self, spec: CaseSpec) -> CaseSession:
        async with self._session_lock:
            if self.session is not None and not self.session.stopped_unix_ms:
                raise RuntimeError(f"case {self.session.spec.case_id!r} is running; stop it first")
            session = CaseSession(spec, self.models, self.config.pipeline, self.on_result, self.on_source_event)
            self._case_started = time.monotonic()
            self.decision = DecisionSupport(self.alerts, self.rules, self.config.alerts.reannounce_s)
            await asyncio.get_running_loop().run_in_executor(None, session.start)
            self.session = session
            self.audit("session_start", {"case_id": spec.case_id, "source_kind": source_kind(spec.source),
                                         "paced": spec.paced, "config_sha256": config_digest(self.config),
                                         "models": [{"task": t, "model": m.name, "version": m.version, "sha256": m.sha256}
                                                    for t, m in self.models.manifests.items()],
                                         "rules": [r.id for r in self.rules]})
            return session

    async def stop_case(self) -> CaseSession | None:
        async with self._session_lock:
            session = self.session
            if session is None or session.stopped_unix_ms:
                return None
            if self.health_hook is not None:
                await self.health_hook(False)  # health follows the state exactly: not serving once stopping
            await asyncio.get_running_loop().run_in_executor(None, session.stop)
            # Nothing of this case may be shown or re-announced during the next: its alerts end with it.
            self.decision = None
            self.alerts.clear_all(f"case {session.spec.case_id} ended")
            stats = session.pipeline.stats()
            self.audit("session_stop", {"case_id": session.spec.case_id, "frames_processed": stats["frames_out"],
                                        "frames_dropped": stats["frames_dropped_source"],
                                        "error": str(session.pipeline.error or "")})
            return session

    # ----- the audit trail ------------------------------------------------------------------
    def audit(self, kind: str, data: dict) -> None:
        """Queue an audit record; written (and fsynced) on the audit thread, never dropped."""
        if self._audit_writer is not None:
            self._audit_writer((kind, data))

    def _write_audit(self, item) -> None:
        kind, data = item
        try:
            self._audit_log.append(kind, data)
        except OSError:
            # The record may or may not be on disk; the chain stays verifiable and the next append
            # continues it. The agent keeps serving and says so loudly.
            log.exception("audit trail write failed (%s)", kind)

    def _audit_alert(self, rec: AlertRecord) -> None:
        self.audit(f"alert_{rec.kind}", {"alert_sequence": rec.sequence, "alert_id": rec.alert_id, "rule": rec.rule,
                                         "severity": rec.severity, "message": rec.message, "evidence": rec.evidence,
                                         "frame_sequence": rec.frame_sequence, "frame_media_ms": rec.frame_media_ms,
                                         "acknowledged_by": rec.acknowledged_by})

    def start_workers(self) -> None:
        self._jpeg_worker = QueuedSubscriber(self._compose_jpegs, maxsize=1, drop_oldest=True, name="jpeg").start()
        if self.config.audit.directory:
            from or_agent.agent.audit import AuditLog

            self._audit_log = AuditLog(Path(self.config.audit.directory), max_bytes=self.config.audit.max_bytes).open()
            self._audit_writer = QueuedSubscriber(self._write_audit, maxsize=1024, name="audit").start()
            self.alerts.listen(self._audit_alert)
            self.audit("config", {"config_sha256": config_digest(self.config), "agent_version": VERSION,
                                  "listen_loopback": is_loopback(listen_host(self.config.server.listen)),
                                  "tls": bool(self.config.server.tls_cert),
                                  "mutual_tls": bool(self.config.server.tls_cert and self.config.server.require_client_auth)})

    def stop_workers(self) -> None:
        if self._jpeg_worker is not None:
            try:
                self._jpeg_worker.stop(timeout_s=2.0)
            except Exception:
                log.exception("JPEG worker failed")
        if self._audit_writer is not None:
            self._audit_writer.stop(timeout_s=30.0)  # every queued record reaches the disk
            self._audit_log.close()
            self._audit_writer = None

    def state_name(self) -> str:
        if self.shutting_down:
            return "STOPPING"
        if self.session is None or self.session.stopped_unix_ms:
            return "IDLE"
        return self.session.state()

    def status(self) -> pb.Status:
        st = pb.Status(state=pb.Status.PipelineState.Value(self.state_name()), models=self.model_info,
                       uptime_s=time.monotonic() - self.started, subscribers=len(self.subscribers), agent_version=VERSION,
                       preprocessing=self.preprocessing)
        s = self.session
        if s is not None:
            stats = s.pipeline.stats()
            lat = stats["latency_ms"]["end_to_end"]
            st.source, st.case_id = s.source.name, s.spec.case_id
            st.frames_per_second = self.recent_fps()  # recent, as the contract says: a stall shows at once
            st.frames_processed, st.frames_dropped = stats["frames_out"], stats["frames_dropped_source"]
            st.capture_to_publish.CopyFrom(pb.LatencyPercentiles(p50_ms=lat["p50_ms"], p95_ms=lat["p95_ms"],
                                                                 p99_ms=lat["p99_ms"], max_ms=lat["max_ms"], count=lat["count"]))
            if s.pipeline.error is not None:
                st.last_error = str(s.pipeline.error)
        return st


# ----- request checks -----------------------------------------------------------------------
def _tolerant(parse):
    """A deserializer that turns undecodable bytes into a marker the handler answers with INVALID_ARGUMENT."""
    def deserialize(data: bytes):
        try:
            return parse(data)
        except (DecodeError, ValueError):
            return _MALFORMED
    return deserialize


async def _reject_malformed(request, context) -> None:
    if request is _MALFORMED:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request: not a valid protobuf message")


async def _check_client_id(client_id: str, context) -> None:
    if not is_plain_name(client_id):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"client_id: use 1-64 letters, digits, '.', '_' or '-', got {client_id[:80]!r}")


class OrAgentHandlers:
    """The RPC handlers; thin, all state lives in AgentService."""

    def __init__(self, service: AgentService):
        self.s = service

    async def StreamOverlays(self, request, context):
        await _reject_malformed(request, context)
        await _check_client_id(request.client_id, context)
        cfg = self.s.config.server
        if request.jpeg_quality > 100 or request.jpeg_max_side > 8192:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "jpeg_quality must be 0-100 and jpeg_max_side 0-8192")
        if len(self.s.subscribers) >= cfg.max_subscribers:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many subscribers (limit {cfg.max_subscribers})")
        jpeg = (request.jpeg_quality or 80, request.jpeg_max_side) if request.include_jpeg else None
        sub = _Subscriber(request.client_id, context.peer(), request.include_anatomy, jpeg, asyncio.Queue(cfg.subscriber_queue))
        self.s.subscribers.add(sub)
        log.info("display %s (%s) subscribed to overlays", sub.client_id, sub.peer)
        try:
            while True:
                payload = await sub.queue.get()
                if payload is _SHUTDOWN:
                    return
                if sub.behind_since is not None and sub.queue.empty():
                    sub.behind_since = None
                if sub.over_limit(cfg.behind_limit_s) or not await self._write(sub, context, payload, cfg.behind_limit_s):
                    await self._end_behind(sub, context, cfg.behind_limit_s)
                    return
                sub.sent += 1
        finally:
            self.s.subscribers.discard(sub)
            log.info("display %s unsubscribed (%d sent, %d dropped)", sub.client_id, sub.sent, sub.dropped)

    @staticmethod
    async def _write(sub: _Subscriber, context, payload, limit_s: float) -> bool:
        """Send one overlay; False if the display's transport stayed full until it fell behind the limit.

        A display that reads slowly first fills gRPC's flow-control window; the write then waits
        for it, and only a watch beside the write can tell that the display stayed behind."""
        write = asyncio.ensure_future(context.write(payload))
        try:
            while not write.done():
                await asyncio.wait((write,), timeout=0.25)
                if not write.done() and sub.over_limit(limit_s):
                    return False
            write.result()
            return True
        finally:
            if not write.done():
                write.cancel()

    @staticmethod
    async def _end_behind(sub: _Subscriber, context, limit_s: float) -> None:
        log.warning("display %s (%s) fell behind: %d overlays dropped; ending its stream", sub.client_id, sub.peer, sub.dropped)
        try:
            # The status goes out after what the display's transport still holds; don't wait for it.
            await asyncio.wait_for(context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                 f"display {sub.client_id} fell behind: {sub.dropped} overlays dropped, "
                                                 f"still behind after {limit_s:g} s; reconnect"), timeout=1.0)
        except asyncio.TimeoutError:
            pass

    async def StreamAlerts(self, request, context):
        await _reject_malformed(request, context)
        await _check_client_id(request.client_id, context)
        cursor = request.after_sequence
        instance = self.s.alerts.instance
        changed = bool(request.agent_instance) and request.agent_instance != instance
        if changed:  # the client's numbering is another agent's: say so, then everything from the start
            cursor = 0
        elif cursor > self.s.alerts.last_sequence:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                f"after_sequence {cursor} is beyond the newest alert ({self.s.alerts.last_sequence}); "
                                "the agent restarted? resubscribe from 0")
        limit = self.s.config.server.max_subscribers
        if self.s.alert_streams >= limit:  # each stream costs the event loop: as many as overlay streams
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many alert streams (limit {limit})")
        self.s.alert_streams += 1
        try:
            if changed:
                yield pb.AlertEvent(kind=pb.AlertEvent.INSTANCE_CHANGED, agent_instance=instance,
                                    message=f"this is agent instance {instance}, not {loggable(request.agent_instance, 40)}: "
                                            "its alert numbering is its own; its history follows from the start",
                                    event_unix_ms=int(time.time() * 1000))
            async for event in self._alert_events(cursor):
                yield event
        finally:
            self.s.alert_streams -= 1

    async def _alert_events(self, cursor: int):
        while not self.s.shutting_down:
            wakeup = self.s._alert_wakeup  # before reading: an event recorded after this sets it
            events, truncated = self.s.alerts.since(cursor)
            if truncated:
                yield pb.AlertEvent(sequence=cursor, kind=pb.AlertEvent.HISTORY_TRUNCATED, agent_instance=self.s.alerts.instance,
                                    message=f"alert history starts at {events[0].sequence if events else cursor + 1}; "
                                            "older events are gone", event_unix_ms=int(time.time() * 1000))
            for e in events:
                yield alert_to_pb(e, self.s.model_info, self.s.alerts.instance)
                cursor = e.sequence
            if self.s.alerts.last_sequence > cursor:
                continue
            try:
                await asyncio.wait_for(wakeup.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass

    async def GetStatus(self, request, context):
        await _reject_malformed(request, context)
        return self.s.status()

    def _case_info(self, session: CaseSession) -> pb.CaseInfo:
        return pb.CaseInfo(case_id=session.spec.case_id, source=session.source.name, started_unix_ms=session.started_unix_ms,
                           stopped_unix_ms=session.stopped_unix_ms,
                           state=pb.Status.PipelineState.Value(session.state() if not session.stopped_unix_ms else "IDLE"))

    async def StartCase(self, request, context):
        await _reject_malformed(request, context)
        try:
            spec = CaseSpec(request.source, request.case_id, request.paced)
            session = await self.s.start_case(spec)
        except OrAgentError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RuntimeError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        log.info("case %s started on %s", spec.case_id, loggable(session.source.name))
        return self._case_info(session)

    async def StopCase(self, request, context):
        await _reject_malformed(request, context)
        session = await self.s.stop_case()
        if session is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no case is running")
        log.info("case %s stopped (%s)", session.spec.case_id, loggable(request.reason) or "no reason given")
        return self._case_info(session)

    async def AcknowledgeAlert(self, request, context):
        await _reject_malformed(request, context)
        await _check_client_id(request.client_id, context)
        rec = self.s.alerts.acknowledge(request.alert_id, request.client_id)
        if rec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no active alert {request.alert_id[:80]!r}")
        return pb.AcknowledgeResponse(event=alert_to_pb(rec, self.s.model_info, self.s.alerts.instance))


def generic_handler(handlers: OrAgentHandlers) -> grpc.GenericRpcHandler:
    """Method handlers with a pass-through serializer for overlays already serialised once."""
    def out(m):
        return m if isinstance(m, (bytes, bytearray)) else m.SerializeToString()
    methods = {
        "StreamOverlays": grpc.unary_stream_rpc_method_handler(handlers.StreamOverlays, _tolerant(pb.SubscribeRequest.FromString), out),
        "StreamAlerts": grpc.unary_stream_rpc_method_handler(handlers.StreamAlerts, _tolerant(pb.AlertSubscribeRequest.FromString), out),
        "GetStatus": grpc.unary_unary_rpc_method_handler(handlers.GetStatus, _tolerant(pb.StatusRequest.FromString), out),
        "StartCase": grpc.unary_unary_rpc_method_handler(handlers.StartCase, _tolerant(pb.StartCaseRequest.FromString), out),
        "StopCase": grpc.unary_unary_rpc_method_handler(handlers.StopCase, _tolerant(pb.StopCaseRequest.FromString), out),
        "AcknowledgeAlert": grpc.unary_unary_rpc_method_handler(handlers.AcknowledgeAlert,
                                                                _tolerant(pb.AcknowledgeRequest.FromString), out),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)

