"""The agent under systemd: the sd_notify protocol, spoken directly, and the watchdog's verdict.

``Notifier`` sends ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``RELOADING=1`` and ``STOPPING=1`` as
datagrams to ``$NOTIFY_SOCKET`` (a path, or an abstract socket when it starts with ``@``), as
``sd_notify(3)`` does; without ``NOTIFY_SOCKET`` (not started by systemd, or a test) it does nothing, so
``serve`` behaves the same everywhere. No dependency on python-systemd.

``SystemdLink`` runs on the agent's event loop: it pings the watchdog at half of ``$WATCHDOG_USEC``
only while ``watchdog_problem`` finds nothing wrong, and says the state, case and rate in ``STATUS``
every few seconds. The pings come from the event loop itself, never from a thread of their own, so an
event loop that is stuck stops them, and systemd restarts the agent (``WatchdogSec=``,
``Restart=on-failure``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("or-agent.systemd")

STATUS_EVERY_S = 5.0  # how often STATUS is refreshed when nothing else is sent


class Notifier:
    """A client of the service manager's notification socket; a no-op without one."""

    def __init__(self, address: str | None):
        self.address = address or None
        self._socket: socket.socket | None = None

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _target(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):  # Linux abstract namespace: a leading NUL, not a file
            return b"\0" + self.address[1:].encode()
        return self.address

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False (logged once per failure) if it could not be sent.
        A notification that is lost must never stop the agent, so errors are not raised."""
        if self.address is None:
            return False
        for a in assignments:
            if "=" not in a or "\n" in a:
                raise ValueError(f"sd_notify: one KEY=VALUE per line, got {a!r}")
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(assignments).encode(), self._target())
            return True
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        # MONOTONIC_USEC: what systemd 253+ wants with RELOADING=1 (Type=notify-reload); harmless before
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval_s(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog period systemd expects (``$WATCHDOG_USEC``), or None when there is no watchdog or it
    is meant for another process (``$WATCHDOG_PID``)."""
    env = os.environ if env is None else env
    usec, for_pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if for_pid and for_pid != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 1e6


def watchdog_problem(state: str, failsafe_alive: bool, pipeline_alive: bool) -> str | None:
    """Why the watchdog must not be pinged now, or None when it may.

    ``state`` is the service's (IDLE, STARTING, RUNNING, STALLED, SOURCE_LOST, FAILED, STOPPING). A stalled
    pipeline (no fresh result while the source delivers) or a pipeline whose threads died while its case
    still runs are what a restart can cure; a lost video source is not (the agent is waiting for the
    camera, and says so on every display), nor is a case that failed and that the fail-safe is ending."""
    if not failsafe_alive:
        return "the fail-safe loop is not running"
    if state == "STALLED":
        return "the pipeline is stalled (no fresh result)"
    if state in ("STARTING", "RUNNING", "SOURCE_LOST") and not pipeline_alive:
        return "the pipeline's threads are gone while its case runs"
    return None


def status_line(state: str, case_id: str, fps: float) -> str:
    """The one line ``systemctl status`` shows: the state, the case and its rate."""
    if not case_id:
        return f"{state}: no case"
    return f"{state}: case {case_id}, {fps:.1f} fps"


class SystemdLink:
    """The agent's side of systemd while it serves: watchdog pings and STATUS, on the event loop.

    ``probe`` returns (state, case id, fps, failsafe alive, pipeline alive) from the service; the server
    supplies it so that this module knows nothing of the service's insides."""

    def __init__(self, notifier: Notifier, probe: Callable[[], tuple[str, str, float, bool, bool]],
                 watchdog_s: float | None, status_every_s: float = STATUS_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.notifier, self.probe, self.watchdog_s = notifier, probe, watchdog_s
        self.status_every_s, self.clock = status_every_s, clock
        self._task: asyncio.Task | None = None
        self._last_said: tuple[str, str] | None = None  # (state, case id) of the last STATUS
        self._last_status_at: float | None = None
        self._withheld: str | None = None  # why pings are withheld now (logged when it starts and ends)

    def start(self) -> None:
        if self.notifier.enabled:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    def tick(self) -> None:
        """One round: a watchdog ping if all is well, and STATUS if it changed or is due."""
        state, case_id, fps, failsafe_alive, pipeline_alive = self.probe()
        if self.watchdog_s is not None:
            problem = watchdog_problem(state, failsafe_alive, pipeline_alive)
            if problem is None:
                self.notifier.watchdog()
                if self._withheld is not None:
                    log.warning("watchdog pings resumed (%s no more)", self._withheld)
            elif problem != self._withheld:
                log.error("watchdog pings withheld: %s; systemd restarts the agent if this lasts WatchdogSec", problem)
            self._withheld = problem
        now = self.clock()
        due = self._last_status_at is None or now - self._last_status_at >= self.status_every_s
        if due or self._last_said != (state, case_id):
            self.notifier.status(status_line(state, case_id, fps))
            self._last_said, self._last_status_at = (state, case_id), now

    def period_s(self) -> float:
        """Half the watchdog interval (as sd_watchdog_enabled(3) advises), and at most a second so that
        STATUS follows a state change promptly."""
        return min(self.watchdog_s / 2, 1.0) if self.watchdog_s is not None else 1.0

    async def _run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(self.period_s())
