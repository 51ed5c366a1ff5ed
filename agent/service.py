"""The agent's shared state behind the gRPC service: models, the case, alerts, decision support, audit.

One ``AgentService`` per server. It owns what outlives a request: the loaded models and their wire
description, the running case and its lifecycle, the alert log and the decision support that feeds it,
the audit trail's writer thread, and the state ``GetStatus`` and the fail-safe read. The rest is kept
in its own module so that each reads on its own: the wire form of every message (``wire``), delivery
to each display (``fanout``), the RPC handlers (``handlers``) and the watchdog that decides when the AI
is unavailable (``failsafe``).

Alerts: an ``AlertLog`` with sequence numbers; a display resumes after the last number it saw.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from or_agent.agent import VERSION
from or_agent.agent.alert_log import AlertLog, AlertRecord
from or_agent.agent.config import AgentConfig, is_loopback, listen_host
from or_agent.agent.decision import DecisionSupport
from or_agent.agent.fanout import Fanout
from or_agent.agent.logs import set_case
from or_agent.agent.session import CaseSession, CaseSpec, LoadedModels
from or_agent.agent.wire import status_to_pb
from or_agent.pipelines.messages import FrameResult, SourceEvent
from or_agent.pipelines.overlay import OverlayRenderer
from or_agent.pipelines.sinks import QueuedSubscriber
from or_agent.proto.oragent.v1 import agent_pb2 as pb

if TYPE_CHECKING:
    from or_agent.agent.metrics import AgentMetrics

log = logging.getLogger("or-agent.service")
# source events -> (system state, whether it now holds)
SOURCE_STATES = {"disconnected": ("source_lost", True), "reconnected": ("source_lost", False),
                 "frozen": ("frozen", True), "unfrozen": ("frozen", False), "error": ("source_error", True)}
BACK = {"source_lost": "video source back", "frozen": "video feed moving again"}


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
    """State shared by the RPC handlers and the fail-safe: the models, the case, alerts, decision
    support, the audit trail; delivery to the displays is its ``fanout``'s."""

    def __init__(self, config: AgentConfig, models: LoadedModels, loop: asyncio.AbstractEventLoop):
        self.config = config
        self.models = models
        self.loop = loop
        self.alerts = AlertLog(config.server.alert_history)
        self.session: CaseSession | None = None
        self.started = time.monotonic()
        self.shutting_down = False
        self._session_lock = asyncio.Lock()
        self.model_set = models.model_set.name
        self.model_info = [pb.ModelInfo(task=str(m.task), name=m.name, version=m.version, sha256=m.sha256,
                                        backend=models.backend_name(m.name)) for m in models.model_set.models]
        self.preprocessing = models.frame_path_reason
        self.fanout = Fanout(loop, self.alerts, self.model_info, self.model_set,
                             OverlayRenderer.for_models(models.model_set.models), config.server.subscriber_queue)
        self.alerts.listen(self.fanout.alert_recorded)
        self.published = 0
        self._published_at: deque[float] = deque(maxlen=1024)  # monotonic times of recent results
        self.rules = models.rules(config.alerts.rules_file or None, overrides={"phase_too_long": {"time_scale": config.alerts.time_scale}})
        self.decision: DecisionSupport | None = None
        self.alert_streams = 0  # open StreamAlerts calls (on the event loop)
        # set by the server: sets the health service at once where the state changes outside the fail-safe
        self.health_hook: Callable[[bool], Awaitable[None]] | None = None
        self._audit_writer: QueuedSubscriber | None = None
        self._audit_log = None
        self._audit_retention = None
        self._case_started = 0.0
        # Agent-level system states that outlive a case (the audit trail found damaged at start): every
        # case's decision support starts with them, so each case shows their alerts.
        self.system_states: dict[str, str] = {}
        self._source_trouble: tuple[str, float, float] | None = None  # this case's last: (message, unix s, monotonic s)
        self.metrics: AgentMetrics | None = None  # set by the server when it serves metrics; sees every case's pipeline

    # ----- from the pipeline's publish thread -------------------------------------------------
    def on_result(self, r: FrameResult) -> None:
        if self.decision is not None:
            self.decision.on_result(r)  # first, so the alerts this frame raised are on its overlay
        self.published += 1
        self._published_at.append(time.monotonic())
        self.fanout.publish(r)

    def on_source_event(self, e: SourceEvent) -> None:
        """Source trouble becomes system state, which the system rules turn into alerts, so the team
        sees why the AI went quiet."""
        change = SOURCE_STATES.get(e.kind)
        if change is not None and change[1]:  # trouble: the case's last_error in GetStatus
            self._source_trouble = (e.message or e.kind, time.time(), time.monotonic())
        if change is not None and self.decision is not None:
            state, holds = change
            back = "" if holds else f"{BACK[state]} after {e.gap_s or 0:.1f} s"
            self.decision.set_system(back, **{state: e.message or e.kind if holds else ""})

    def recent_fps(self, window_s: float = 2.0) -> float:
        """Results published per second over the last ``window_s`` of the current case."""
        now = time.monotonic()
        span = min(window_s, now - self._case_started)
        if span <= 0:
            return 0.0
        return sum(1 for t in list(self._published_at) if now - t <= span) / span

    # ----- case lifecycle -------------------------------------------------------------------
    async def start_case(self, spec: CaseSpec, by: str = "") -> CaseSession:
        """``by``: the display that asked (its verified certificate name under mutual TLS), for the audit trail."""
        async with self._session_lock:
            if self.session is not None and not self.session.stopped_unix_ms:
                raise RuntimeError(f"case {self.session.spec.case_id!r} is running; stop it first")
            session = CaseSession(spec, self.models, self.config.pipeline, self.on_result, self.on_source_event)
            if self.metrics is not None:
                self.metrics.attach(session.pipeline)
            self._case_started, self._source_trouble = time.monotonic(), None
            self.decision = DecisionSupport(self.alerts, self.rules, self.config.alerts.reannounce_s)
            set_case(spec.case_id)  # every log line from now on carries it, the source's opening included
            try:
                await asyncio.get_running_loop().run_in_executor(None, session.start)
            except BaseException:
                set_case("")
                raise
            self.session = session
            if self.system_states:  # the agent's own lasting trouble shows in every case
                self.decision.set_system(**self.system_states)
            self.audit("session_start", {"case_id": spec.case_id, "source_kind": source_kind(spec.source),
                                         "paced": spec.paced, "config_sha256": config_digest(self.config),
                                         "models": [{"task": str(m.task), "model": m.name, "version": m.version,
                                                     "sha256": m.sha256} for m in self.models.model_set.models],
                                         "rules": [r.id for r in self.rules], "by": by})
            return session

    async def stop_case(self, by: str = "") -> CaseSession | None:
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
                                        "error": session.public(str(session.pipeline.error or "")), "by": by})
            set_case("")
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
        self.fanout.start_worker()
        if self.config.audit.directory:
            from or_agent.agent.audit.writer import AuditLog

            self._audit_log = AuditLog(Path(self.config.audit.directory), max_bytes=self.config.audit.max_bytes).open()
            if self._audit_log.damage:  # recorded in the trail by the writer; shown at every case from now on
                self.system_states["audit_damaged"] = self._audit_log.damage
            self._audit_writer = QueuedSubscriber(self._write_audit, maxsize=1024, name="audit").start()
            from or_agent.agent.audit.retention import AuditRetention, RetentionPolicy

            # prunes now and daily on its own thread, through the same writer (it holds the directory)
            self._audit_retention = AuditRetention(self._audit_log, RetentionPolicy(
                self.config.audit.retention_days, self.config.audit.retention_mb)).start()
            self.alerts.listen(self._audit_alert)
            self.audit("config", {"config_sha256": config_digest(self.config), "agent_version": VERSION,
                                  "listen_loopback": is_loopback(listen_host(self.config.server.listen)),
                                  "tls": bool(self.config.server.tls_cert),
                                  "mutual_tls": bool(self.config.server.tls_cert and self.config.server.require_client_auth)})

    def stop_workers(self) -> None:
        self.fanout.stop_worker()
        if self._audit_retention is not None:
            self._audit_retention.stop()
            self._audit_retention = None
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

    def begin_shutdown(self) -> None:
        """The agent is stopping: its state says STOPPING, alert streams end, and nothing more is
        delivered to the displays but the end of their streams."""
        self.shutting_down = True
        self.fanout.close()

    def status(self) -> pb.Status:
        state = self.state_name()
        s = self.session
        return status_to_pb(state, self.model_info, time.monotonic() - self.started, len(self.fanout.subscribers),
                            self.preprocessing, s, self.recent_fps() if s is not None else 0.0,
                            last_error=self.source_trouble(), audit_warning=self.system_states.get("audit_damaged", ""))

    def source_trouble(self) -> str:
        """The case's last source trouble (lost, stalled, an error, frozen) with when it happened, or ""."""
        if self._source_trouble is None:
            return ""
        message, unix_s, mono_s = self._source_trouble
        at = time.strftime("%H:%M:%S", time.gmtime(unix_s))
        return f"{message} (at {at} UTC, {time.monotonic() - mono_s:.1f} s ago)"
