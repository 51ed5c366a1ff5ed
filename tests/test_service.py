"""The agent's gRPC service end to end: a real in-process ``AgentServer`` on 127.0.0.1, real clients.

Every test runs its own server inside ``asyncio.run`` and stops it before returning; the clients
are the generated stubs (``grpc.aio``), the reference display, and ``buf curl`` as an independent
gRPC implementation over mutual TLS. Nothing here depends on what the models recognise: the
alerts are raised through the service's own ``AlertLog``, and the overlays are only counted and
timed. No test listens beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from or_agent.agent.alert_log import AlertLog
from or_agent.agent.certs import channel_credentials, make_certificates
from or_agent.agent.config import load_config
from or_agent.agent.display import Display, ai_off_reason
from or_agent.agent.server import AgentServer
from or_agent.agent.session import LoadedModels
from or_agent.pipelines.errors import InputError, OrAgentError
from or_agent.pipelines.manifest import Task
from or_agent.proto.oragent.v1 import agent_pb2 as pb
from or_agent.proto.oragent.v1 import agent_pb2_grpc as pbg
from tests.conftest import ROOT, first_frames_video

SERVICE = "oragent.v1.OrAgent"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BUF_VERSION = "1.75.0"
BUF_PREFIX = ROOT / ".cache" / "buf"


# ----- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def video(small_dataset) -> str:
    return str(small_dataset / "video01.mp4")


# a paced source far below any machine's pipeline rate, so that a test of who keeps up with whom does not
# depend on how fast or how loaded the machine running it is
SLOW_SOURCE_FPS = 5.0


@pytest.fixture(scope="module")
def slow_video(small_dataset, tmp_path_factory) -> str:
    """The surgery's first 200 frames re-encoded at 5 frames per second (40 s of media)."""
    return str(first_frames_video(small_dataset / "video01.mp4", tmp_path_factory.mktemp("slow-source") / "video01-5fps.mp4",
                                  200, SLOW_SOURCE_FPS))


@pytest.fixture(autouse=True)
def no_thread_leak():
    """Every server, pipeline, JPEG worker and executor thread a test started is gone when it ends
    (gRPC's own process-wide poller thread is not the test's)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        extra = [t for t in threading.enumerate()
                 if t not in before and t.is_alive() and "_poll_wrapper" not in t.name]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not extra, f"threads left running: {[t.name for t in extra]}"


def load_models() -> LoadedModels:
    """The bundled models; they may be swapped by a retraining while we load, so try again briefly."""
    for attempt in range(10):
        try:
            return LoadedModels()
        except OrAgentError:
            if attempt == 9:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


# where the tests' videos are (pytest's temporary directory): the agents' [case] allowed_sources
CASE_AREA: list[str] = []


@pytest.fixture(autouse=True, scope="session")
def case_area(tmp_path_factory):
    CASE_AREA[:] = [str(tmp_path_factory.getbasetemp())]


class Agent:
    """An ``AgentServer`` on 127.0.0.1:0 for one scenario; ``stop`` runs once, whoever calls it. StartCase
    may open what lies in pytest's temporary directory (the tests' videos), unless overridden."""

    def __init__(self, **overrides):
        audit = tempfile.mkdtemp(prefix="or-agent-audit-")  # never the working directory's audit/
        cfg = load_config(None).with_overrides(**{"server.listen": "127.0.0.1:0", "audit.directory": audit,
                                                  "case.allowed_sources": list(CASE_AREA), **overrides})
        self.audit_dir = Path(audit)
        self.server = AgentServer(cfg, load_models())
        self._stopped = False

    async def __aenter__(self) -> Agent:
        await self.server.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            await self.server.stop()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def alerts(self) -> AlertLog:
        return self.server.service.alerts


def channel(target: str, creds: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    # A channel-local subchannel pool: each client has its own connection (and flow-control window).
    opts = [("grpc.use_local_subchannel_pool", 1)]
    if creds is not None:
        return grpc.aio.secure_channel(target, creds, options=opts)
    return grpc.aio.insecure_channel(target, options=opts)


async def eventually(predicate, timeout_s: float, what: str):
    """Poll ``predicate`` (sync or async) until it is truthy; fail naming ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


async def rpc_error(awaitable, timeout_s: float = 10.0) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(awaitable, timeout_s)
    return e.value


async def read_n(call, n: int, timeout_s: float = 10.0) -> list:
    out = []
    for _ in range(n):
        msg = await asyncio.wait_for(call.read(), timeout_s)
        assert msg is not grpc.aio.EOF, f"stream ended after {len(out)} of {n} messages"
        out.append(msg)
    return out


async def start_case(stub: pbg.OrAgentStub, video: str, case_id: str = "OR1-test-01") -> pb.CaseInfo:
    return await stub.StartCase(pb.StartCaseRequest(source=video, case_id=case_id, paced=True), timeout=30)


# ----- 1. health ------------------------------------------------------------------------------


def test_health_follows_fresh_results(video):
    async def scenario():
        async with Agent() as agent, channel(agent.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = pbg.OrAgentStub(ch)

            async def states():
                return [(await health.Check(health_pb2.HealthCheckRequest(service=s), timeout=5)).status
                        for s in ("", SERVICE)]

            assert await states() == [NOT_SERVING, NOT_SERVING]  # no case: no AI
            assert (await stub.GetStatus(pb.StatusRequest())).state == pb.Status.IDLE
            e = await rpc_error(health.Check(health_pb2.HealthCheckRequest(service="no.such.Service")))
            assert e.code() == grpc.StatusCode.NOT_FOUND

            info = await start_case(stub, video)
            assert info.case_id == "OR1-test-01" and info.started_unix_ms > 0 and info.stopped_unix_ms == 0
            await eventually(lambda: _all(states(), SERVING), 15, "health SERVING once results flow")
            st = await stub.GetStatus(pb.StatusRequest())
            assert st.state == pb.Status.RUNNING and st.frames_processed > 0 and st.case_id == "OR1-test-01"
            # the source by its name only: a full path can carry a patient's name (issue 13 item 8)
            assert st.source == info.source == "video01.mp4" and len(st.models) == 3 and st.capture_to_publish.count > 0
            assert st.preprocessing == "cpu: the models run on ONNX Runtime (CPU), so their inputs are made there"

            info = await stub.StopCase(pb.StopCaseRequest(reason="end of test"))
            assert info.stopped_unix_ms >= info.started_unix_ms > 0 and info.state == pb.Status.IDLE
            await eventually(lambda: _all(states(), NOT_SERVING), 2, "health NOT_SERVING after StopCase")
            st = await stub.GetStatus(pb.StatusRequest())
            assert st.state == pb.Status.IDLE
            # The rate is the recent one: it falls to zero once no result comes.
            await eventually(lambda: _fps_zero(stub), 4, "frames_per_second 0 after the case stopped")
            e = await rpc_error(stub.StopCase(pb.StopCaseRequest()))
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION

    asyncio.run(scenario())


async def _all(states_coro, wanted) -> bool:
    return all(s == wanted for s in await states_coro)


async def _fps_zero(stub) -> bool:
    return (await stub.GetStatus(pb.StatusRequest())).frames_per_second == 0.0


# ----- 2. reflection --------------------------------------------------------------------------


def test_reflection_lists_the_services_and_describes_the_contract():
    async def scenario():
        async with Agent() as agent, channel(agent.target) as ch:
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            names = set()
            async for resp in refl.ServerReflectionInfo([reflection_pb2.ServerReflectionRequest(list_services="")]):
                names |= {s.name for s in resp.list_services_response.service}
            assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names

            req = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)
            methods = set()
            async for resp in refl.ServerReflectionInfo([req]):
                for raw in resp.file_descriptor_response.file_descriptor_proto:
                    fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                    for svc in fd.service:
                        if f"{fd.package}.{svc.name}" == SERVICE:
                            methods |= {m.name for m in svc.method}
            assert methods == {"StreamOverlays", "StreamAlerts", "GetStatus", "StartCase", "StopCase", "AcknowledgeAlert",
                           "ReportProgress"}

    asyncio.run(scenario())


# ----- 3. buf curl over mutual TLS ------------------------------------------------------------


@pytest.fixture(scope="session")
def buf() -> Path:
    """buf's own gRPC client (Go), installed once into .cache/buf with npm."""
    exe = BUF_PREFIX / "node_modules" / ".bin" / "buf"
    if not exe.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not on PATH: cannot install buf for the buf curl tests")
        try:
            proc = subprocess.run([npm, "install", "--no-save", "--prefix", str(BUF_PREFIX), f"@bufbuild/buf@{BUF_VERSION}"],
                                  capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"npm install @bufbuild/buf@{BUF_VERSION} failed: {exc}")
        if proc.returncode != 0 or not exe.exists():
            pytest.skip(f"npm install @bufbuild/buf@{BUF_VERSION} failed ({proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    return exe


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    base = tmp_path_factory.mktemp("pki")
    return (make_certificates(base / "box", box="or-box", displays=["disp1"]),
            make_certificates(base / "other", box="other-box", displays=["disp1"]))


def test_buf_curl_over_mutual_tls(buf, pki, tmp_path):
    box, other = pki
    crt, key = box.clients["disp1"]
    overrides = {"server.tls_cert": str(box.server_cert), "server.tls_key": str(box.server_key),
                 "server.tls_ca": str(box.ca_cert)}

    async def curl(url: str, *args: str, cert: bool = True) -> subprocess.CompletedProcess:
        tls = ["--cacert", str(box.ca_cert)] + (["--cert", str(crt), "--key", str(key)] if cert else [])
        cmd = [str(buf), "curl", "--protocol", "grpc", *tls, "--connect-timeout", "10", *args, url]
        env = {**os.environ, "BUF_CACHE_DIR": str(tmp_path / "buf-cache"), "NO_COLOR": "1"}
        return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60, env=env)

    async def scenario():
        async with Agent(**overrides) as agent:
            base = f"https://127.0.0.1:{agent.server.port}"
            # (a) the services, by reflection
            proc = await curl(base, "--list-services")
            assert proc.returncode == 0, proc.stderr
            services = set(proc.stdout.split())
            assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
            proc = await curl(base, "--list-methods")
            assert proc.returncode == 0, proc.stderr
            assert f"{SERVICE}/StreamOverlays" in proc.stdout.split() and f"{SERVICE}/AcknowledgeAlert" in proc.stdout.split()
            # (b) health: no case, so not serving
            proc = await curl(f"{base}/grpc.health.v1.Health/Check", "--data", "{}")
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout) == {"status": "NOT_SERVING"}
            # (c) the agent's status, as JSON
            proc = await curl(f"{base}/{SERVICE}/GetStatus", "--data", "{}", "--emit-defaults")
            assert proc.returncode == 0, proc.stderr
            status = json.loads(proc.stdout)
            assert status["state"] == "IDLE" and status["agentVersion"] and float(status["uptimeS"]) > 0
            assert sorted(m["task"] for m in status["models"]) == ["phase", "segmentation", "visibility"]
            assert all(len(m["sha256"]) == 64 for m in status["models"])

            # Refused: buf without a client certificate, python with none, python with another CA's.
            proc = await curl(f"{base}/{SERVICE}/GetStatus", "--data", "{}", cert=False)
            assert proc.returncode != 0 and not proc.stdout.strip()
            other_crt, other_key = other.clients["disp1"]
            for creds in (channel_credentials(box.ca_cert), channel_credentials(box.ca_cert, other_crt, other_key)):
                async with channel(agent.target, creds) as ch:
                    e = await rpc_error(pbg.OrAgentStub(ch).GetStatus(pb.StatusRequest(), timeout=10), 15)
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
            # ... while the box's own display is served (python's TLS stack too).
            async with channel(agent.target, channel_credentials(box.ca_cert, crt, key)) as ch:
                assert (await pbg.OrAgentStub(ch).GetStatus(pb.StatusRequest(), timeout=10)).state == pb.Status.IDLE

    asyncio.run(scenario())


# ----- 4. a slow display --------------------------------------------------------------------------


def test_slow_subscriber_is_ended_and_affects_neither_pipeline_nor_fast_subscriber(slow_video):
    video = slow_video

    async def scenario():
        async with Agent(**{"server.behind_limit_s": 2.0, "server.subscriber_queue": 4}) as agent, \
                channel(agent.target) as ch_a, channel(agent.target) as ch_b, channel(agent.target) as ch_c:
            stub = pbg.OrAgentStub(ch_a)
            await start_case(stub, video)
            fast = stub.StreamOverlays(pb.SubscribeRequest(client_id="fast-display"))
            # B asks for big messages (composited JPEG), so its flow-control window fills in seconds.
            slow = pbg.OrAgentStub(ch_b).StreamOverlays(
                pb.SubscribeRequest(client_id="slow-display", include_jpeg=True, jpeg_quality=95))
            # C never reads at all: once its window is full the server's write to it never completes.
            stuck = pbg.OrAgentStub(ch_c).StreamOverlays(
                pb.SubscribeRequest(client_id="stuck-display", include_jpeg=True, jpeg_quality=95))
            drain = asyncio.Event()
            slow_read = [0]

            async def slow_reader():
                try:
                    while True:
                        msg = await slow.read()
                        if msg is grpc.aio.EOF:
                            return slow_read[0], None
                        slow_read[0] += 1
                        assert msg.composited_jpeg[:2] == b"\xff\xd8"
                        if not drain.is_set():
                            with contextlib.suppress(asyncio.TimeoutError):
                                await asyncio.wait_for(drain.wait(), 1.0)  # one overlay a second
                except grpc.aio.AioRpcError as exc:
                    return slow_read[0], exc

            fast_log = []  # (arrival, frame sequence) of every overlay the fast display got

            async def fast_reader():
                while (msg := await fast.read()) is not grpc.aio.EOF:
                    fast_log.append((time.monotonic(), msg.sequence))

            def fast_window(t_from: float, t_to: float) -> list[int]:
                return [seq for t, seq in fast_log if t_from <= t < t_to]

            slow_task = asyncio.create_task(slow_reader())
            fast_task = asyncio.create_task(fast_reader())
            slow_t0 = time.monotonic()
            await eventually(lambda: fast_log, 15, "the first overlay")
            statuses = []

            async def sample_status():
                while True:
                    await asyncio.sleep(1.0)
                    statuses.append(await stub.GetStatus(pb.StatusRequest()))

            sampler = asyncio.create_task(sample_status())
            t0 = time.monotonic()
            await asyncio.sleep(6.0)
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            seqs = fast_window(t0, t0 + 6.0)
            # It kept up: it saw (nearly) every frame the pipeline published in the window, in order ...
            assert len(seqs) >= 0.5 * 6.0 * SLOW_SOURCE_FPS, f"fast subscriber got {len(seqs)} overlays in 6 s"
            assert seqs == sorted(seqs) and len(seqs) >= 0.9 * (seqs[-1] - seqs[0] + 1)
            # ... and the pipeline kept the source's pace beside the slow displays
            assert len(statuses) >= 4 and all(s.frames_per_second >= 0.6 * SLOW_SOURCE_FPS for s in statuses[1:]), \
                [round(s.frames_per_second, 1) for s in statuses]

            # The server ends the slow display by itself, while it still reads one overlay a second,
            # and the stuck one, whose transport will take nothing more.
            def subscribed(client_id: str) -> bool:
                return any(s.client_id == client_id for s in agent.server.service.fanout.subscribers)

            await eventually(lambda: not subscribed("slow-display") and not subscribed("stuck-display"),
                             20, "the server to end the slow and the stuck displays' streams")
            assert not slow_task.done()
            read_slowly = slow_read[0]
            assert read_slowly <= time.monotonic() - slow_t0 + 2  # it really read one a second
            drain.set()  # now read what its transport still holds: the status comes after it
            slow_n, err = await asyncio.wait_for(slow_task, 30)
            assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert "fell behind" in err.details() and "overlays dropped" in err.details()
            assert slow_n >= read_slowly

            # The fast display is still served at the full rate after the slow ones were ended.
            t1 = time.monotonic()
            await asyncio.sleep(2.0)
            after = fast_window(t1, t1 + 2.0)
            assert len(after) >= 0.5 * 2.0 * SLOW_SOURCE_FPS and len(after) >= 0.9 * (after[-1] - after[0] + 1)
            assert (await stub.GetStatus(pb.StatusRequest())).subscribers == 1
            assert not fast_task.done()
            fast.cancel()
            stuck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fast_task

    asyncio.run(scenario())


# ----- 5. alerts across reconnects -----------------------------------------------------------------


def test_alert_stream_resumes_after_the_last_sequence_seen():
    async def scenario():
        async with Agent() as agent, channel(agent.target) as ch:
            stub = pbg.OrAgentStub(ch)
            for i in range(5):
                agent.alerts.raise_alert(f"rule{i}", "warning", f"alert {i}", {"i": i})
            call = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1"))
            seen = await read_n(call, 2)
            call.cancel()  # the display goes away
            await eventually(lambda: call.done(), 5, "the first stream to end")

            agent.alerts.clear("rule0", "gone")
            agent.alerts.raise_alert("rule1", "critical", "alert 1, worse")  # an update
            for i in range(5, 8):
                agent.alerts.raise_alert(f"rule{i}", "info", f"alert {i}")
            assert agent.alerts.last_sequence == 10

            call = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1", after_sequence=seen[-1].sequence))
            seen += await read_n(call, 8)
            # Nothing more, nothing twice...
            pending = asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait({pending}, timeout=0.5)
            assert not done, f"an extra event: {pending.result()}"
            # ... and new events arrive live on the resumed stream.
            agent.alerts.clear("rule7")
            seen.append(await asyncio.wait_for(pending, 5))
            call.cancel()

            recorded, _ = agent.alerts.since(0)
            assert [e.sequence for e in seen] == list(range(1, 12))
            assert [(e.alert_id, e.kind) for e in seen] == [
                (r.alert_id, {"raised": pb.AlertEvent.RAISED, "updated": pb.AlertEvent.UPDATED,
                              "cleared": pb.AlertEvent.CLEARED}[r.kind]) for r in recorded]
            assert seen[0].evidence == {"i": "0"} and seen[0].severity == pb.WARNING
            assert seen[6].kind == pb.AlertEvent.UPDATED and seen[6].severity == pb.CRITICAL

            # A cursor beyond the newest event (the agent restarted): told so, not left waiting.
            e = await rpc_error(stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1", after_sequence=999)).read())
            assert e.code() == grpc.StatusCode.OUT_OF_RANGE

    asyncio.run(scenario())


def test_resuming_against_another_agent_instance_is_told_and_loses_nothing():
    """The new agent already numbered past the display's cursor: without the instance in the contract
    the display would silently skip the new agent's events up to its old cursor."""
    async def scenario():
        async with Agent() as agent, channel(agent.target) as ch:
            stub = pbg.OrAgentStub(ch)
            recs = [agent.alerts.raise_alert(f"r{i}", "warning", f"alert {i}") for i in range(5)]
            call = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1", after_sequence=3,
                                                              agent_instance="a-previous-agent"))
            events = await read_n(call, 6)
            assert events[0].kind == pb.AlertEvent.INSTANCE_CHANGED
            assert events[0].message == (f"this is agent instance {agent.alerts.instance}, not a-previous-agent: its alert "
                                         "numbering is its own; its history follows from the start")
            assert [e.alert_id for e in events[1:]] == [r.alert_id for r in recs]
            assert {e.agent_instance for e in events} == {agent.alerts.instance}
            call.cancel()
            # the same instance resumes where it was, with no notice
            same = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1", after_sequence=3,
                                                              agent_instance=agent.alerts.instance))
            assert [e.sequence for e in await read_n(same, 2)] == [4, 5]
            same.cancel()

    asyncio.run(scenario())


def test_alert_gap_older_than_the_history_is_reported():
    async def scenario():
        async with Agent(**{"server.alert_history": 3}) as agent, channel(agent.target) as ch:
            stub = pbg.OrAgentStub(ch)
            for i in range(6):
                agent.alerts.raise_alert(f"rule{i}", "warning", f"alert {i}")  # 1..6; the history keeps 4..6
            call = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1", after_sequence=1))
            events = await read_n(call, 4)
            call.cancel()
            assert events[0].kind == pb.AlertEvent.HISTORY_TRUNCATED and "4" in events[0].message
            assert [e.sequence for e in events[1:]] == [4, 5, 6]

            # A display that saw up to 3 misses nothing: no truncation notice.
            call = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1", after_sequence=3))
            events = await read_n(call, 3)
            call.cancel()
            assert [(e.kind, e.sequence) for e in events] == [(pb.AlertEvent.RAISED, s) for s in (4, 5, 6)]

    asyncio.run(scenario())


def test_alert_numbering_follows_the_order_of_changes_under_concurrency():
    """Raise and clear the same rule from several threads: the numbered events must tell a
    consistent story (raised, updates, cleared, raised...), and end in the state the log is in."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for _ in range(8):
            log = AlertLog(history=100_000)

            def work(raising: bool, log=log):
                for _ in range(1500):
                    if raising:
                        log.raise_alert("r", "warning", "x")
                    else:
                        log.clear("r")

            threads = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            events, _ = log.since(0)
            assert [e.sequence for e in events] == list(range(1, len(events) + 1))
            active = False
            for e in events:
                assert (e.kind == "raised") == (not active), f"{e.kind} #{e.sequence} while active={active}"
                active = e.kind != "cleared"
            assert active == bool(log.active())
    finally:
        sys.setswitchinterval(old)
    log = AlertLog()
    with pytest.raises(ValueError, match="severity"):
        log.raise_alert("r", "catastrophic", "x")
    assert not log.active() and log.last_sequence == 0  # refused whole: nothing half-recorded


class CuttableProxy:
    """A TCP relay on 127.0.0.1 between a display and the agent. ``cut`` resets every connection
    and refuses new ones (a pulled cable, as far as the display can tell); ``restore`` lets them in."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.up = True
        self.accepted = 0
        self._pairs: set = set()
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._pairs.discard(pair)

    @staticmethod
    async def _pipe(reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> None:
        self.up = False
        for pair in list(self._pairs):
            for w in pair:
                w.transport.abort()

    def restore(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.cut()
        self._server.close()
        await self._server.wait_closed()


def test_reference_display_loses_no_alert_across_a_dropped_connection(tmp_path):
    """The display's own resume logic: its connection to the agent is cut while alerts are raised;
    when it comes back it must have every event exactly once, in order."""
    async def scenario():
        async with Agent() as agent:
            proxy = await CuttableProxy(agent.server.port).start()
            display = Display(f"127.0.0.1:{proxy.port}", client_id="disp1", headless=str(tmp_path / "d.mp4"),
                              backoff_max_s=0.5)
            run = asyncio.create_task(display.run())
            try:
                for i in range(3):
                    agent.alerts.raise_alert(f"rule{i}", "warning", f"alert {i}")
                await eventually(lambda: display.state.last_alert_seq == 3, 10, "the display to see alerts 1-3")
                accepted = proxy.accepted

                proxy.cut()
                await asyncio.sleep(0.5)
                agent.alerts.clear("rule0")
                for i in range(3, 7):
                    agent.alerts.raise_alert(f"rule{i}", "critical" if i == 3 else "info", f"alert {i}")
                await asyncio.sleep(1.0)
                assert display.state.last_alert_seq == 3  # it really was cut off
                proxy.restore()

                await eventually(lambda: display.state.last_alert_seq == 8, 15, "the display to catch up to alert 8")
                agent.alerts.raise_alert("rule7", "warning", "after the reconnect")
                await eventually(lambda: display.state.last_alert_seq == 9, 5, "a live alert after the reconnect")
                assert proxy.accepted > accepted  # it did reconnect
            finally:
                display.stop()
                await asyncio.wait_for(run, 10)
                await proxy.close()
            assert [e.sequence for e in display.state.alert_log] == list(range(1, 10))
            assert all(e.kind != pb.AlertEvent.HISTORY_TRUNCATED for e in display.state.alert_log)
            # Its idea of the active alerts is the agent's.
            assert set(display.state.alerts) == {a.alert_id for a in agent.alerts.active()}
            assert display.frames_shown > 0 and (tmp_path / "d.mp4").stat().st_size > 0

    asyncio.run(scenario())


def test_reference_display_follows_an_agent_restarted_on_the_same_port(tmp_path):
    """A restarted agent numbers its alerts from 1 again: the display, whose cursor is now beyond
    the newest event, is told so (OUT_OF_RANGE) and starts over from the new agent's history."""
    async def scenario():
        first = Agent()
        await first.__aenter__()
        port = first.server.port
        display = Display(first.target, client_id="disp1", headless=str(tmp_path / "d.mp4"), backoff_max_s=0.5)
        run = asyncio.create_task(display.run())
        second = None
        try:
            for i in range(3):
                first.alerts.raise_alert(f"rule{i}", "warning", f"alert {i}")
            await eventually(lambda: display.state.last_alert_seq == 3, 10, "the display to see alerts 1-3")
            await first.stop()
            await asyncio.sleep(0.5)
            second = Agent(**{"server.listen": f"127.0.0.1:{port}"})
            await second.__aenter__()
            assert second.server.port == port
            rec = second.alerts.raise_alert("restarted", "critical", "after the restart")
            await eventually(lambda: [e.sequence for e in display.state.alert_log
                                      if e.kind != pb.AlertEvent.INSTANCE_CHANGED] == [1, 2, 3, 1], 15,
                             "the display to start over with the restarted agent's alerts")
            assert display.state.alert_log[-1].alert_id == rec.alert_id
            # Only the new agent's alert is on screen: the old agent's are gone with it.
            assert set(display.state.alerts) == {rec.alert_id}
        finally:
            display.stop()
            await asyncio.wait_for(run, 10)
            await first.stop()
            if second is not None:
                await second.stop()

    asyncio.run(scenario())


# ----- 6. malformed and oversized requests -----------------------------------------------------------


def test_bad_requests_are_refused_and_the_server_keeps_serving(video):
    async def scenario():
        async with Agent(**{"server.max_subscribers": 2}) as agent, channel(agent.target) as ch:
            stub = pbg.OrAgentStub(ch)

            async def code(awaitable) -> grpc.StatusCode:
                return (await rpc_error(awaitable)).code()

            for method in ("GetStatus", "StartCase", "AcknowledgeAlert", "ReportProgress"):
                raw = ch.unary_unary(f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None)
                e = await rpc_error(raw(b"\xff\xff\xff"))
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in e.details(), method
            raw_stream = ch.unary_stream(f"/{SERVICE}/StreamOverlays", request_serializer=None, response_deserializer=None)
            assert await code(raw_stream(b"\x0a\xff\xff").read()) == grpc.StatusCode.INVALID_ARGUMENT

            e = await rpc_error(stub.StreamOverlays(pb.SubscribeRequest(client_id="has space")).read())
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "client_id" in e.details()
            e = await rpc_error(stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="")).read())
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert await code(stub.StreamOverlays(pb.SubscribeRequest(
                client_id="disp1", include_jpeg=True, jpeg_quality=500)).read()) == grpc.StatusCode.INVALID_ARGUMENT

            e = await rpc_error(stub.StartCase(pb.StartCaseRequest(source="", case_id="c1")))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "source" in e.details()
            e = await rpc_error(stub.StartCase(pb.StartCaseRequest(source=video, case_id="OR1/2026")))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "case_id" in e.details()
            missing = str(Path(video).parent / "no-such-video.mp4")
            e = await rpc_error(stub.StartCase(pb.StartCaseRequest(source=missing, case_id="c1")))
            # inside the allowed area the problem is named, by the file's name, not its path
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("no-such-video.mp4: no such file")
            e = await rpc_error(stub.StartCase(pb.StartCaseRequest(source="x" * 100_000, case_id="c1")))
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            e = await rpc_error(stub.AcknowledgeAlert(pb.AcknowledgeRequest(alert_id="no-such-alert", client_id="disp1")))
            assert e.code() == grpc.StatusCode.NOT_FOUND
            assert await code(stub.StopCase(pb.StopCaseRequest())) == grpc.StatusCode.FAILED_PRECONDITION

            # More overlay streams than the limit.
            calls = [stub.StreamOverlays(pb.SubscribeRequest(client_id=f"disp{i}")) for i in range(2)]
            await eventually(lambda: len(agent.server.service.fanout.subscribers) == 2, 5, "two subscribers")
            e = await rpc_error(stub.StreamOverlays(pb.SubscribeRequest(client_id="disp9")).read())
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 2" in e.details()
            for c in calls:
                c.cancel()
            await eventually(lambda: not agent.server.service.fanout.subscribers, 5, "the subscribers to leave")

            # Still serving, and a good case still starts.
            st = await stub.GetStatus(pb.StatusRequest())
            assert st.state == pb.Status.IDLE and st.subscribers == 0
            info = await start_case(stub, video, "OR1-after-garbage")
            assert info.case_id == "OR1-after-garbage"
            e = await rpc_error(start_case(stub, video, "OR1-second"))
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
            await stub.StopCase(pb.StopCaseRequest())

    asyncio.run(scenario())


# ----- 7. acknowledgement --------------------------------------------------------------------------


def test_acknowledge_records_who_and_is_streamed():
    async def scenario():
        async with Agent() as agent, channel(agent.target) as ch:
            stub = pbg.OrAgentStub(ch)
            rec = agent.alerts.raise_alert("bleeding", "critical", "bleeding in the field", {"area": "0.04"})
            call = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1"))
            (raised,) = await read_n(call, 1)
            assert raised.kind == pb.AlertEvent.RAISED and raised.alert_id == rec.alert_id

            e = await rpc_error(stub.AcknowledgeAlert(pb.AcknowledgeRequest(alert_id=rec.alert_id, client_id="bad id")))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            resp = await stub.AcknowledgeAlert(pb.AcknowledgeRequest(alert_id=rec.alert_id, client_id="disp1"))
            ev = resp.event
            assert ev.kind == pb.AlertEvent.ACKNOWLEDGED and ev.acknowledged_by == "disp1"
            assert ev.alert_id == rec.alert_id and ev.severity == pb.CRITICAL and ev.sequence == raised.sequence + 1
            (streamed,) = await read_n(call, 1)
            assert streamed == ev
            call.cancel()
            (active,) = agent.alerts.active()
            assert active.acknowledged and active.acknowledged_by == "disp1"

    asyncio.run(scenario())


def test_a_client_string_cannot_forge_a_log_line(video, caplog):
    async def scenario():
        async with Agent() as agent, channel(agent.target) as ch:
            stub = pbg.OrAgentStub(ch)
            await start_case(stub, video)
            await stub.StopCase(pb.StopCaseRequest(reason="done\n2026-12-02 INFO or-agent: case OR9 approved"), timeout=30)

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    (line,) = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    assert line == "case OR1-test-01 stopped (done\\x0a2026-12-02 INFO or-agent: case OR9 approved)"


def test_health_says_not_serving_as_soon_as_a_case_is_stopped(video):
    async def scenario():
        async with Agent() as agent, channel(agent.target) as ch:
            stub, health = pbg.OrAgentStub(ch), health_pb2_grpc.HealthStub(ch)
            await start_case(stub, video)
            await eventually(lambda: _status(health, SERVING), 15, "SERVING while the case runs")
            await stub.StopCase(pb.StopCaseRequest(reason="done"), timeout=30)
            # at once, not on the watchdog's next turn: the state is IDLE and health says so
            assert (await stub.GetStatus(pb.StatusRequest())).state == pb.Status.IDLE
            assert await _status(health, NOT_SERVING)

    asyncio.run(scenario())


def test_alert_streams_are_limited_like_overlay_streams():
    async def scenario():
        async with Agent(**{"server.max_subscribers": 2}) as agent, channel(agent.target) as ch:
            stub = pbg.OrAgentStub(ch)
            calls = [stub.StreamAlerts(pb.AlertSubscribeRequest(client_id=f"d{i}")) for i in range(2)]
            await eventually(lambda: agent.server.service.alert_streams == 2, 10, "two open alert streams")
            e = await rpc_error(stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="d2")).read())
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and e.details() == "too many alert streams (limit 2)"
            calls[0].cancel()
            await eventually(lambda: agent.server.service.alert_streams == 1, 10, "the cancelled stream to be released")
            again = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="d3"))
            rec = agent.alerts.raise_alert("bleeding", "critical", "bleeding in the field")
            (event,) = await read_n(again, 1)
            assert event.alert_id == rec.alert_id
            again.cancel()
            calls[1].cancel()

    asyncio.run(scenario())


def test_a_second_agent_on_the_same_port_is_refused_with_one_line():
    async def scenario():
        async with Agent() as first:
            second = Agent(**{"server.listen": f"127.0.0.1:{first.server.port}"})
            with pytest.raises(InputError) as e:
                await second.server.start()
            assert str(e.value) == (f"server.listen: cannot listen on 127.0.0.1:{first.server.port} "
                                    "(address in use or not available)")
            # the first keeps every connection
            async with channel(first.target) as ch:
                assert (await pbg.OrAgentStub(ch).GetStatus(pb.StatusRequest(), timeout=10)).state is not None

    asyncio.run(scenario())


def test_ending_a_case_clears_its_alerts_and_none_shows_in_the_next(video):
    async def scenario():
        async with Agent() as agent, channel(agent.target) as ch:
            stub = pbg.OrAgentStub(ch)
            await start_case(stub, video, "OR1-case-A")
            rec = agent.alerts.raise_alert("energy_near_cystic_duct", "critical", "L-hook 2.3 px from the cystic duct")
            call = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1"))
            (raised,) = await read_n(call, 1)
            assert raised.alert_id == rec.alert_id
            await stub.StopCase(pb.StopCaseRequest(reason="done"), timeout=30)
            (cleared,) = await read_n(call, 1)
            assert cleared.kind == pb.AlertEvent.CLEARED and cleared.alert_id == rec.alert_id
            assert cleared.message == "L-hook 2.3 px from the cystic duct (cleared: case OR1-case-A ended)"
            assert agent.alerts.active() == []
            await start_case(stub, video, "OR1-case-B")
            overlays = stub.StreamOverlays(pb.SubscribeRequest(client_id="disp1"))
            (first,) = await read_n(overlays, 1)
            assert not first.active_alerts
            overlays.cancel()
            call.cancel()

    asyncio.run(scenario())


# ----- 8. graceful shutdown ----------------------------------------------------------------------


def test_stop_ends_open_streams_with_a_status(video):
    async def scenario():
        # A long grace: the streams must end because the agent ends them, not because grace ran out.
        agent = Agent(**{"server.shutdown_grace_s": 15.0})
        async with agent, channel(agent.target) as ch:
            stub = pbg.OrAgentStub(ch)
            await start_case(stub, video)
            overlays = stub.StreamOverlays(pb.SubscribeRequest(client_id="disp1"))
            alerts = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1"))
            await read_n(overlays, 3, 15)
            agent.alerts.raise_alert("test", "info", "before shutdown")
            await read_n(alerts, 1)

            t0 = time.monotonic()
            stopping = asyncio.create_task(agent.stop())

            async def until_end(call):
                while await call.read() is not grpc.aio.EOF:
                    pass
                return await call.code()

            codes = await asyncio.wait_for(asyncio.gather(until_end(overlays), until_end(alerts)), 5)
            assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK]
            await asyncio.wait_for(stopping, 10)
            assert time.monotonic() - t0 < 15  # a hang bound, generous for a loaded machine
            assert agent.server.service.session.stopped_unix_ms > 0

    asyncio.run(scenario())


# ----- 9. configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ('[server]\nlisen = "127.0.0.1:50051"\n', "server.lisen: unknown key (known: alert_history, behind_limit_s, "),
    ("[server]\nmax_subscribers = \"many\"\n", "server.max_subscribers: must be int, got 'many'"),
    ("[pipeline]\nstale_after_s = true\n", "pipeline.stale_after_s: must be float, got True"),
    ('[server]\nlisten = "0.0.0.0:50051"\n', "server.listen: 0.0.0.0:50051 is beyond loopback, so TLS is required: "
                                              "set server.tls_cert, server.tls_key and server.tls_ca"),
    ("[servers]\n", "unknown section [servers] (known: server, case, pipeline, alerts, audit, models, logging)"),
    ("[server]\nbehind_limit_s = 0\n", "server.behind_limit_s: must be positive, got 0.0"),
    ("[pipeline]\nanatomy_every = -2\n", "pipeline.anatomy_every: must be a whole number of frames, at least 0, got -2"),
    ("[pipeline]\nanatomy_every = 1.5\n", "pipeline.anatomy_every: must be a whole number of frames, at least 0, got 1.5"),
])
def test_config_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: {message}")


def test_one_configuration_model_checks_every_table_once_however_it_is_made(tmp_path):
    """The pipeline table embeds the runtime's own configuration: the file, a command-line override and the
    defaults all give the runtime's PipelineConfig, checked by it alone."""
    from or_agent.agent.config import AgentConfig
    from or_agent.pipelines.runtime import PipelineConfig

    path = tmp_path / "agent.toml"
    path.write_text("[pipeline]\nanatomy_every = 3\nstale_after_s = 2\n")
    cfg = load_config(path)
    assert cfg.pipeline.runtime == PipelineConfig(anatomy_every=3) and cfg.pipeline.stale_after_s == 2.0
    assert AgentConfig().with_overrides(**{"pipeline.anatomy_every": 3}).pipeline.runtime == cfg.pipeline.runtime
    with pytest.raises(InputError, match=r"^server.behind_limit_s: must be positive, got 0.0$"):
        AgentConfig().with_overrides(**{"server.behind_limit_s": 0})
    with pytest.raises(InputError, match=r"^pipeline.anatomy_every: must be a whole number of frames"):
        AgentConfig().with_overrides(**{"pipeline.anatomy_every": -1})


def test_example_config_is_the_defaults():
    from dataclasses import asdict

    assert asdict(load_config(ROOT / "agent" / "agent.example.toml")) == asdict(load_config(None))


def test_serve_beyond_loopback_without_tls_is_refused():
    # As tests.conftest.run_cli, with a short timeout: were the check broken, the server would serve.
    proc = subprocess.run([sys.executable, "-m", "or_agent.agent.cli", "serve", "--listen", "0.0.0.0:0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("or-agent: error: server.listen: 0.0.0.0:0 is beyond loopback"), proc.stderr


# ----- 10. the reference display ----------------------------------------------------------------


def _yellow_in_centre(img: np.ndarray) -> int:
    """Pixels of the "AI OFF" yellow in the middle of the picture, where the display writes it."""
    h, w = img.shape[:2]
    centre = img[h // 2 - 60:h // 2 + 10, w // 2 - 160:w // 2 + 160].astype(int)
    b, g, r = centre[..., 0], centre[..., 1], centre[..., 2]
    return int(((b < 60) & (g > 180) & (r > 200)).sum())


def _read_video(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    return frames


def test_display_shows_ai_off_when_the_agent_goes_away(video, tmp_path):
    out = tmp_path / "display.mp4"

    async def scenario():
        agent = Agent()
        async with agent, channel(agent.target) as ch:
            await start_case(pbg.OrAgentStub(ch), video)
            display = Display(agent.target, client_id="disp1", headless=str(out), backoff_max_s=0.5)
            run = asyncio.create_task(display.run())
            try:
                await eventually(lambda: display.state.connected and display.state.newest_jpeg is not None, 15,
                                 "the display to receive composited frames")
                samples = []  # (frames written so far, why AI is off or None), while the agent serves
                for _ in range(25):
                    await asyncio.sleep(0.1)
                    samples.append((display.frames_shown, ai_off_reason(display.state, display.stale_s, time.monotonic())))
                assert display.state.connected and time.monotonic() - display.state.newest_at < display.stale_s
                shown_live = display.frames_shown

                await agent.stop()
                await eventually(lambda: ai_off_reason(display.state, display.stale_s, time.monotonic()) is not None,
                                 3, "the display to say AI OFF")
                await asyncio.sleep(1.5)  # frames written while the agent is gone
                assert not display.state.connected
                assert ai_off_reason(display.state, display.stale_s, time.monotonic()) is not None
                assert display.frames_shown > shown_live + 20
            finally:
                display.stop()
                await asyncio.wait_for(run, 10)
            return samples, shown_live, display.frames_shown

    samples, shown_live, shown = asyncio.run(scenario())
    frames = _read_video(out)
    assert abs(len(frames) - shown) <= 2 and frames[0].shape == (480, 854, 3)
    # While the agent served, the picture is the agent's video (not a blank screen), without AI OFF
    # wherever the display had a current overlay (the model may call some frames out of body: AI paused).
    assert frames[shown_live // 2].mean() > 20
    live = [i for (a, ra), (b, rb) in zip(samples, samples[1:]) if ra is None and rb is None for i in range(a + 1, b - 1)]
    # (AI OFF is ~2400 such pixels; a sharp H.264 recording keeps the anatomy's thin yellow-green
    # outlines, up to a few hundred where they cross the middle)
    assert all(_yellow_in_centre(frames[i]) < 600 for i in live), [_yellow_in_centre(frames[i]) for i in live]
    # ... and after it went away the last frames say AI OFF in the middle, in yellow.
    assert all(_yellow_in_centre(f) > 1500 for f in frames[-10:]), [_yellow_in_centre(f) for f in frames[-10:]]


def test_display_matches_overlays_to_the_local_video_by_media_time(video, tmp_path):
    async def scenario():
        async with Agent() as agent, channel(agent.target) as ch:
            await start_case(pbg.OrAgentStub(ch), video)
            await eventually(lambda: agent.server.service.published > 0, 15, "the first result")
            await asyncio.sleep(1.0)  # the local copy plays a little behind the agent, as on a real display
            display = Display(agent.target, client_id="disp1", video=video, headless=str(tmp_path / "v.mp4"),
                              duration_s=3.0)
            await asyncio.wait_for(display.run(), 20)
            return display

    display = asyncio.run(scenario())
    assert display.frames_shown >= 40
    # Some local frames were drawn with the overlay of their own media time (not all: none before the
    # stream is up, and none where the agent says AI paused, e.g. frames its model calls out of body).
    assert display.overlays_matched >= 10, (display.overlays_matched, display.frames_shown)
    assert display.state.by_media_ms


# ----- decision support and fail-safe end to end (issue 5) -------------------------------------


class _StallingBackend:
    """Wraps a real backend; on its ``stall_at``-th call it hangs for ``stall_s`` (a stuck GPU, a
    deadlocked driver), then carries on."""

    def __init__(self, inner, stall_at: int, stall_s: float):
        self.inner, self.stall_at, self.stall_s, self.calls = inner, stall_at, stall_s, 0
        self.manifest, self.name = inner.manifest, inner.name

    def run(self, inputs):
        self.calls += 1
        if self.calls == self.stall_at:
            time.sleep(self.stall_s)
        return self.inner.run(inputs)

    def close(self):
        self.inner.close()


def _audit_records(audit_dir: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(audit_dir.glob("audit-*.jsonl")) for line in f.read_text().splitlines()]


def test_a_stalled_stage_makes_the_ai_unavailable_then_records_the_gap(video):
    from or_agent.agent.audit.verify import verify

    async def scenario():
        agent = Agent(**{"pipeline.stale_after_s": 0.5})
        models = agent.server.models
        segmentation = models.stages.one(Task.SEGMENTATION)
        segmentation.backend = _StallingBackend(segmentation.backend, stall_at=40, stall_s=2.5)
        async with agent:
            async with channel(agent.target) as ch:
                stub, health = pbg.OrAgentStub(ch), health_pb2_grpc.HealthStub(ch)
                alerts = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1"))
                overlays = stub.StreamOverlays(pb.SubscribeRequest(client_id="disp1"))
                await start_case(stub, video)
                await eventually(lambda: _status(health, SERVING), 10, "SERVING before the stall")
                paused, t_first_paused = [], None
                async for ov in overlays:  # until the first explicit AI-unavailable overlay
                    if ov.ai_paused and ov.paused_reason.startswith("AI unavailable"):
                        paused.append(ov)
                        t_first_paused = time.monotonic()
                        break
                assert not paused[0].HasField("phase") and not paused[0].anatomy, "no stale result is sent as current"
                assert await _status(health, NOT_SERVING)
                events = []
                async for ev in alerts:
                    events.append(ev)
                    if ev.rule == "ai_stalled" and ev.kind == pb.AlertEvent.CLEARED:
                        break
                stalled = [e for e in events if e.rule == "ai_stalled"]
                assert [e.kind for e in stalled] == [pb.AlertEvent.RAISED, pb.AlertEvent.CLEARED]
                assert stalled[0].severity == pb.CRITICAL and "after" in stalled[1].message
                # cleared once the 2.5 s stall ends, long before the video would end (a hang bound, not a speed check)
                assert time.monotonic() - t_first_paused < 12.0
                await eventually(lambda: _status(health, SERVING), 5, "SERVING again after the stall")
                overlays.cancel()
                alerts.cancel()
        return agent.audit_dir

    audit_dir = asyncio.run(scenario())
    failsafe = [r["data"] for r in _audit_records(audit_dir) if r["kind"] == "failsafe"]
    assert failsafe[0]["state"] == "ai_unavailable" and failsafe[1]["state"] == "ai_available"
    assert 1.0 < failsafe[1]["gap_s"] < 4.0
    kinds = [r["kind"] for r in _audit_records(audit_dir)]
    assert kinds[:2] == ["config", "session_start"] and "alert_raised" in kinds and kinds[-1] == "session_stop"
    assert verify([audit_dir]).ok


async def _status(health, wanted) -> bool:
    return (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == wanted


def test_unacknowledged_critical_alert_is_reannounced_until_acknowledged(video):
    async def scenario():
        async with Agent(**{"alerts.reannounce_s": 0.3}) as agent:
            async with channel(agent.target) as ch:
                stub = pbg.OrAgentStub(ch)
                await start_case(stub, video)
                agent.alerts.raise_alert("bleeding", "critical", "Bleeding: test", {"area_pct": "1.2"})
                agent.alerts.raise_alert("phase_too_long", "info", "long phase")  # info: never re-announced
                alerts = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1"))
                seen = []
                async for ev in alerts:
                    seen.append(ev)
                    if sum(e.kind == pb.AlertEvent.REANNOUNCED for e in seen) == 2:
                        break
                bleeding = next(e for e in seen if e.rule == "bleeding")
                ack = await stub.AcknowledgeAlert(pb.AcknowledgeRequest(alert_id=bleeding.alert_id, client_id="or3-main"))
                assert ack.event.acknowledged_by == "or3-main"
                n_before = len(agent.alerts.since(0)[0])
                await asyncio.sleep(1.0)
                after = [e for e in agent.alerts.since(0)[0][n_before:] if e.kind == "reannounced"]
                alerts.cancel()
                assert after == [], "an acknowledged alert is not announced again"
                assert all(e.rule == "bleeding" for e in seen if e.kind == pb.AlertEvent.REANNOUNCED)
        return agent.audit_dir

    audit_dir = asyncio.run(scenario())
    acks = [r["data"] for r in _audit_records(audit_dir) if r["kind"] == "alert_acknowledged"]
    assert acks and acks[0]["acknowledged_by"] == "or3-main"
    assert sum(r["kind"] == "alert_reannounced" for r in _audit_records(audit_dir)) >= 2


def test_rules_fire_on_the_live_stream_with_evidence_and_on_the_overlay(held_out_video):
    """The held-out synthetic surgery through the live agent: its scripted bleeding and the L-hook
    working at the duct raise critical alerts, with evidence, on the stream and on the overlays."""
    video = str(held_out_video / "video01.mp4")

    async def scenario():
        async with Agent(**{"alerts.time_scale": 25.0, "pipeline.anatomy_every": 1}) as agent:
            async with channel(agent.target) as ch:
                stub = pbg.OrAgentStub(ch)
                alerts = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1"))
                overlays = stub.StreamOverlays(pb.SubscribeRequest(client_id="disp1"))
                info = await stub.StartCase(pb.StartCaseRequest(source=video, case_id="OR1-rules", paced=False))
                assert info.case_id == "OR1-rules"
                raised = []
                async for ev in alerts:
                    if ev.kind == pb.AlertEvent.RAISED:
                        raised.append(ev)
                    if {"bleeding", "energy_near_cystic_duct"} <= {e.rule for e in raised}:
                        break
                marked = None
                async for ov in overlays:
                    if ov.active_alerts:
                        marked = ov
                        break
                alerts.cancel()
                overlays.cancel()
                return raised, marked

    raised, marked = asyncio.run(asyncio.wait_for(scenario(), 240))
    bleed = next(e for e in raised if e.rule == "bleeding")
    assert bleed.severity == pb.CRITICAL and float(bleed.evidence["growth_pct"]) >= 0.3 and bleed.frame_sequence > 0
    hook = next(e for e in raised if e.rule == "energy_near_cystic_duct")
    assert float(hook.evidence["distance_px"]) < 20 and hook.models
    assert marked is not None and marked.active_alerts[0].rule in {e.rule for e in raised}


@pytest.mark.parametrize("name", ["case-1\n", "a/b", "-x", "a" * 65, "patient John"])
def test_case_and_display_names_are_plain_with_nothing_after(name, tmp_path):
    """One rule for case ids (config and StartCase) and display names: not even a trailing newline."""
    from or_agent.agent.config import is_plain_name, load_config
    from or_agent.agent.session import CaseSpec
    from or_agent.pipelines.errors import InputError

    assert not is_plain_name(name) and is_plain_name("OR1-case.2026_11")
    with pytest.raises(InputError, match="case_id: use 1-64 letters"):
        CaseSpec("video.mp4", name)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"[case]\ncase_id = {json.dumps(name)}\n")  # a JSON string is a TOML basic string
    with pytest.raises(InputError, match="case.case_id: use 1-64 letters"):
        load_config(str(cfg))


def test_a_display_is_judged_by_the_age_of_what_it_is_sent_and_a_stale_one_gives_up_its_slot():
    """Issue 13 items 3 and 4, the agent's side: age, not drops, says a display is behind; when every slot
    is taken a stale display gives its slot to a newcomer, a configured (reserved) display always gets
    one, and a reserved display is never displaced."""
    import asyncio

    from or_agent.agent.fanout import Fanout

    async def scenario():
        fan = Fanout(asyncio.get_running_loop(), AlertLog(10), [], "synthetic", None, queue_size=4)
        now = time.monotonic()
        fresh = fan.subscribe("fresh", "p1", False, None)
        stale = fan.subscribe("stale", "p2", False, None)
        keeper = fan.subscribe("or1-main", "p3", False, None, reserved=True)
        for _ in range(10):  # a display that drops, but is sent what was just captured, is not behind
            fresh.offer(b"x", now - 0.1)
        assert fresh.dropped == 6 and fresh.age_s(now) < 0.2 and not fresh.over_limit(5.0)
        stale.offer(b"x", now - 3.0)  # its next overlay was captured 3 s ago
        stale.writing = now - 3.0
        keeper.offer(b"x", now - 9.0)
        assert stale.age_s(now) >= 3.0 and keeper.over_limit(5.0)
        # full: a newcomer takes the slot of the stalest unreserved display past the threshold
        assert fan.make_room(3, reserved=False, stale_s=2.0) is stale and stale.displaced
        assert stale not in fan.subscribers and keeper in fan.subscribers
        fan.subscribe("other", "p4", False, None)
        # nobody unreserved is stale: an unconfigured newcomer is refused, a configured one displaces
        assert fan.make_room(3, reserved=False, stale_s=2.0) is None
        displaced = fan.make_room(3, reserved=True, stale_s=2.0)
        assert displaced is not None and not displaced.reserved and keeper in fan.subscribers

    asyncio.run(scenario())


def test_a_display_that_reports_progress_is_judged_by_what_it_has_shown():
    """Issue 13 item 3: what gRPC's transport has taken is not what the display has shown. A display that
    reports progress is as far behind as the oldest overlay it was sent and has not reported shown."""
    from or_agent.agent.fanout import Fanout

    async def scenario():
        fan = Fanout(asyncio.get_running_loop(), AlertLog(10), [], "synthetic", None, queue_size=4)
        now = time.monotonic()
        sub = fan.subscribe("or1-main", "p1", False, None, reports_progress=True)
        plain = fan.subscribe("legacy", "p2", False, None)
        for k in range(10):  # sent one every 0.5 s, the first captured 5 s ago; none queued any more
            assert sub.written(now - 5.0 + 0.5 * k) == k + 1
            plain.written(now - 5.0 + 0.5 * k)
        assert sub.queue.empty() and sub.age_s(now) == pytest.approx(5.0) and sub.over_limit(4.0)
        assert plain.age_s(now) == 0.0  # without reports the server can only count them as delivered
        sub.report_shown(6)  # shown up to the 6th: the 7th, captured 2 s ago, is the oldest unshown
        assert sub.age_s(now) == pytest.approx(2.0) and not sub.over_limit(4.0)
        sub.report_shown(3)  # a late, older report changes nothing
        assert sub.shown == 6 and sub.age_s(now) == pytest.approx(2.0)
        sub.report_shown(10)
        assert sub.age_s(now) == 0.0 and not sub.unshown
        with pytest.raises(ValueError, match=r"stream_position 11 is beyond what was sent to display or1-main \(10\)"):
            sub.report_shown(11)
        # the report finds the display's stream on its own connection, else its only one
        assert fan.stream_of("or1-main", "elsewhere") is sub and fan.stream_of("nobody", "p1") is None
        twin = fan.subscribe("or1-main", "p3", False, None, reports_progress=True)
        assert fan.stream_of("or1-main", "p3") is twin and fan.stream_of("or1-main", "elsewhere") is None

    asyncio.run(scenario())


def test_a_display_that_stops_showing_what_it_reads_is_ended_and_one_that_shows_it_is_not(slow_video):
    """End to end: both displays read every overlay at once (their transports never fill); the one whose
    reports stop is ended with RESOURCE_EXHAUSTED once what it has not shown is older than the limit,
    the one that reports what it shows keeps its stream. Bad reports get one-line errors."""
    async def scenario():
        async with Agent(**{"server.behind_limit_s": 1.5}) as agent, \
                channel(agent.target) as ch_a, channel(agent.target) as ch_b:
            a, b = pbg.OrAgentStub(ch_a), pbg.OrAgentStub(ch_b)
            err = await rpc_error(a.ReportProgress(pb.ProgressReport(client_id="frozen-ui", stream_position=1)))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.details() == "display frozen-ui has no overlay stream subscribed with reports_progress here"
            err = await rpc_error(a.ReportProgress(pb.ProgressReport(client_id="bad id\n", stream_position=1)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            await start_case(a, slow_video)
            frozen = a.StreamOverlays(pb.SubscribeRequest(client_id="frozen-ui", reports_progress=True))
            live = b.StreamOverlays(pb.SubscribeRequest(client_id="live-ui", reports_progress=True))
            first = await read_n(frozen, 2, 15)
            assert [m.stream_position for m in first] == [1, 2]
            ack = await a.ReportProgress(pb.ProgressReport(client_id="frozen-ui", stream_position=2))
            assert ack.limit_s == 1.5 and ack.behind_s >= 0.0
            err = await rpc_error(a.ReportProgress(pb.ProgressReport(client_id="frozen-ui", stream_position=10 ** 6)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "is beyond what was sent to display frozen-ui" in err.details()

            async def read_all(call, report_to):
                got = []
                try:
                    while (msg := await call.read()) is not grpc.aio.EOF:
                        got.append(msg.stream_position)
                        if report_to is not None:
                            await report_to.ReportProgress(pb.ProgressReport(client_id="live-ui", stream_position=msg.stream_position))
                except grpc.aio.AioRpcError as exc:
                    return got, exc
                return got, None

            frozen_task = asyncio.create_task(read_all(frozen, None))  # reads on, reports nothing more
            live_task = asyncio.create_task(read_all(live, b))
            got, err = await asyncio.wait_for(frozen_task, 30)
            assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert err.details().startswith("display frozen-ui fell behind: what it was to receive was more than 1.5 s old")
            assert got == list(range(3, 3 + len(got)))  # it was sent (and read) every position, in order
            assert not live_task.done()
            assert [s.client_id for s in agent.server.service.fanout.subscribers] == ["live-ui"]
            live.cancel()
            await asyncio.gather(live_task, return_exceptions=True)

    asyncio.run(scenario())


def test_a_display_told_it_is_behind_drops_its_stream():
    """What a slow display's transport holds is already old when the agent ends its stream (the status
    comes after it): the answer to its report says so first, and the reference display subscribes again."""
    from or_agent.agent.display import must_resubscribe

    assert must_resubscribe(pb.ProgressAck(behind_s=6.2, limit_s=5.0), None)
    assert not must_resubscribe(pb.ProgressAck(behind_s=0.4, limit_s=5.0), None)
    assert must_resubscribe(None, grpc.StatusCode.FAILED_PRECONDITION)  # its stream is gone
    assert not must_resubscribe(None, grpc.StatusCode.DEADLINE_EXCEEDED)  # a slow answer says nothing


def test_the_reference_display_reports_what_it_has_shown(video, tmp_path):
    async def scenario():
        async with Agent() as agent, channel(agent.target) as ch:
            await start_case(pbg.OrAgentStub(ch), video)
            display = Display(agent.target, client_id="disp1", headless=str(tmp_path / "d.mp4"))
            run = asyncio.create_task(display.run())
            try:
                def reported():
                    subs = [s for s in agent.server.service.fanout.subscribers if s.client_id == "disp1"]
                    return subs and subs[0].reports_progress and subs[0].shown > 0 and subs[0]
                sub = await eventually(reported, 15, "the display's first progress report")
                assert sub.shown <= display.state.shown_position <= display.state.newest_position <= sub.sent
            finally:
                display.stop()
                await asyncio.wait_for(run, 10)

    asyncio.run(scenario())


# ----- issue 13 items 8-10: what a display may open, who it is, revocation ------------------------


def test_start_case_opens_only_allowed_sources_and_says_nothing_of_the_rest(video, tmp_path, caplog):
    """Item 8: StartCase opened any path on the box (an image folder outside the case area came back as
    JPEG) and its errors told whether a file existed and what it was. Now a source must lie in
    [case] allowed_sources after resolving '..' and links; anything else gets one and the same answer;
    status and case info name the source only by its file name, and no full path reaches the log."""
    from or_agent.agent.source_policy import NOT_ALLOWED

    cases, outside = tmp_path / "cases", tmp_path / "outside-the-case-area"
    cases.mkdir()
    (outside / "images").mkdir(parents=True)
    frame = cv2.VideoCapture(video).read()[1]
    for i in range(3):
        cv2.imwrite(str(outside / "images" / f"img{i:03d}.png"), frame)
    (outside / "notes.txt").write_text("not a video")
    shutil.copy(video, outside / "video.mp4")
    shutil.copy(video, cases / "case-video.mp4")
    (cases / "escape").symlink_to(outside)

    refused_sources = [
        str(outside / "images"),                      # the tester's image folder: exists, readable, outside
        str(outside / "video.mp4"),                   # a real video, outside
        str(outside / "notes.txt"),                   # a file that is not a video
        str(outside / "no-such-file.mp4"),            # nothing there at all
        str(outside),                                 # a directory without images
        str(cases / ".." / outside.name / "images"),  # '..' out of the allowed directory
        str(cases / "escape" / "images"),             # a link out of it
        str(cases / "escape"),
        "/etc/passwd", "/etc", "/etc/no-such-file", "/dev/null", "/dev/v4l/../../etc/passwd",
        "file:///etc/passwd", "http://127.0.0.1:9/anything", "rtsp://camera.invalid/live",
        "case-video.mp4",                             # relative: the agent's working directory, not the case area
    ]

    async def scenario():
        async with Agent(**{"case.allowed_sources": [str(cases)]}) as agent, channel(agent.target) as ch:
            stub = pbg.OrAgentStub(ch)
            for source in refused_sources:
                e = await rpc_error(stub.StartCase(pb.StartCaseRequest(source=source, case_id="OR1-probe"), timeout=30))
                assert (e.code(), e.details()) == (grpc.StatusCode.PERMISSION_DENIED, NOT_ALLOWED), source
            assert (await stub.GetStatus(pb.StatusRequest())).state == pb.Status.IDLE  # nothing was opened

            info = await start_case(stub, str(cases / "case-video.mp4"), "OR1-allowed")
            st = await stub.GetStatus(pb.StatusRequest())
            assert info.source == st.source == "case-video.mp4"
            await stub.StopCase(pb.StopCaseRequest(reason="done"), timeout=30)
            # the same file through the link into the case area and back: resolved, inside, allowed
            info = await start_case(stub, str(cases / "escape" / ".." / "cases" / "case-video.mp4"), "OR1-resolved")
            assert info.source == "case-video.mp4"
            await stub.StopCase(pb.StopCaseRequest(), timeout=30)
        return agent.audit_dir

    with caplog.at_level(logging.INFO):
        audit_dir = asyncio.run(scenario())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "case OR1-allowed started on case-video.mp4" in logged
    assert str(tmp_path) not in logged and "/etc" not in logged
    assert str(tmp_path) not in "".join(f.read_text() for f in audit_dir.glob("audit-*.jsonl"))


def test_the_launch_source_and_capture_devices_need_no_allow_list(video, tmp_path):
    """Item 8's default: with allowed_sources empty, StartCase may open the source set at launch (the
    operator chose it on the box) and nothing else of the file system."""
    from or_agent.agent.source_policy import NOT_ALLOWED

    neighbour = Path(video).parent / "video01-phase.txt"

    async def scenario():
        agent = Agent(**{"case.allowed_sources": [], "case.source": video, "case.case_id": "OR1-launch"})
        async with agent, channel(agent.target) as ch:
            stub = pbg.OrAgentStub(ch)
            st = await stub.GetStatus(pb.StatusRequest())
            assert st.case_id == "OR1-launch" and st.source == "video01.mp4"
            await stub.StopCase(pb.StopCaseRequest(), timeout=30)
            assert (await start_case(stub, video, "OR1-again")).source == "video01.mp4"
            await stub.StopCase(pb.StopCaseRequest(), timeout=30)
            e = await rpc_error(stub.StartCase(pb.StartCaseRequest(source=str(neighbour), case_id="OR1-x")))
            assert (e.code(), e.details()) == (grpc.StatusCode.PERMISSION_DENIED, NOT_ALLOWED)
            # a capture device is not refused by the allow-list: it fails only because this machine has none
            e = await rpc_error(stub.StartCase(pb.StartCaseRequest(source="/dev/video63", case_id="OR1-cam"), timeout=30))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("/dev/video63: ")

    asyncio.run(scenario())


def _tls(made) -> dict:
    return {"server.tls_cert": str(made.server_cert), "server.tls_key": str(made.server_key),
            "server.tls_ca": str(made.ca_cert)}


def _as(agent: Agent, made, name: str) -> grpc.aio.Channel:
    """A channel to the agent presenting display ``name``'s certificate."""
    crt, key = made.clients[name]
    return channel(agent.target, channel_credentials(made.ca_cert, crt, key))


def test_under_mutual_tls_a_display_is_its_certificate_and_roles_decide(video, tmp_path):
    """Item 9: one display acknowledged an alert as another, and the audit trail recorded the
    impostor's claim. Under mutual TLS the identity is the certificate's name; a client_id that differs
    is refused, and the roles in [server] decide who may start and stop cases or acknowledge."""
    made = make_certificates(tmp_path / "pki", box="or-box", displays=["or3-main", "or3-nurse", "or3-wall"])

    async def scenario():
        agent = Agent(**_tls(made), **{"server.may_start_stop": ["or3-nurse"],
                                       "server.may_acknowledge": ["or3-main", "or3-nurse"]})
        async with agent, _as(agent, made, "or3-main") as main_ch, _as(agent, made, "or3-nurse") as nurse_ch, \
                _as(agent, made, "or3-wall") as wall_ch:
            main, nurse, wall = pbg.OrAgentStub(main_ch), pbg.OrAgentStub(nurse_ch), pbg.OrAgentStub(wall_ch)
            rec = agent.alerts.raise_alert("bleeding", "critical", "bleeding in the field", {"area": "0.04"})

            # the wall display acknowledging in the main display's name: refused, and nothing recorded
            e = await rpc_error(wall.AcknowledgeAlert(pb.AcknowledgeRequest(alert_id=rec.alert_id, client_id="or3-main")))
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED
            assert e.details() == ("client_id 'or3-main' is not this display's certificate name 'or3-wall': under mutual "
                                   "TLS a display is the name in its certificate (send that, or leave client_id empty)")
            # in its own name it is not one of the displays that may acknowledge
            e = await rpc_error(wall.AcknowledgeAlert(pb.AcknowledgeRequest(alert_id=rec.alert_id, client_id="or3-wall")))
            assert (e.code(), e.details()) == (grpc.StatusCode.PERMISSION_DENIED, "display 'or3-wall' may not acknowledge "
                                               "alerts (not in server.may_acknowledge on the agent)")
            assert not agent.alerts.active()[0].acknowledged
            # the main display may; its name comes from its certificate (client_id may be left empty)
            ack = await main.AcknowledgeAlert(pb.AcknowledgeRequest(alert_id=rec.alert_id))
            assert ack.event.acknowledged_by == "or3-main"

            # viewing needs only a certificate; a stream is the certificate's display whatever it calls itself
            e = await rpc_error(wall.StreamOverlays(pb.SubscribeRequest(client_id="or3-nurse")).read())
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "'or3-wall'" in e.details()
            overlays = wall.StreamOverlays(pb.SubscribeRequest())
            await eventually(lambda: [s.client_id for s in agent.server.service.fanout.subscribers] == ["or3-wall"], 5,
                             "the wall display subscribed under its certificate's name")
            overlays.cancel()
            assert (await wall.GetStatus(pb.StatusRequest())).state == pb.Status.IDLE

            # starting and stopping cases: the nurse station only
            e = await rpc_error(main.StartCase(pb.StartCaseRequest(source=video, case_id="OR1-roles")))
            assert (e.code(), e.details()) == (grpc.StatusCode.PERMISSION_DENIED, "display 'or3-main' may not start or "
                                               "stop cases (not in server.may_start_stop on the agent)")
            await start_case(nurse, video, "OR1-roles")
            e = await rpc_error(wall.StopCase(pb.StopCaseRequest()))
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (await nurse.StopCase(pb.StopCaseRequest(), timeout=30)).case_id == "OR1-roles"
        return agent.audit_dir

    records = _audit_records(asyncio.run(scenario()))
    acks = [r["data"] for r in records if r["kind"] == "alert_acknowledged"]
    assert [a["acknowledged_by"] for a in acks] == ["or3-main"]
    (start,) = [r["data"] for r in records if r["kind"] == "session_start"]
    (stop,) = [r["data"] for r in records if r["kind"] == "session_stop"]
    assert start["by"] == stop["by"] == "or3-nurse"


def test_roles_need_mutual_tls_and_default_to_every_display(tmp_path):
    cfg = load_config(None)
    assert cfg.server.may_start_stop == cfg.server.may_acknowledge == ("*",)
    with pytest.raises(InputError, match=r"^server.may_acknowledge: roles need mutual TLS"):
        cfg.with_overrides(**{"server.may_acknowledge": ["or3-main"]})
    with pytest.raises(InputError, match=r"^server.may_start_stop: display names"):
        cfg.with_overrides(**{"server.may_start_stop": ["or3 main"]})
    with pytest.raises(InputError, match=r"^server.tls_revoked: a revocation list needs mutual TLS"):
        cfg.with_overrides(**{"server.tls_revoked": str(tmp_path / "revoked.txt")})


def test_a_revoked_display_is_refused_from_then_on(tmp_path):
    """Item 10: `or-agent certs revoke NAME` writes the revocation list; the running agent reads it
    again within a second and refuses the display's calls, ends its open streams, and refuses an older
    copy of its certificate too; a certificate made for it afterwards is accepted; an agent started
    later reads the list at start, and one with a damaged list does not start."""
    from or_agent.agent.cli import main as or_agent

    pki = tmp_path / "pki"
    made = make_certificates(pki, box="or-box", displays=["or3-main", "or3-aux"])
    old_copy = (tmp_path / "old-aux.crt", tmp_path / "old-aux.key")  # a copy the display kept
    shutil.copy(made.clients["or3-aux"][0], old_copy[0])
    shutil.copy(made.clients["or3-aux"][1], old_copy[1])
    make_certificates(pki, box="or-box", displays=["or3-aux"])  # its certificate made again: a new serial

    def creds(pair):
        return channel_credentials(made.ca_cert, *pair)

    async def status_code(agent, pair) -> grpc.StatusCode:
        async with channel(agent.target, creds(pair)) as ch:
            try:
                await pbg.OrAgentStub(ch).GetStatus(pb.StatusRequest(), timeout=10)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                return e.code()

    async def scenario():
        async with Agent(**_tls(made)) as agent:
            aux = made.clients["or3-aux"]
            assert await status_code(agent, aux) == await status_code(agent, old_copy) == grpc.StatusCode.OK
            async with channel(agent.target, creds(aux)) as ch:
                alerts = pbg.OrAgentStub(ch).StreamAlerts(pb.AlertSubscribeRequest())
                agent.alerts.raise_alert("test", "info", "before revocation")
                await read_n(alerts, 1)

                assert await asyncio.to_thread(or_agent, ["certs", "revoke", "or3-aux", "--out", str(pki)]) == 0
                # its open stream ends, with the reason
                e = await rpc_error(read_n(alerts, 5), 10)
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "was revoked on" in e.details()
            async with channel(agent.target, creds(aux)) as ch:
                e = await rpc_error(pbg.OrAgentStub(ch).GetStatus(pb.StatusRequest(), timeout=10))
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED
            assert e.details().startswith("the certificate of 'or3-aux' (serial ") and "was revoked on" in e.details()
            assert await status_code(agent, old_copy) == grpc.StatusCode.UNAUTHENTICATED  # the older copy too
            assert await status_code(agent, made.clients["or3-main"]) == grpc.StatusCode.OK  # the others are served

            await asyncio.sleep(1.1)  # certificate times are whole seconds: made a second later is after
            renewed = make_certificates(pki, box="or-box", displays=["or3-aux"])
            assert await status_code(agent, renewed.clients["or3-aux"]) == grpc.StatusCode.OK

        async with Agent(**_tls(made)) as later:  # a new agent reads the list at start
            assert await status_code(later, old_copy) == grpc.StatusCode.UNAUTHENTICATED
            assert await status_code(later, made.clients["or3-main"]) == grpc.StatusCode.OK

    asyncio.run(scenario())
    revoked = pki / "revoked.txt"
    (entry,) = [line for line in revoked.read_text().splitlines() if not line.startswith("#")]
    assert entry.split()[1] == "or3-aux"
    # a damaged list: the agent does not start (one line, naming the file and line)
    revoked.write_text(revoked.read_text() + "not a revocation\n")
    proc = subprocess.run([sys.executable, "-m", "or_agent.agent.cli", "serve", "--listen", "127.0.0.1:0",
                           "--tls-cert", str(made.server_cert), "--tls-key", str(made.server_key), "--tls-ca", str(made.ca_cert)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"or-agent: error: {revoked}:5: expected 'SERIAL NAME YYYY-MM-DDTHH:MM:SSZ'"), proc.stderr


# ----- issue 13: a stalled stream, a damaged audit trail -----------------------------------------


async def next_alert(call, rule: str, kind, timeout_s: float) -> pb.AlertEvent:
    """The next event of ``rule`` of ``kind`` on an alert stream, skipping the others."""
    what = f"timed out after {timeout_s} s waiting for {rule} {pb.AlertEvent.Kind.Name(kind)}"
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, what
        try:
            (ev,) = await read_n(call, 1, remaining)
        except asyncio.TimeoutError:
            raise AssertionError(what) from None
        if ev.rule == rule and ev.kind == kind:
            return ev


async def _state_is(stub, wanted) -> bool:
    return (await stub.GetStatus(pb.StatusRequest())).state == wanted


def test_a_stalled_stream_is_source_lost_while_it_stalls_and_status_says_why():
    from tests.test_sources import MjpegServer

    server = MjpegServer()
    prefix = server.url.rsplit("/", 1)[0] + "/"

    async def scenario():
        async with Agent(**{"case.allowed_sources": [*CASE_AREA, prefix]}) as agent, channel(agent.target) as ch:
            stub = pbg.OrAgentStub(ch)
            alerts = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1"))
            await stub.StartCase(pb.StartCaseRequest(source=server.url, case_id="OR1-stream-01"), timeout=30)
            await eventually(lambda: _state_is(stub, pb.Status.RUNNING), 30, "RUNNING on the stream")
            assert (await stub.GetStatus(pb.StatusRequest())).last_error == ""
            server.stall()
            lost = await next_alert(alerts, "source_lost", pb.AlertEvent.RAISED, 30)
            assert server.stalled  # raised while the stream stalls, not once it is back (issue 13 item 6)
            st = await stub.GetStatus(pb.StatusRequest())
            assert st.state == pb.Status.SOURCE_LOST
            detail = lost.evidence["detail"]
            assert detail.startswith(f"{server.url}: feed ") and lost.message == f"video source lost: {detail}"
            assert st.last_error.startswith(detail + " (at ") and st.last_error.endswith(" s ago)")
            server.resume()
            await next_alert(alerts, "source_lost", pb.AlertEvent.CLEARED, 60)
            await eventually(lambda: _state_is(stub, pb.Status.RUNNING), 30, "RUNNING once the stream is back")
            # what last went wrong stays said after the recovery
            assert (await stub.GetStatus(pb.StatusRequest())).last_error.startswith(detail + " (at ")
            await stub.StopCase(pb.StopCaseRequest(reason="done"), timeout=30)
            alerts.cancel()

    try:
        asyncio.run(scenario())
    finally:
        server.close()


def test_a_damaged_audit_trail_is_recorded_at_start_and_alerted_at_every_case(video, tmp_path):
    from or_agent.agent.audit.verify import verify
    from or_agent.agent.audit.writer import AuditLog

    audit = tmp_path / "audit"
    with AuditLog(audit) as log:  # an earlier run's trail
        log.append("session_start", {"case_id": "OR1-earlier"})
        for i in range(10):
            log.append("alert_raised", {"rule": "bleeding", "i": i})
        log.append("session_stop", {"case_id": "OR1-earlier"})
    f = audit / "audit-000001.jsonl"
    lines = f.read_bytes().splitlines(keepends=True)
    lines[6] = lines[6].replace(b"bleeding", b"bleedinf")  # one flipped bit in a middle record
    f.write_bytes(b"".join(lines))
    problem = "audit-000001.jsonl:7: hash mismatch (record edited)"
    warning = f"{problem}; chain restarted in audit-000002.jsonl"

    async def scenario():
        async with Agent(**{"audit.directory": str(audit)}) as agent, channel(agent.target) as ch:
            stub = pbg.OrAgentStub(ch)
            assert (await stub.GetStatus(pb.StatusRequest())).audit_warning == warning
            alerts = stub.StreamAlerts(pb.AlertSubscribeRequest(client_id="disp1"))
            for case_id in ("OR1-case-A", "OR1-case-B"):  # every case shows it, not only the first
                await start_case(stub, video, case_id)
                ev = await next_alert(alerts, "audit_damaged", pb.AlertEvent.RAISED, 15)
                assert ev.severity == pb.WARNING and ev.message == f"audit trail damaged: {warning}"
                await stub.StopCase(pb.StopCaseRequest(reason="done"), timeout=30)
            alerts.cancel()

    asyncio.run(scenario())
    records = _audit_records(audit)
    (damaged,) = [r for r in records if r["kind"] == "chain_damaged"]
    assert damaged["data"]["problem"] == problem and damaged["data"]["checked_from"] == "audit-000001.jsonl"
    assert sum(r["kind"] == "alert_raised" and r["data"]["rule"] == "audit_damaged" for r in records) == 2
    result = verify([audit])
    assert result.ok and len(result.warnings) == 1
    assert result.warnings[0].startswith(f"{problem}; the agent found this damage and recorded it at audit-000002.jsonl:1")
