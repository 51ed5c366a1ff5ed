"""``or-agent serve``: the source, the pipeline and the gRPC server in one process.

TLS and, by default, mutual TLS whenever the server listens beyond loopback; plaintext only on
loopback or with ``server.insecure`` (logged as a warning at start). Standard health and reflection
services are served beside ``oragent.v1.OrAgent``. SIGINT/SIGTERM shut down gracefully: streams are
ended with a status, the case is stopped, the models released.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from or_agent.agent.access import Access
from or_agent.agent.config import AgentConfig, is_loopback, listen_host
from or_agent.agent.failsafe import Failsafe
from or_agent.agent.handlers import SERVICE_NAME, OrAgentHandlers, generic_handler
from or_agent.agent.service import AgentService
from or_agent.agent.session import CaseSpec, LoadedModels
from or_agent.pipelines.errors import InputError

log = logging.getLogger("or-agent.server")


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

    async def start(self) -> int:
        cfg = self.config.server
        loop = asyncio.get_running_loop()
        self.service = AgentService(self.config, self.models, loop)
        self.service.health_hook = self._set_health
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
        self.server.add_generic_rpc_handlers((generic_handler(OrAgentHandlers(self.service, self.access)),))
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
        await self.server.start()
        await self._set_health(False)
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

    async def stop(self) -> None:
        if self.service is None:
            return
        self.service.begin_shutdown()
        await self._set_health(False)
        self.service.fanout.end_streams()  # each overlay stream ends with OK after what it had queued
        if self._failsafe is not None:
            await self._failsafe.stop()  # it may be stopping a case: let that finish before we do
        await self.server.stop(self.config.server.shutdown_grace_s)
        await self.service.stop_case()
        self.service.stop_workers()
        self.models.close()


async def serve_forever(config: AgentConfig) -> int:
    server = AgentServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"or-agent serving on {listen_host(config.server.listen)}:{server.port}", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.stop()
    return 0
