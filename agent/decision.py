"""Decision support on the box: the rules on every result, their alerts, and re-announcement.

The rules engine (``pipelines.rules``) evaluates each pipeline result, and the agent's own state (a
stall, the source, a model failure) through the built-in system rules; its transitions become alert
events in the ``AlertLog`` (and so on the gRPC alert stream, on every overlay's active-alert list,
and in the audit trail). Critical alerts ask for acknowledgement and are announced again every
``reannounce_s`` until a display acknowledges them. Nothing here acts on the surgery.
"""

from __future__ import annotations

import threading

from or_agent.agent.alert_log import AlertLog
from or_agent.pipelines.messages import FrameResult
from or_agent.pipelines.rules import AlertTransition, Rule, RulesEngine


class DecisionSupport:
    def __init__(self, alerts: AlertLog, rules: list[Rule], reannounce_s: float = 30.0):
        self.alerts = alerts
        self.reannounce_s = reannounce_s
        self.engine = RulesEngine(rules, self._transition)
        # results come on the publish thread, system state from the watchdog and the source's events
        self._lock = threading.Lock()

    def _transition(self, t: AlertTransition) -> None:
        media_ms = t.t_s * 1000.0
        if t.kind == "raised":
            self.alerts.raise_alert(t.rule, t.severity, t.message, t.evidence, t.seq, media_ms)
        elif t.kind == "cleared":
            self.alerts.clear(t.rule, t.message, t.seq, media_ms)

    def on_result(self, r: FrameResult) -> None:
        """A pipeline subscriber: runs before the overlay is serialised, so its alerts are on it."""
        with self._lock:
            self.engine.on_result(r)

    def set_system(self, cleared_because: str = "", **states: str) -> None:
        """The agent's own state changed: each of ``pipelines.rules.SYSTEM_STATES`` with its detail, or "";
        ``cleared_because`` says why, on the alerts this clears."""
        with self._lock:
            self.engine.set_system(cleared_because, **states)

    def tick(self) -> None:
        """Called by the agent's watchdog a few times a second."""
        self.alerts.reannounce_due(self.reannounce_s)
