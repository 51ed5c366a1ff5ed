"""The agent as a systemd service: the sd_notify protocol against a fake notify socket, the watchdog's
decision, liveness and readiness health names, SIGHUP reloads, ``config check`` and the unit file.

The notify socket is a bound ``AF_UNIX`` datagram socket in a temporary directory (or the abstract
namespace), as systemd's own is; ``serve`` runs as a subprocess with ``NOTIFY_SOCKET`` pointing at it.
No test asserts a time: waits are generous and end on what is awaited.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from or_agent.agent.config import load_config
from or_agent.agent.reload import plan_reload
from or_agent.agent.server import LIVENESS, READINESS
from or_agent.agent.systemd import Notifier, SystemdLink, status_line, watchdog_interval_s, watchdog_problem
from or_agent.pipelines.errors import InputError
from or_agent.proto.oragent.v1 import agent_pb2 as pb
from or_agent.proto.oragent.v1 import agent_pb2_grpc as pbg
from tests.conftest import ROOT, run_cli

# case_area and no_thread_leak are autouse fixtures: the tests' videos may be opened, no thread is left behind
from tests.test_service import Agent, case_area, channel, eventually, no_thread_leak, start_case  # noqa: F401

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNIT = ROOT / "packaging" / "or-agent.service"


class FakeNotifySocket:
    """systemd's side of the protocol: a datagram socket that collects what the agent says."""

    def __init__(self, directory: Path | None = None, abstract: str | None = None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract is not None:
            self.sock.bind(b"\0" + abstract.encode())
            self.address = "@" + abstract
        else:
            assert directory is not None
            self.address = str(directory / "notify.sock")
            self.sock.bind(self.address)
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout_s: float = 10.0) -> dict[str, str] | None:
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        message = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.messages.append(message)
        return message

    def wait_for(self, key: str, value: str | None = None, timeout_s: float = 60.0) -> dict[str, str]:
        """The next message with ``key`` (equal to ``value`` if given); the others are kept in ``messages``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = self.receive(max(0.1, deadline - time.monotonic()))
            if m is not None and key in m and (value is None or m[key] == value):
                return m
        raise AssertionError(f"no {key}{'=' + value if value else ''} within {timeout_s} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


# ----- the protocol -----------------------------------------------------------------------------


def test_notifier_speaks_the_protocol_to_a_socket_path(tmp_path):
    fake = FakeNotifySocket(tmp_path)
    n = Notifier.from_environment({"NOTIFY_SOCKET": fake.address})
    try:
        assert n.enabled
        assert n.ready("serving on port 50051")
        assert fake.receive() == {"READY": "1", "STATUS": "serving on port 50051"}
        n.status("RUNNING: case OR3-1, 25.0 fps")
        assert fake.receive() == {"STATUS": "RUNNING: case OR3-1, 25.0 fps"}
        n.watchdog()
        assert fake.receive() == {"WATCHDOG": "1"}
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        n.reloading()
        m = fake.receive()
        assert m is not None and m["RELOADING"] == "1" and int(m["MONOTONIC_USEC"]) >= before
        n.stopping("shutting down")
        assert fake.receive() == {"STOPPING": "1", "STATUS": "shutting down"}
        with pytest.raises(ValueError, match="one KEY=VALUE per line"):
            n.send("STATUS=two\nlines")
    finally:
        n.close()
        fake.close()


def test_notifier_reaches_an_abstract_socket():
    fake = FakeNotifySocket(abstract=f"or-agent-test-{os.getpid()}")
    n = Notifier(fake.address)
    try:
        assert n.watchdog() and fake.receive() == {"WATCHDOG": "1"}
    finally:
        n.close()
        fake.close()


def test_notifier_is_a_no_op_without_systemd(tmp_path, caplog):
    n = Notifier.from_environment({})
    assert not n.enabled and n.ready() is False and n.watchdog() is False
    gone = Notifier(str(tmp_path / "nobody-listens.sock"))  # a lost notification never stops the agent
    assert gone.watchdog() is False
    assert "sd_notify to" in caplog.text
    gone.close()


def test_watchdog_interval_comes_from_the_environment():
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}, pid=42) == 2.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "43"}, pid=42) is None  # another's


@pytest.mark.parametrize("state, failsafe, pipeline, problem", [
    ("IDLE", True, True, None),
    ("RUNNING", True, True, None),
    ("STARTING", True, True, None),
    ("SOURCE_LOST", True, True, None),  # waiting for the camera: a restart would not help
    ("FAILED", True, False, None),  # the fail-safe is ending the case
    ("STOPPING", True, True, None),
    ("STALLED", True, True, "the pipeline is stalled (no fresh result)"),
    ("RUNNING", True, False, "the pipeline's threads are gone while its case runs"),
    ("IDLE", False, True, "the fail-safe loop is not running"),
])
def test_watchdog_problem(state, failsafe, pipeline, problem):
    assert watchdog_problem(state, failsafe, pipeline) == problem


class RecordingNotifier(Notifier):
    """Keeps what would be sent, with the thread that sent it."""

    def __init__(self):
        super().__init__("@unused")
        self.sent: list[tuple[str, int, bool]] = []  # (message, thread id, whether the loop was blocked)
        self.loop_blocked = False

    def send(self, *assignments: str) -> bool:
        self.sent.append(("\n".join(assignments), threading.get_ident(), self.loop_blocked))
        return True


def test_link_pings_only_while_all_is_well_and_says_the_state():
    state = {"value": ("IDLE", "", 0.0, True, True)}
    clock = {"now": 100.0}
    n = RecordingNotifier()
    link = SystemdLink(n, lambda: state["value"], watchdog_s=2.0, status_every_s=5.0, clock=lambda: clock["now"])
    assert link.period_s() == 1.0
    link.tick()
    assert [m for m, _, _ in n.sent] == ["WATCHDOG=1", "STATUS=IDLE: no case"]
    n.sent.clear()
    link.tick()  # nothing changed and STATUS is not due: only the ping
    assert [m for m, _, _ in n.sent] == ["WATCHDOG=1"]
    n.sent.clear()
    state["value"] = ("RUNNING", "OR3-7", 24.96, True, True)
    link.tick()  # a new state is said at once
    assert [m for m, _, _ in n.sent] == ["WATCHDOG=1", "STATUS=RUNNING: case OR3-7, 25.0 fps"]
    n.sent.clear()
    state["value"] = ("STALLED", "OR3-7", 0.0, True, True)
    link.tick()
    link.tick()
    assert [m for m, _, _ in n.sent] == ["STATUS=STALLED: case OR3-7, 0.0 fps"]  # no ping while stalled
    n.sent.clear()
    state["value"] = ("RUNNING", "OR3-7", 12.0, True, True)
    link.tick()
    clock["now"] += 5.0
    link.tick()  # the rate is refreshed when due
    assert [m for m, _, _ in n.sent] == ["WATCHDOG=1", "STATUS=RUNNING: case OR3-7, 12.0 fps",
                                         "WATCHDOG=1", "STATUS=RUNNING: case OR3-7, 12.0 fps"]
    assert status_line("IDLE", "", 0.0) == "IDLE: no case"


def test_no_watchdog_ping_while_the_event_loop_is_blocked():
    """The pings come from the event loop: while a callback blocks it, none is sent by anyone."""
    n = RecordingNotifier()

    async def scenario():
        link = SystemdLink(n, lambda: ("IDLE", "", 0.0, True, True), watchdog_s=0.02)
        link.start()
        await eventually(lambda: _pings(n) >= 3, 30, "pings before the block")
        n.loop_blocked = True
        time.sleep(0.5)  # a stuck callback: the loop runs nothing else meanwhile
        n.loop_blocked = False
        after = _pings(n)
        await eventually(lambda: _pings(n) > after, 30, "pings after the block")
        await link.stop()
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    pings = [(thread, blocked) for m, thread, blocked in n.sent if m == "WATCHDOG=1"]
    assert pings and all(thread == loop_thread for thread, _ in pings)
    assert not any(blocked for _, blocked in pings)


def _pings(n: RecordingNotifier) -> int:
    return sum(1 for m, _, _ in n.sent if m == "WATCHDOG=1")


# ----- health names ----------------------------------------------------------------------------


@pytest.fixture
def video(small_dataset) -> str:
    return str(small_dataset / "video01.mp4")


def test_liveness_and_readiness(video):
    async def scenario():
        agent = Agent()
        async with agent, channel(agent.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)

            async def check(name: str) -> int:
                return (await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)).status

            assert LIVENESS == "oragent.v1.OrAgent/liveness" and READINESS == "oragent.v1.OrAgent/readiness"
            # no case: the process is up, the AI is not producing anything
            assert [await check(n) for n in (LIVENESS, READINESS, "", "oragent.v1.OrAgent")] == [
                SERVING, NOT_SERVING, NOT_SERVING, NOT_SERVING]
            await start_case(pbg.OrAgentStub(ch), video)
            await eventually(lambda: _is(check(READINESS), SERVING), 30, "readiness SERVING once results flow")
            assert await check(LIVENESS) == SERVING
        # once stopped, neither says SERVING (asked of the health servicer: the port is closed)
        for name in (LIVENESS, READINESS):
            reply = await agent.server.health.Check(health_pb2.HealthCheckRequest(service=name), None)
            assert reply.status == NOT_SERVING

    asyncio.run(scenario())


async def _is(coro, wanted) -> bool:
    return await coro == wanted


# ----- reload ----------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_reload_plan_sorts_the_changed_keys(tmp_path):
    running = load_config(_write(tmp_path / "a.toml", '[server]\nlisten = "127.0.0.1:50051"\n'))
    loaded = load_config(_write(tmp_path / "b.toml", (
        '[server]\nlisten = "127.0.0.1:50052"\nreserved_displays = ["or3-main"]\n'
        '[alerts]\nreannounce_s = 10.0\n[pipeline]\nanatomy_every = 3\nbackend = "onnxruntime"\n'
        '[case]\nallowed_sources = ["/srv/cases"]\n[logging]\nlevel = "debug"\n')))
    plan = plan_reload(running, loaded)
    assert plan.applied == ("case.allowed_sources", "logging.level", "server.reserved_displays")
    assert plan.next_case == ("alerts.reannounce_s", "pipeline.anatomy_every")
    assert plan.restart == ("pipeline.backend", "server.listen")
    c = plan.config
    assert c.server.listen == "127.0.0.1:50051" and c.pipeline.backend == "auto"  # kept until a restart
    assert c.server.reserved_displays == ("or3-main",) and c.case.allowed_sources == ("/srv/cases",)
    assert c.alerts.reannounce_s == 10.0 and c.pipeline.runtime.anatomy_every == 3
    assert not plan_reload(running, running).changed


def test_reload_refuses_a_mix_the_running_agent_cannot_take(tmp_path, monkeypatch):
    # roles need mutual TLS; TLS itself needs a restart, so the roles cannot be taken on their own
    monkeypatch.chdir(tmp_path)
    from or_agent.agent.certs import make_certificates

    made = make_certificates(tmp_path / "pki", "box", ["or3-main"])
    running = load_config(None)
    loaded = load_config(_write(tmp_path / "tls.toml", (
        f'[server]\ntls_cert = "{made.server_cert}"\ntls_key = "{made.server_key}"\ntls_ca = "{made.ca_cert}"\n'
        'may_acknowledge = ["or3-main"]\n')))
    with pytest.raises(InputError, match=r"^server\.may_acknowledge: roles need mutual TLS .* \(with server\.tls_ca, "
                                         r"server\.tls_cert, server\.tls_key kept as running until a restart\)$"):
        plan_reload(running, loaded)


def test_reload_in_process_applies_what_it_can_and_a_bad_file_changes_nothing(tmp_path):
    async def scenario():
        agent = Agent()
        async with agent:
            server = agent.server
            cfg = server.config
            handlers, rules = server.handlers, server.service.rules
            plan = server.reload(cfg.with_overrides(**{"server.reserved_displays": ["or3-main"],
                                                       "case.allowed_sources": [str(tmp_path)],
                                                       "alerts.reannounce_s": 5.0, "server.max_subscribers": 4}))
            assert plan.applied == ("case.allowed_sources", "server.max_subscribers", "server.reserved_displays")
            assert server.service.config is server.config and server.config.server.reserved_displays == ("or3-main",)
            assert handlers.sources.admit(str(tmp_path / "x.mp4")) == str((tmp_path / "x.mp4").resolve())
            assert server.service.rules is not rules and handlers.access is server.access
            # a rules file that does not load: nothing is swapped in
            before = (server.config, handlers.access, handlers.sources, server.service.rules)
            with pytest.raises(InputError, match="no-such-rules.toml"):
                server.reload(server.config.with_overrides(**{"alerts.rules_file": str(tmp_path / "no-such-rules.toml")}))
            assert (server.config, handlers.access, handlers.sources, server.service.rules) == before
        return agent.audit_dir

    audit_dir = asyncio.run(scenario())
    reloads = [r["data"] for r in _audit_records(audit_dir) if r["kind"] == "config_reload"]
    assert len(reloads) == 1 and reloads[0]["applied"] == ["case.allowed_sources", "server.max_subscribers",
                                                           "server.reserved_displays"]
    assert reloads[0]["next_case"] == ["alerts.reannounce_s"] and reloads[0]["restart_needed"] == []


def _audit_records(audit_dir: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(audit_dir.glob("audit-*.jsonl")) for line in f.read_text().splitlines()]


# ----- serve under a fake systemd ----------------------------------------------------------------


class ServeProcess:
    """``or-agent serve --config FILE`` in a subprocess with a fake notify socket and a 1 s watchdog."""

    def __init__(self, config: Path, notify: FakeNotifySocket, cwd: Path):
        env = {**os.environ, "NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000", "PYTHONUNBUFFERED": "1"}
        env.pop("WATCHDOG_PID", None)
        self.log = cwd / "serve.log"
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "or_agent.agent.cli", "serve", "--config", str(config)],
                                     cwd=cwd, env=env,
                                     stdout=self._log_file, stderr=subprocess.STDOUT)

    def port(self) -> int:
        for line in self.log.read_text().splitlines():
            if line.startswith("or-agent serving on "):
                return int(line.rsplit(":", 1)[1])
        raise AssertionError(f"serve did not say its port:\n{self.log.read_text()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log_file.close()

    def wait_log(self, text: str, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if text in line:
                    return line
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not logged within {timeout_s} s:\n{self.log.read_text()}")


def test_serve_under_systemd_ready_watchdog_reload_and_stop(tmp_path, video):
    """READY once serving, watchdog pings, STATUS with the case; SIGHUP with a valid file applies it (a
    source becomes allowed), with a bad one keeps the running configuration and says why in one line;
    SIGTERM says STOPPING and the audit trail closes the case and records both reloads."""
    notify = FakeNotifySocket(tmp_path)
    audit = tmp_path / "audit"
    base = f'[server]\nlisten = "127.0.0.1:0"\n[audit]\ndirectory = "{audit}"\n'
    config = _write(tmp_path / "agent.toml", base)
    serve = ServeProcess(config, notify, tmp_path)
    try:
        ready = notify.wait_for("READY", "1", timeout_s=180)
        assert ready["STATUS"].startswith("serving on port ")
        port = serve.port()
        assert ready["STATUS"] == f"serving on port {port}"
        notify.wait_for("WATCHDOG", "1")
        assert notify.wait_for("STATUS")["STATUS"] == "IDLE: no case"

        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub, health = pbg.OrAgentStub(ch), health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(service=LIVENESS), timeout=10).status == SERVING
            with pytest.raises(grpc.RpcError) as refused:
                stub.StartCase(pb.StartCaseRequest(source=video, case_id="OR3-reload", paced=True), timeout=30)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

            # a valid change: the video's folder becomes allowed at once; the listen address needs a restart
            _write(config, base.replace("127.0.0.1:0", "127.0.0.1:1") + f'[case]\nallowed_sources = ["{Path(video).parent}"]\n')
            serve.signal(signal.SIGHUP)
            reloading = notify.wait_for("RELOADING", "1")
            assert int(reloading["MONOTONIC_USEC"]) > 0
            assert notify.wait_for("READY", "1")["STATUS"] == "configuration reloaded; restart needed for server.listen"
            assert serve.wait_log("configuration reloaded: case.allowed_sources in force now")
            assert serve.wait_log("configuration reloaded: server.listen changed but need a restart (running values kept)")
            stub.StartCase(pb.StartCaseRequest(source=video, case_id="OR3-reload", paced=True), timeout=30)
            status = notify.wait_for("STATUS", timeout_s=60)
            while not status["STATUS"].startswith("RUNNING: case OR3-reload, "):
                status = notify.wait_for("STATUS", timeout_s=60)
            deadline = time.monotonic() + 30
            while health.Check(health_pb2.HealthCheckRequest(service=READINESS), timeout=10).status != SERVING:
                assert time.monotonic() < deadline, "readiness not SERVING while the case runs"
                time.sleep(0.1)

            # a bad file: the running configuration stays, one line says why
            _write(config, base + "[alerts]\nreannounce_s = -1\n")
            serve.signal(signal.SIGHUP)
            notify.wait_for("RELOADING", "1")
            assert notify.wait_for("READY", "1")["STATUS"] == (
                f"configuration not reloaded: {config}: alerts.reannounce_s: must not be negative, got -1.0")
            line = serve.wait_log("configuration not reloaded")
            assert line.endswith(f"ERROR or-agent.server: configuration not reloaded, the running one stays in force: "
                                 f"{config}: alerts.reannounce_s: must not be negative, got -1.0")
            assert stub.GetStatus(pb.StatusRequest(), timeout=10).state == pb.Status.RUNNING  # serving on
            notify.wait_for("WATCHDOG", "1")
        assert serve.stop() == 0
        assert notify.wait_for("STOPPING", "1")["STATUS"] == "shutting down"
    finally:
        serve.stop()
        notify.close()
    records = _audit_records(audit)
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "config" and kinds[-1] == "session_stop"
    assert kinds.index("config_reload") < kinds.index("session_start") < kinds.index("config_reload_refused")
    reload = next(r["data"] for r in records if r["kind"] == "config_reload")
    assert reload["applied"] == ["case.allowed_sources"] and reload["restart_needed"] == ["server.listen"]
    refused = next(r["data"] for r in records if r["kind"] == "config_reload_refused")
    assert refused["reason"] == f"{config}: alerts.reannounce_s: must not be negative, got -1.0"
    from or_agent.agent.audit.verify import verify

    assert verify([audit]).ok


# ----- or-agent config check --------------------------------------------------------------------


def test_config_check_ok(tmp_path):
    config = _write(tmp_path / "agent.toml", f'[server]\nlisten = "127.0.0.1:50051"\n[audit]\ndirectory = "{tmp_path / "a"}"\n')
    proc = run_cli("config", "check", str(config))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"{config}: OK",
        "  listen 127.0.0.1:50051, plaintext on loopback",
        proc.stdout.splitlines()[2],  # the installed model set's name and version
        "  rules: 7 from rules_cholecystectomy.toml, and 6 system rules",
        f"  audit trail in {tmp_path / 'a'} (made at start)",
        "  no case at launch",
    ]
    assert proc.stdout.splitlines()[2].startswith("  models: set ") and proc.stdout.splitlines()[2].endswith(
        " models, backend auto")


def test_config_check_with_mutual_tls(tmp_path):
    from or_agent.agent.certs import make_certificates

    made = make_certificates(tmp_path / "pki", "box", ["or3-main"])
    tls = f'tls_cert = "{made.server_cert}"\ntls_key = "{made.server_key}"\ntls_ca = "{made.ca_cert}"\n'
    config = _write(tmp_path / "agent.toml", f'[server]\nlisten = "0.0.0.0:50051"\n{tls}[audit]\ndirectory = ""\n')
    proc = run_cli("config", "check", str(config))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == "  listen 0.0.0.0:50051, mutual TLS"
    made.server_key.chmod(0o644)  # as serve would, a key others can read is refused
    proc = run_cli("config", "check", str(config))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"or-agent: error: {made.server_key}: the private key is readable or writable by other users "
                           f"(mode 644); chmod 600 {made.server_key}\n")


@pytest.mark.parametrize("text, message", [
    ("[server]\nlisten = 50051\n", "server.listen: must be str, got 50051"),
    ("[server]\nlisen = \"127.0.0.1:1\"\n", "server.lisen: unknown key"),
    ("[alerts]\nrules_file = \"/nonexistent/rules.toml\"\n", "/nonexistent/rules.toml"),
    ("[case]\nsource = \"/nonexistent/video.mp4\"\n", "case.source: /nonexistent/video.mp4: no such file or device"),
    ("[audit]\ndirectory = \"TMP/agent.toml/audit\"\n", "audit.directory: TMP/agent.toml is not a directory"),
])
def test_config_check_names_the_problem(tmp_path, text, message):
    config = _write(tmp_path / "agent.toml", text.replace("TMP", str(tmp_path)))
    message = message.replace("TMP", str(tmp_path))
    proc = run_cli("config", "check", str(config))
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.startswith("or-agent: error: ") and message in proc.stderr and proc.stderr.count("\n") == 1


# ----- the unit file ---------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read(UNIT)
    return unit


def test_unit_file_has_the_essential_settings():
    s = _unit()["Service"]
    expected = {"Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30s", "Restart": "on-failure",
                "User": "or-agent", "StateDirectory": "or-agent", "ConfigurationDirectory": "or-agent",
                "WorkingDirectory": "/var/lib/or-agent", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                "ProtectHome": "yes", "PrivateTmp": "yes", "DevicePolicy": "closed",
                "ExecReload": "/bin/kill -HUP $MAINPID"}
    assert {k: s.get(k) for k in expected} == expected
    assert s["ExecStart"].endswith("or-agent serve --config /etc/or-agent/agent.toml")
    assert "PrivateDevices" not in s  # it would hide the capture cards and the GPU
    devices = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith("DeviceAllow=")]
    assert "char-video4linux rw" in devices and "char-nvidia-frontend rw" in devices
    assert _unit()["Install"]["WantedBy"] == "multi-user.target"


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    # verify checks that ExecStart's program exists: point it at this checkout's
    here = shutil.which("or-agent") or str(Path(sys.executable).parent / "or-agent")
    if not Path(here).exists():
        pytest.skip("no or-agent executable installed to point ExecStart at")
    unit = tmp_path / "or-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/or-agent/venv/bin/or-agent", here))
    proc = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=120)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if "or-agent.service" in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr
