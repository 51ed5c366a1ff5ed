"""Seeing the agent run: the Prometheus endpoint, JSON log lines with the case id, and the version everywhere.

The endpoint is scraped over HTTP from a real in-process ``AgentServer`` (the pattern of
``tests/test_service.py``, whose helpers and thread-leak check this file shares) and parsed by the
Prometheus client's own parser. Only relations between counts are asserted, never a time.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from or_agent.agent import VERSION
from or_agent.agent.build_info import config_sha256
from or_agent.agent.cli import build_parser, main
from or_agent.agent.config import load_config
from or_agent.agent.logs import JsonFormatter, configure_logging, set_case
from or_agent.pipelines.errors import InputError
from or_agent.proto.oragent.v1 import agent_pb2 as pb
from or_agent.proto.oragent.v1 import agent_pb2_grpc as pbg
from tests.conftest import first_frames_video
from tests.test_service import Agent, case_area, channel, eventually, no_thread_leak  # noqa: F401 (fixtures)

METRICS = {"server.metrics_listen": "127.0.0.1:0"}


@pytest.fixture(scope="module")
def short_clip(small_dataset, tmp_path_factory) -> Path:
    """The surgery's first 60 frames, at its own rate."""
    return first_frames_video(small_dataset / "video01.mp4", tmp_path_factory.mktemp("short-clip") / "clip60.mp4", 60)


def scrape(port: int) -> dict:
    """GET /metrics, parsed by prometheus_client's parser: {family name: family}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict, sample_name: str, **labels) -> float:
    """The one sample called ``sample_name`` whose labels include ``labels``."""
    family = families[re.sub(r"_(total|count|sum|bucket)$", "", sample_name)]
    found = [s.value for s in family.samples if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{sample_name}{labels}: {len(found)} samples"
    return found[0]


# ----- the endpoint ---------------------------------------------------------------------------


def test_a_case_is_seen_on_the_metrics_endpoint(small_dataset):
    video = str(small_dataset / "video01.mp4")
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    agent_logger = logging.getLogger("or-agent")
    level = agent_logger.level
    agent_logger.addHandler(handler)
    agent_logger.setLevel(logging.INFO)

    async def scenario():
        loop = asyncio.get_running_loop()
        async with Agent(**METRICS) as agent, channel(agent.target) as ch:
            port = agent.server.metrics.port
            assert port > 0
            m = await loop.run_in_executor(None, scrape, port)
            assert value(m, "or_agent_state", state="IDLE") == 1 and value(m, "or_agent_state", state="RUNNING") == 0
            assert value(m, "or_agent_case_running") == 0 and value(m, "or_agent_frames_total", outcome="published") == 0
            (info,) = m["or_agent_build_info"].samples
            assert info.value == 1 and info.labels["version"] == VERSION
            assert info.labels["model_set"] == "synthetic" and info.labels["model_set_version"] == "1.0.0"
            assert sorted(p.split(":")[0] for p in info.labels["models"].split(",")) == sorted(
                mi.name for mi in agent.server.service.model_info)
            assert all(len(p.split(":")[1]) == 12 for p in info.labels["models"].split(","))

            stub = pbg.OrAgentStub(ch)
            await stub.StartCase(pb.StartCaseRequest(source=video, case_id="OR1-metrics", paced=False), timeout=30)
            overlays = stub.StreamOverlays(pb.SubscribeRequest(client_id="wall"))
            await asyncio.wait_for(overlays.read(), 30)
            await eventually(lambda: agent.server.service.published >= 20, 60, "20 results published")
            m = await loop.run_in_executor(None, scrape, port)
            assert value(m, "or_agent_subscribers", kind="overlay") == 1
            assert value(m, "or_agent_subscribers", kind="alert") == 0
            assert value(m, "or_agent_case_running") == 1
            overlays.cancel()
            await stub.StopCase(pb.StopCaseRequest(reason="end of test"), timeout=30)
            agent.alerts.raise_alert("metrics_test", "critical", "a test alert", {"why": "test"})
            agent.alerts.raise_alert("metrics_test", "critical", "the same, updated")
            return await loop.run_in_executor(None, scrape, port), port, agent.server.service.model_info

    try:
        m, port, model_info = asyncio.run(scenario())
    finally:
        agent_logger.removeHandler(handler)
        agent_logger.setLevel(level)

    captured = value(m, "or_agent_frames_total", outcome="captured")
    published = value(m, "or_agent_frames_total", outcome="published")
    assert 20 <= published <= captured and value(m, "or_agent_frames_total", outcome="dropped") >= 0
    # one observation per published frame, end to end and at every stage boundary
    assert value(m, "or_agent_latency_seconds_count") == published
    assert value(m, "or_agent_latency_seconds_bucket", le="+Inf") == published
    for stage in ("preprocess", "inference", "postprocess", "publish"):
        assert value(m, "or_agent_stage_latency_seconds_count", stage=stage) == published, stage
    assert value(m, "or_agent_latency_seconds_sum") > 0
    # every model ran on some frames, and only the set's models are named
    runs = {s.labels["model"]: s.value for s in m["or_agent_model_inference_seconds"].samples if s.name.endswith("_count")}
    assert set(runs) == {mi.name for mi in model_info} and all(n > 0 for n in runs.values())
    assert max(runs.values()) <= captured  # frames still in flight when the case stopped ran but were not published
    assert value(m, "or_agent_alerts_total", rule="metrics_test", severity="critical", kind="raised") == 1
    assert value(m, "or_agent_alerts_total", rule="metrics_test", severity="critical", kind="updated") == 1
    assert value(m, "or_agent_source_reconnects_total") == 0
    assert value(m, "or_agent_state", state="IDLE") == 1 and value(m, "or_agent_case_running") == 0
    assert "or_agent_gpu_memory_bytes" not in m or value(m, "or_agent_gpu_memory_bytes", kind="total") > 0
    assert m["or_agent_frames"].type == "counter" and m["or_agent_latency_seconds"].type == "histogram"
    with pytest.raises(OSError):  # the endpoint stopped with the server
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)

    # the JSON log lines of the case carry its id; one object a line
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    started = [r for r in records if r["message"].startswith("case OR1-metrics started")]
    assert len(started) == 1 and started[0]["case_id"] == "OR1-metrics" and started[0]["logger"] == "or-agent.service"
    assert started[0]["level"] == "info" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", started[0]["time"])


def test_each_agent_has_its_own_registry():
    async def scenario():
        loop = asyncio.get_running_loop()
        async with Agent(**METRICS) as one, Agent(**METRICS) as two:
            assert one.server.metrics.port != two.server.metrics.port
            one.alerts.raise_alert("only_on_one", "warning", "here")
            m1 = await loop.run_in_executor(None, scrape, one.server.metrics.port)
            m2 = await loop.run_in_executor(None, scrape, two.server.metrics.port)
        return m1, m2

    m1, m2 = asyncio.run(scenario())
    assert value(m1, "or_agent_alerts_total", rule="only_on_one", severity="warning", kind="raised") == 1
    assert not [s for s in m2["or_agent_alerts"].samples if s.labels.get("rule") == "only_on_one"]


def test_metrics_are_off_by_default_and_refused_beyond_loopback():
    assert load_config(None).server.metrics_listen == ""
    with pytest.raises(InputError) as e:
        load_config(None).with_overrides(**{"server.metrics_listen": "0.0.0.0:9464"})
    assert str(e.value) == ("server.metrics_listen: 0.0.0.0:9464 is beyond loopback and the metrics endpoint is plain HTTP: "
                            "keep it on loopback (a Prometheus on the box, or an SSH tunnel), or set server.insecure = true")
    with pytest.raises(InputError) as e:
        load_config(None).with_overrides(**{"server.metrics_listen": "9464"})
    assert str(e.value) == "server.metrics_listen: expected HOST:PORT such as 127.0.0.1:9464, got '9464'"
    cfg = load_config(None).with_overrides(**{"server.metrics_listen": "0.0.0.0:9464", "server.insecure": True})
    assert cfg.server.metrics_listen == "0.0.0.0:9464"
    assert load_config(None).with_overrides(**{"server.metrics_listen": "[::1]:9464"}).server.metrics_listen == "[::1]:9464"


def test_a_metrics_port_in_use_is_one_error_and_nothing_is_left_running():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]

    async def scenario():
        agent = Agent(**{"server.metrics_listen": f"127.0.0.1:{port}"})
        with pytest.raises(InputError) as e:
            await agent.server.start()
        return str(e.value)

    try:
        message = asyncio.run(scenario())
    finally:
        taken.close()
    assert message == f"server.metrics_listen: cannot listen on 127.0.0.1:{port} (Address already in use)"


# ----- logs -----------------------------------------------------------------------------------


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    set_case("")


def test_json_log_lines_carry_the_case_and_cannot_be_forged(capsys, restore_logging):
    configure_logging("info", "json")
    configure_logging("info", "json")  # again: one handler, not two
    log = logging.getLogger("or-agent.test")
    log.debug("not shown at info")
    log.info("no case yet")
    set_case("OR2-2024-01")
    log.warning('a client said "%s"', 'x"}\n{"level": "error", "message": "forged')
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert [r["level"] for r in records] == ["info", "warning", "error"]
    assert records[0]["case_id"] is None and records[1]["case_id"] == records[2]["case_id"] == "OR2-2024-01"
    assert records[1]["message"] == 'a client said "x"}\n{"level": "error", "message": "forged"'
    assert records[1]["logger"] == "or-agent.test" and "exception" not in records[1]
    assert records[2]["exception"].startswith("Traceback") and records[2]["exception"].endswith("ValueError: boom")
    assert set(records[2]) == {"time", "level", "logger", "message", "case_id", "exception"}

    configure_logging("warning", "text")
    log.info("hidden")
    log.warning("plain")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith(" WARNING or-agent.test: plain")


def test_log_options_before_or_after_the_command():
    p = build_parser()
    args = p.parse_args(["--log-level", "debug", "replay", "v.mp4", "--out", "o", "--log-format", "json"])
    assert (args.log_level, args.log_format) == ("debug", "json")
    args = p.parse_args(["--log-level", "debug", "serve", "--log-level", "error"])
    assert (args.log_level, args.log_format) == ("error", None)  # the command's own wins
    args = p.parse_args(["qualify"])
    assert (args.log_level, args.log_format) == (None, None)
    args = p.parse_args(["serve", "--metrics-listen", "127.0.0.1:9464"])
    assert args.metrics_listen == "127.0.0.1:9464"


def test_logging_keys_are_checked(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[logging]\nlevel = "verbose"\n')
    with pytest.raises(InputError) as e:
        load_config(cfg)
    assert str(e.value) == f"{cfg}: logging.level: must be one of debug, info, warning, error, got 'verbose'"
    cfg.write_text('[logging]\nformat = "xml"\n')
    with pytest.raises(InputError) as e:
        load_config(cfg)
    assert str(e.value) == f"{cfg}: logging.format: must be text or json, got 'xml'"
    cfg.write_text('[logging]\nlevel = "debug"\nformat = "json"\n')
    assert (load_config(cfg).logging.level, load_config(cfg).logging.format) == ("debug", "json")


# ----- the version ----------------------------------------------------------------------------


def test_version_is_one_place_and_printed(capsys, monkeypatch):
    monkeypatch.delenv("OR_AGENT_MODELS", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"or-agent {VERSION} (default model set: synthetic 1.0.0)\n"
    import or_agent

    assert or_agent.__version__ == VERSION
    setup_py = (Path(__file__).parent.parent / "setup.py").read_text()
    assert '"0.1.0"' not in setup_py and f'__version__ = "{VERSION}"' in (Path(or_agent.__file__).read_text())


def test_replay_and_qualify_record_what_produced_them(short_clip, tmp_path, capsys):
    from or_agent.agent.offline.qualify import run_qualify
    from or_agent.agent.offline.replay import run_replay

    assert run_replay([str(short_clip)], str(tmp_path / "replay"), anatomy_every=5) == 0
    s = json.loads((tmp_path / "replay" / short_clip.stem / "summary.json").read_text())
    assert s["agent_version"] == VERSION and s["model_set"] == {"name": "synthetic", "version": "1.0.0"}
    assert s["replay_options"] == {"paced": False, "anatomy_every": 5, "rules_file": "", "time_scale": None,
                                   "video": "annotated", "video_height": 720}
    assert s["config_sha256"] == config_sha256(s["replay_options"]) and re.fullmatch(r"[0-9a-f]{64}", s["config_sha256"])

    run_qualify(tmp_path / "q", clip=str(short_clip), seconds=1.0, frames=5, budget_ms=10000.0)
    report = json.loads((tmp_path / "q" / "qualification.json").read_text())
    assert report["agent_version"] == VERSION and report["model_set"] == {"name": "synthetic", "version": "1.0.0"}
    assert report["qualify_options"] == {"clip": short_clip.name, "backend": "auto", "preprocessing": "auto",
                                         "cuda_graphs": False, "budget_ms": 10000.0, "seconds": 1.0, "frames": 5}
    assert report["config_sha256"] == config_sha256(report["qualify_options"])
    capsys.readouterr()

