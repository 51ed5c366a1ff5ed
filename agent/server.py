"""``or-agent serve``: the source, the pipeline and the gRPC server in one process.

TLS and, by default, mutual TLS whenever the server listens beyond loopback; plaintext only on
loopback or with ``server.insecure`` (logged as a warning at start). Standard health and reflection
services are served beside ``oragent.v1.OrAgent``. SIGINT/SIGTERM shut down gracefully: streams are
ended with a status, the case is stopped, the models released. SIGHUP reloads the configuration file
(``agent.reload`` says which keys take effect at once, from the next case, or after a restart).

Health names (``grpc.health.v1``): ``oragent.v1.OrAgent/liveness`` is SERVING while the process serves
(NOT_SERVING only once it is shutting down); ``oragent.v1.OrAgent/readiness``, ``oragent.v1.OrAgent`` and
``""`` are SERVING only while the AI produces fresh results. Under systemd (``agent.systemd``) the agent
says READY once serving, pings the watchdog while its event loop, fail-safe and pipeline are alive, and
keeps STATUS current.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from or_agent.agent.access import Access
from or_agent.agent.config import AgentConfig, is_loopback, listen_host
from or_agent.agent.failsafe import Failsafe
from or_agent.agent.handlers import SERVICE_NAME, OrAgentHandlers, generic_handler
from or_agent.agent.reload import ReloadPlan, plan_reload
from or_agent.agent.service import AgentService, config_digest
from or_agent.agent.session import CaseSpec, LoadedModels
from or_agent.agent.source_policy import SourcePolicy
from or_agent.agent.systemd import Notifier, SystemdLink, watchdog_interval_s
from or_agent.pipelines.errors import InputError, OrAgentError

if TYPE_CHECKING:
    from or_agent.agent.metrics import AgentMetrics

log = logging.getLogger("or-agent.server")
# for grpc_health_probe -service NAME: the process is up / the AI produces fresh results
LIVENESS = f"{SERVICE_NAME}/liveness"
READINESS = f"{SERVICE_NAME}/readiness"


def _credentials(cfg) -> grpc.ServerCredentials | None:
    s = cfg.server
    if not s.tls_cert:
        return None
    from or_agent.agent.certs import server_credentials

    return server_credentials(Path(s.tls_cert), Path(s.tls_key), Path(s.tls_ca) if s.tls_ca else None,
                              require_client_auth=s.require_client_auth)


class AgentServer:
    """Owns the gRPC server, the service state and the fail-safe; ``start``/``stop``."""

    def __init__(self, config: AgentConfig, models: LoadedModels | None = None):
        self.config = config
        p = config.pipeline
        self.access = Access(config.server)  # reads the revocation list: a bad one stops the start here
        self.models = models or LoadedModels(p.models or None, backend=p.backend, cache_dir=p.engine_cache or None,
                                             live_session=True, preprocessing=p.preprocessing,
                                             cuda_graphs=p.cuda_graphs, build_engines_live=p.build_engines_live)
        self.server: grpc.aio.Server | None = None
        self.service: AgentService | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._failsafe: Failsafe | None = None
        self.handlers: OrAgentHandlers | None = None
        self.metrics: AgentMetrics | None = None  # with server.metrics_listen: this agent's registry and endpoint

    async def start(self) -> int:
        cfg = self.config.server
        loop = asyncio.get_running_loop()
        self.service = AgentService(self.config, self.models, loop)
        self.service.health_hook = self._set_health
        if cfg.metrics_listen:
            from or_agent.agent.metrics import AgentMetrics  # prometheus_client only where metrics are served

            self.metrics = self.service.metrics = AgentMetrics(self.service)
            self.service.alerts.listen(self.metrics.alert_recorded)
        self.service.start_workers()
        options = [
            ("grpc.max_receive_message_length", cfg.max_receive_message_bytes),
            ("grpc.max_send_message_length", cfg.max_send_message_bytes),
            ("grpc.keepalive_time_ms", int(cfg.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout_s * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_concurrent_streams", 4 * cfg.max_subscribers + 16),
            # bind exclusively: with SO_REUSEPORT a second agent on the same port would silently take half
            # of the displays' connections
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.aio.server(options=options)
        self.handlers = OrAgentHandlers(self.service, self.access)
        self.server.add_generic_rpc_handlers((generic_handler(self.handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        creds = _credentials(self.config)
        host = listen_host(cfg.listen)
        try:
            if creds is None:
                if not is_loopback(host):
                    log.warning("INSECURE: serving plaintext on %s beyond loopback (server.insecure = true)", cfg.listen)
                self.port = self.server.add_insecure_port(cfg.listen)
            else:
                self.port = self.server.add_secure_port(cfg.listen, creds)
        except RuntimeError:  # grpc's "Failed to bind to address"
            self.port = 0
        if self.port == 0:
            await self.stop()  # the service's workers and the models, started above, are released
            raise InputError(f"server.listen: cannot listen on {cfg.listen} (address in use or not available)")
        if self.metrics is not None:
            try:
                self.metrics.serve(cfg.metrics_listen)
            except InputError:
                await self.stop()
                raise
            log.info("metrics on http://%s:%d/metrics", listen_host(cfg.metrics_listen), self.metrics.port)
        await self.server.start()
        await self._set_health(False)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        self._failsafe = Failsafe(self.service, self._set_health)
        self._failsafe.start()
        mode = "plaintext" if creds is None else ("mutual TLS" if cfg.require_client_auth else "TLS")
        log.info("serving %s on %s (port %d, %s)", SERVICE_NAME, listen_host(cfg.listen), self.port, mode)
        if self.config.case.source:
            case_id = self.config.case.case_id or time.strftime("case-%Y%m%d-%H%M%S")
            await self.service.start_case(CaseSpec(self.config.case.source, case_id, self.config.case.paced))
        return self.port

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)
        await self.health.set(READINESS, status)

    async def stop(self) -> None:
        if self.service is None:
            return
        self.service.begin_shutdown()
        await self._set_health(False)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.service.fanout.end_streams()  # each overlay stream ends with OK after what it had queued
        if self._failsafe is not None:
            await self._failsafe.stop()  # it may be stopping a case: let that finish before we do
        await self.server.stop(self.config.server.shutdown_grace_s)
        await self.service.stop_case()
        self.service.stop_workers()
        self.models.close()
        if self.metrics is not None:
            self.metrics.stop()

    def reload(self, loaded: AgentConfig) -> ReloadPlan:
        """Run with ``loaded`` (a configuration file just read and validated) as far as it can change while
        serving; raises ``InputError`` (and changes nothing) if it cannot be applied. Recorded in the audit trail."""
        assert self.service is not None and self.handlers is not None, "reload before start"
        plan = plan_reload(self.config, loaded)
        cfg = plan.config
        # everything that can fail is made before anything is swapped in: a bad file changes nothing
        access = Access(cfg.server)
        rules = self.models.rules(cfg.alerts.rules_file or None, overrides={"phase_too_long": {"time_scale": cfg.alerts.time_scale}})
        sources = SourcePolicy(cfg.case.allowed_sources, cfg.case.source)
        self.config = self.service.config = cfg
        self.access = self.handlers.access = access
        self.handlers.sources = sources
        self.service.rules = rules
        if {"logging.level", "logging.format"} & set(plan.applied):
            from or_agent.agent.logs import configure_logging

            configure_logging(cfg.logging.level, cfg.logging.format)
        self.service.audit("config_reload", {"config_sha256": config_digest(cfg), "applied": list(plan.applied),
                                             "next_case": list(plan.next_case), "restart_needed": list(plan.restart)})
        return plan

    def probe(self) -> tuple[str, str, float, bool, bool]:
        """For the systemd link: (state, case id, fps, fail-safe loop alive, pipeline alive)."""
        svc = self.service
        if svc is None:
            return "STARTING", "", 0.0, True, True
        session = svc.session
        running = session is not None and not session.stopped_unix_ms
        failsafe_alive = self._failsafe is not None and self._failsafe.alive
        pipeline_alive = not running or session.finished or session.pipeline.threads_alive
        return (svc.state_name(), session.spec.case_id if running else "", svc.recent_fps() if running else 0.0,
                failsafe_alive, pipeline_alive)


def reload_from_file(server: AgentServer, reload_config: Callable[[], AgentConfig] | None, notifier: Notifier) -> None:
    """SIGHUP: read and validate the configuration file again and apply what can change while serving; a
    bad file changes nothing and is logged in one line. Either way the audit trail records it."""
    if reload_config is None:
        log.warning("SIGHUP: no configuration file to reload (serve was started without --config)")
        return
    notifier.reloading()
    try:
        plan = server.reload(reload_config())
    except OrAgentError as exc:
        log.error("configuration not reloaded, the running one stays in force: %s", exc)
        assert server.service is not None
        server.service.audit("config_reload_refused", {"reason": str(exc)[:1000]})
        notifier.ready(f"configuration not reloaded: {exc}")  # READY=1 ends systemd's reloading state
        return
    if not plan.changed:
        log.info("configuration reloaded: nothing changed")
    if plan.applied:
        log.warning("configuration reloaded: %s in force now", ", ".join(plan.applied))
    if plan.next_case:
        log.warning("configuration reloaded: %s in force from the next case", ", ".join(plan.next_case))
    if plan.restart:
        log.warning("configuration reloaded: %s changed but need a restart (running values kept)", ", ".join(plan.restart))
    notifier.ready("configuration reloaded" + (f"; restart needed for {', '.join(plan.restart)}" if plan.restart else ""))


async def serve_forever(config: AgentConfig, reload_config: Callable[[], AgentConfig] | None = None,
                        notifier: Notifier | None = None) -> int:
    """Serve until SIGINT or SIGTERM; SIGHUP reloads through ``reload_config`` (the file serve was started
    with, and its command-line overrides). ``notifier``: systemd's socket (default: from the environment)."""
    notifier = notifier or Notifier.from_environment()
    server = AgentServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # a reload runs on the event loop, between two callbacks: never beside a request or the fail-safe
    loop.add_signal_handler(signal.SIGHUP, reload_from_file, server, reload_config, notifier)
    link = SystemdLink(notifier, server.probe, watchdog_interval_s())
    try:
        await server.start()
        print(f"or-agent serving on {listen_host(config.server.listen)}:{server.port}", flush=True)
        if server.metrics is not None:
            print(f"metrics on http://{listen_host(config.server.metrics_listen)}:{server.metrics.port}/metrics", flush=True)
        notifier.ready(f"serving on port {server.port}")
        link.start()
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            notifier.stopping("shutting down")
            await link.stop()
            await server.stop()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        notifier.close()
    return 0
