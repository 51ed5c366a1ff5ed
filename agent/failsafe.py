"""The fail-safe: the one place that decides the AI is unavailable, and says so everywhere.

Separate from the service and the server because it is the agent's safety net, and must be readable
and reviewable on its own: ten times a second it compares the case's state with what the displays,
the health service and the alerts were last told. ``grpc.health.v1`` says SERVING only while fresh
results flow. A stall or a lost source makes the AI explicitly unavailable on every
display (a notice five times a second, so none keeps an old overlay) and becomes system state, which
the system rules raise as an alert; when results resume the gap is recorded. It also re-announces
unacknowledged critical alerts, and ends a case whose file played out or whose pipeline failed.
The handlers and ``GetStatus`` only report the state; acting on it is left to this module alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from or_agent.agent.service import AgentService

PERIOD_S = 0.1  # how often the state is checked: health and notices lag a stall by at most this
NOTICE_EVERY_S = 0.2  # how often an unavailable AI is said again to the displays


class Failsafe:
    """The watchdog loop over one ``AgentService``; ``start`` on the event loop, ``stop`` to end it."""

    def __init__(self, service: AgentService, set_health: Callable[[bool], Awaitable[None]]):
        self.service = service
        self.set_health = set_health
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    @property
    def alive(self) -> bool:
        """Started and still watching (a bug that ended the loop must not go unnoticed: see agent.systemd)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task  # it may be stopping a case: let that finish before the caller goes on
        except asyncio.CancelledError:
            pass

    async def _watch(self) -> None:
        """Health follows the freshness of results; a stall or a lost source makes the AI explicitly
        unavailable on every display and raises a system alert; when results resume the gap is
        recorded. Also re-announces unacknowledged critical alerts."""
        svc = self.service
        serving = False
        unavailable_since: float | None = None
        last_notice = 0.0
        while True:
            state = svc.state_name()
            now_serving = state == "RUNNING"
            if now_serving != serving:
                await self.set_health(now_serving)
                serving = now_serving
            session = svc.session
            if state in ("STALLED", "SOURCE_LOST"):
                now = time.monotonic()
                if unavailable_since is None:
                    unavailable_since = now
                    age = session.result_age_s() if session else None
                    reason = "no fresh AI result" + (f" for {age:.1f} s" if age else "") if state == "STALLED" else "video source lost"
                    if state == "STALLED" and svc.decision is not None:
                        svc.decision.set_system(stale=reason)
                    svc.audit("failsafe", {"state": "ai_unavailable", "reason": reason})
                if now - last_notice >= NOTICE_EVERY_S:
                    svc.fanout.publish_unavailable("AI unavailable: " + ("stalled" if state == "STALLED" else "video source lost"))
                    last_notice = now
            elif unavailable_since is not None and state == "RUNNING":
                gap = time.monotonic() - unavailable_since
                if svc.decision is not None:
                    svc.decision.set_system(f"AI results flowing again after {gap:.1f} s", stale="")
                svc.audit("failsafe", {"state": "ai_available", "gap_s": round(gap, 3)})
                unavailable_since = None
            if svc.decision is not None:
                svc.decision.tick()
            if session is not None and not session.stopped_unix_ms and session.finished:
                if session.pipeline.error is not None and svc.decision is not None:
                    svc.decision.set_system(model_error=str(session.pipeline.error))
                await svc.stop_case()  # the file played out, or the pipeline failed; its alerts end with it
                unavailable_since = None
            await asyncio.sleep(PERIOD_S)
