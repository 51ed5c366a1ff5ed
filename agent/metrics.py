"""The agent's Prometheus metrics and the HTTP endpoint that serves them (``server.metrics_listen``).

Each agent has a ``CollectorRegistry`` of its own, never the process-wide default, so that several
agents in one process (the tests) never mix their figures. What changes with every frame is observed
on the pipeline's own threads, once per frame and model (a few microseconds: see README, "Metrics and
logs"); what the agent already knows (frames captured and dropped, subscribers, its state, the build)
is read only when Prometheus scrapes. The endpoint is plain HTTP on its own thread, started and stopped
with the server.

    or_agent_frames_total{outcome}                captured, published, dropped (by the source)
    or_agent_stage_latency_seconds{stage}         histogram: from the previous stage's mark to this stage's end
    or_agent_latency_seconds                      histogram: capture to publish
    or_agent_model_inference_seconds{model}       histogram: each model's backend run
    or_agent_subscribers{kind}                    overlay and alert streams open
    or_agent_alerts_total{rule,severity,kind}     alert events (raised, updated, cleared, acknowledged, reannounced)
    or_agent_source_reconnects_total              live source back after a loss
    or_agent_state{state}                         1 for the agent's state (IDLE, RUNNING, STALLED, ...), else 0
    or_agent_case_running                         1 while a case runs
    or_agent_gpu_memory_bytes{kind}               used and total, where NVML can say (absent otherwise)
    or_agent_build_info{version,model_set,...}    always 1: what the agent runs
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from or_agent.agent import VERSION
from or_agent.agent.alert_log import AlertRecord
from or_agent.agent.config import listen_host
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.messages import STAGE_MARKS, FrameResult, SourceEvent

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from or_agent.agent.service import AgentService
    from or_agent.pipelines.runtime import Pipeline

# seconds; a frame is due every 40 ms at 25 fps, and the budget from capture to publish is 50 ms
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
STATES = ("IDLE", "STARTING", "RUNNING", "STALLED", "SOURCE_LOST", "FAILED", "STOPPING")


class AgentMetrics:
    """One agent's metrics: ``attach`` each case's pipeline, ``alert_recorded`` as an ``AlertLog`` listener,
    ``serve`` / ``stop`` the endpoint."""

    def __init__(self, service: AgentService):
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        stage = Histogram("or_agent_stage_latency_seconds", "Time from the previous stage's mark to this stage's end, per frame",
                          ["stage"], registry=r, buckets=LATENCY_BUCKETS)
        self._stage_latency = [(a, b, stage.labels(stage=b)) for a, b in zip(STAGE_MARKS, STAGE_MARKS[1:])]
        self._latency = Histogram("or_agent_latency_seconds", "Capture to publish, per frame", registry=r,
                                  buckets=LATENCY_BUCKETS)
        model = Histogram("or_agent_model_inference_seconds", "Each model's backend run on a frame", ["model"],
                          registry=r, buckets=LATENCY_BUCKETS)
        self._inference = {m.name: model.labels(model=m.name) for m in service.model_info}
        self._model_histogram = model
        self._alerts = Counter("or_agent_alerts", "Alert events by rule, severity and kind", ["rule", "severity", "kind"],
                               registry=r)
        self._reconnects = Counter("or_agent_source_reconnects", "Live source back after a loss", registry=r)
        r.register(_ScrapeTime(self))
        self._lock = threading.Lock()
        self._pipeline: Pipeline | None = None
        self._earlier = {"captured": 0, "dropped": 0}  # of the cases before the current one
        self.published = 0  # written by the publish thread alone
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None
        self.port = 0

    # ----- a case's pipeline -------------------------------------------------------------------
    def attach(self, pipeline: Pipeline) -> None:
        """Observe a new case's pipeline (before it starts); the previous one's counts are kept."""
        with self._lock:
            self._earlier = self._frames_locked()
            self._pipeline = pipeline
        pipeline.subscribe(self.observe_result)
        pipeline.subscribe_events(self.observe_event)
        pipeline.observe_inference(self.observe_inference)

    def _frames_locked(self) -> dict[str, int]:
        p = self._pipeline
        if p is None:
            return dict(self._earlier)
        return {"captured": self._earlier["captured"] + p.frames_in,
                "dropped": self._earlier["dropped"] + int(getattr(p.source, "frames_dropped", 0))}

    def frames(self) -> dict[str, int]:
        with self._lock:
            counts = self._frames_locked()
        return {"captured": counts["captured"], "published": self.published, "dropped": counts["dropped"]}

    def observe_result(self, r: FrameResult) -> None:
        """On the publish thread, once per frame."""
        marks = r.marks_ns
        for a, b, histogram in self._stage_latency:
            if a in marks and b in marks:
                histogram.observe((marks[b] - marks[a]) / 1e9)
        if "capture" in marks and "publish" in marks:
            self._latency.observe((marks["publish"] - marks["capture"]) / 1e9)
        self.published += 1

    def observe_inference(self, model: str, seconds: float) -> None:
        histogram = self._inference.get(model)
        if histogram is None:
            histogram = self._inference[model] = self._model_histogram.labels(model=model)
        histogram.observe(seconds)

    def observe_event(self, e: SourceEvent) -> None:
        if e.kind == "reconnected":
            self._reconnects.inc()

    def alert_recorded(self, rec: AlertRecord) -> None:
        """An ``AlertLog`` listener."""
        self._alerts.labels(rule=rec.rule, severity=rec.severity, kind=rec.kind).inc()

    # ----- the endpoint ------------------------------------------------------------------------
    def serve(self, listen: str) -> int:
        """Serve ``GET /metrics`` on ``listen`` (HOST:PORT; port 0: any free one); returns the port."""
        from prometheus_client import start_http_server

        host = listen_host(listen, "server.metrics_listen", "127.0.0.1:9464")
        port = int(listen.rpartition(":")[2])
        try:
            http, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise InputError(f"server.metrics_listen: cannot listen on {listen} ({exc.strerror or exc})") from None
        thread.name = "metrics-http"
        self._http, self._http_thread = http, thread
        self.port = int(http.server_port)
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            if self._http_thread is not None:
                self._http_thread.join(timeout=5.0)
            self._http, self._http_thread = None, None


class _ScrapeTime:
    """What is read from the agent when Prometheus scrapes rather than counted as it happens."""

    def __init__(self, metrics: AgentMetrics):
        self.metrics = metrics

    def describe(self):
        return []  # read at scrape time: nothing to check against other collectors' names up front

    def collect(self):
        svc = self.metrics.service
        frames = CounterMetricFamily("or_agent_frames", "Frames captured from the source, published, and dropped by it",
                                     labels=["outcome"])
        for outcome, count in self.metrics.frames().items():
            frames.add_metric([outcome], count)
        yield frames
        subscribers = GaugeMetricFamily("or_agent_subscribers", "Open streams of displays", labels=["kind"])
        subscribers.add_metric(["overlay"], len(svc.fanout.subscribers))
        subscribers.add_metric(["alert"], svc.alert_streams)
        yield subscribers
        current = svc.state_name()
        state = GaugeMetricFamily("or_agent_state", "The agent's state: 1 for the current one", labels=["state"])
        for name in STATES + ((current,) if current not in STATES else ()):
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state
        session = svc.session
        running = session is not None and not session.stopped_unix_ms
        yield GaugeMetricFamily("or_agent_case_running", "1 while a case runs", value=1.0 if running else 0.0)
        gpu = gpu_memory()
        if gpu is not None:
            memory = GaugeMetricFamily("or_agent_gpu_memory_bytes", "GPU memory of device 0", labels=["kind"])
            memory.add_metric(["used"], gpu[0])
            memory.add_metric(["total"], gpu[1])
            yield memory
        model_set = svc.models.model_set
        info = GaugeMetricFamily("or_agent_build_info", "What the agent runs (always 1)",
                                 labels=["version", "model_set", "model_set_version", "models"])
        models = ",".join(f"{m.name}:{m.sha256[:12]}" for m in svc.model_info)
        info.add_metric([VERSION, model_set.name, model_set.version, models], 1.0)
        yield info


_nvml: list = []  # the initialised NVML module, once found; [None] where there is none


def gpu_memory() -> tuple[int, int] | None:
    """(used, total) bytes of GPU 0 through NVML (``nvidia-ml-py``), or None where it cannot say."""
    if not _nvml:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml.append(pynvml)
        except Exception:  # not installed, no driver, no GPU: the metric is absent
            _nvml.append(None)
    nvml = _nvml[0]
    if nvml is None:
        return None
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(0))
        return int(info.used), int(info.total)
    except Exception:
        return None
