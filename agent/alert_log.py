"""Alert events with strictly increasing sequence numbers and a bounded history.

Every raise, update, clear, acknowledgement and re-announcement becomes an ``AlertRecord`` with the
next sequence number. Displays resume from the last number they saw, so an alert is never lost
across a reconnect; the history is bounded, and a display whose gap is older than the history is
told so explicitly instead of silently missing events.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

SEVERITIES = ("info", "warning", "critical")
KINDS = ("raised", "updated", "cleared", "acknowledged", "reannounced")


@dataclass(frozen=True)
class AlertRecord:
    sequence: int
    alert_id: str
    rule: str
    severity: str
    kind: str
    message: str
    evidence: dict[str, str] = field(default_factory=dict)
    frame_sequence: int = 0
    frame_media_ms: float = 0.0
    unix_ms: int = 0
    acknowledged_by: str = ""

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown alert event kind {self.kind!r}")


@dataclass
class ActiveAlert:
    alert_id: str
    rule: str
    severity: str
    message: str
    acknowledged: bool = False
    acknowledged_by: str = ""
    announced_mono: float = 0.0  # when it was last raised or re-announced


class AlertLog:
    def __init__(self, history: int = 1000):
        # sequence numbers are this instance's: a display resuming elsewhere must be told, not trusted
        self.instance = uuid.uuid4().hex[:12]
        self._history: deque[AlertRecord] = deque(maxlen=history)
        self._active: dict[str, ActiveAlert] = {}
        self._seq = 0
        self._counter = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[AlertRecord], None]] = []

    def listen(self, callback: Callable[[AlertRecord], None]) -> None:
        """Called (on the emitting thread) after each event is recorded."""
        self._listeners.append(callback)

    @property
    def last_sequence(self) -> int:
        return self._seq

    def active(self) -> list[ActiveAlert]:
        with self._lock:
            return [ActiveAlert(**vars(a)) for a in self._active.values()]

    def _record(self, **kw) -> AlertRecord:
        """Number and keep the next event. The caller holds the lock from its change of the active
        alerts to here, so the numbers follow the order in which the alerts changed."""
        self._seq += 1
        rec = AlertRecord(sequence=self._seq, unix_ms=int(time.time() * 1000), **kw)
        self._history.append(rec)
        return rec

    def _notify(self, rec: AlertRecord) -> AlertRecord:
        for cb in self._listeners:
            cb(rec)
        return rec

    def raise_alert(self, rule: str, severity: str, message: str, evidence: dict | None = None,
                    frame_sequence: int = 0, frame_media_ms: float = 0.0) -> AlertRecord:
        """Raise (or, if this rule's alert is active, update) an alert."""
        if severity not in SEVERITIES:
            raise ValueError(f"unknown severity {severity!r}")
        with self._lock:
            existing = next((a for a in self._active.values() if a.rule == rule), None)
            if existing is None:
                self._counter += 1
                alert_id = f"{rule}-{self._counter}"
                self._active[alert_id] = ActiveAlert(alert_id, rule, severity, message, announced_mono=time.monotonic())
                kind = "raised"
            else:
                alert_id, kind = existing.alert_id, "updated"
                existing.message, existing.severity = message, severity
            rec = self._record(alert_id=alert_id, rule=rule, severity=severity, kind=kind, message=message,
                               evidence={k: str(v) for k, v in (evidence or {}).items()},
                               frame_sequence=frame_sequence, frame_media_ms=frame_media_ms)
        return self._notify(rec)

    def clear(self, rule: str, message: str = "", frame_sequence: int = 0, frame_media_ms: float = 0.0) -> AlertRecord | None:
        with self._lock:
            existing = next((a for a in self._active.values() if a.rule == rule), None)
            if existing is None:
                return None
            del self._active[existing.alert_id]
            rec = self._record(alert_id=existing.alert_id, rule=rule, severity=existing.severity, kind="cleared",
                               message=message or f"{existing.message} (cleared)", frame_sequence=frame_sequence,
                               frame_media_ms=frame_media_ms, acknowledged_by=existing.acknowledged_by)
        return self._notify(rec)

    def clear_all(self, reason: str) -> list[AlertRecord]:
        """Clear every active alert, saying why (a case ended: nothing of it may show in the next)."""
        cleared = [self.clear(a.rule, message=f"{a.message} (cleared: {reason})") for a in self.active()]
        return [rec for rec in cleared if rec is not None]

    def acknowledge(self, alert_id: str, client_id: str) -> AlertRecord | None:
        """Record who acknowledged; None when no such alert is active."""
        with self._lock:
            a = self._active.get(alert_id)
            if a is None:
                return None
            a.acknowledged, a.acknowledged_by = True, client_id
            rec = self._record(alert_id=alert_id, rule=a.rule, severity=a.severity, kind="acknowledged",
                               message=f"{a.message} (acknowledged by {client_id})", acknowledged_by=client_id)
        return self._notify(rec)

    def reannounce_due(self, interval_s: float) -> list[AlertRecord]:
        """Announce again every unacknowledged critical alert not announced for ``interval_s``."""
        now = time.monotonic()
        due = []
        with self._lock:
            for a in self._active.values():
                if a.severity == "critical" and not a.acknowledged and now - a.announced_mono >= interval_s:
                    a.announced_mono = now
                    due.append(self._record(alert_id=a.alert_id, rule=a.rule, severity=a.severity, kind="reannounced",
                                            message=f"{a.message} (not yet acknowledged)"))
        return [self._notify(rec) for rec in due]

    def since(self, after_sequence: int) -> tuple[list[AlertRecord], bool]:
        """Events after ``after_sequence``, and whether some of them have left the history."""
        with self._lock:
            events = [r for r in self._history if r.sequence > after_sequence]
            oldest = self._history[0].sequence if self._history else self._seq + 1
        # A fresh display (0) simply gets the history; a returning one is told if it missed some.
        truncated = after_sequence > 0 and after_sequence + 1 < oldest
        return events, truncated
