"""Decision support on the box: the rules on every result, their alerts, and re-announcement.

The rules engine (``pipelines.rules``) evaluates each pipeline result; its transitions become alert
events in the ``AlertLog`` (and so on the gRPC alert stream, on every overlay's active-alert list,
and in the audit trail). Critical alerts ask for acknowledgement and are announced again every
``reannounce_s`` until a display acknowledges them. Nothing here acts on the surgery.
"""

from __future__ import annotations

from or_agent.agent.alert_log import AlertLog
from or_agent.pipelines.messages import FrameResult
from or_agent.pipelines.rules import AlertTransition, Rule, RulesEngine


class DecisionSupport:
    def __init__(self, alerts: AlertLog, rules: list[Rule], reannounce_s: float = 30.0):
        self.alerts = alerts
        self.reannounce_s = reannounce_s
        self.engine = RulesEngine(rules, self._transition)

    def _transition(self, t: AlertTransition) -> None:
        media_ms = t.t_s * 1000.0
        if t.kind == "raised":
            self.alerts.raise_alert(t.rule, t.severity, t.message, t.evidence, t.seq, media_ms)
        elif t.kind == "cleared":
            self.alerts.clear(t.rule, t.message, t.seq, media_ms)

    def on_result(self, r: FrameResult) -> None:
        """A pipeline subscriber: runs before the overlay is serialised, so its alerts are on it."""
        self.engine.on_result(r)

    def tick(self) -> None:
        """Called by the agent's watchdog a few times a second."""
        self.alerts.reannounce_due(self.reannounce_s)
