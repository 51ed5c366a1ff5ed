"""``or-agent config check FILE``: is this configuration one ``serve`` would start with? Nothing is started.

The same checks ``serve`` makes before it listens, in the same order, with the same one-line errors: every
table and key, the TLS files (readable, parseable, the private key not readable by others), the revocation
list, the model set (manifests and each model file's sha256), the alert rules against the set's outputs,
the launch source, and the audit directory. Backends and engines are not loaded: that needs the box's GPU
and takes time (``or-agent doctor`` and ``qualify`` check them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from or_agent.agent.config import AgentConfig, is_loopback, listen_host, load_config
from or_agent.pipelines.errors import InputError


@dataclass(frozen=True)
class ConfigReport:
    config: AgentConfig
    lines: tuple[str, ...]  # what it would run with, one fact a line


def _tls(cfg: AgentConfig) -> str:
    s = cfg.server
    if not s.tls_cert:
        where = "loopback" if is_loopback(listen_host(s.listen)) else "beyond loopback (server.insecure)"
        return f"plaintext on {where}"
    from or_agent.agent.certs import server_credentials

    server_credentials(Path(s.tls_cert), Path(s.tls_key), Path(s.tls_ca) if s.tls_ca else None,
                       require_client_auth=s.require_client_auth)
    return "mutual TLS" if s.mutual_tls else "TLS (no client certificates)"


def _audit(directory: str) -> str:
    if not directory:
        return "audit trail off (audit.directory = \"\"; not for clinical use)"
    path = Path(directory)
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"audit.directory: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"audit.directory: {path} cannot be {'written' if existing == path.absolute() else 'created'} by this user")
    return f"audit trail in {path}" + ("" if path.is_dir() else " (made at start)")


def _launch_source(source: str) -> str:
    if not source:
        return "no case at launch"
    if source.isdigit() or "://" in source:
        return "a case at launch on a camera or stream"
    if not Path(source).exists():
        raise InputError(f"case.source: {source}: no such file or device")
    return "a case at launch on a file or device"


def check_config(path: str | Path) -> ConfigReport:
    """Validate ``path`` as ``serve`` would; raises ``OrAgentError`` naming the first problem."""
    from or_agent.agent.access import Access
    from or_agent.pipelines.model_set import load_model_set
    from or_agent.pipelines.rules import load_rules, system_rules

    cfg = load_config(path)
    mode = _tls(cfg)
    Access(cfg.server)  # reads the revocation list, as serve does
    s = load_model_set(cfg.pipeline.models or None, verify=True)
    rules = load_rules(cfg.alerts.rules_file or s.rules_file, {"phase_too_long": {"time_scale": cfg.alerts.time_scale}},
                       vocabulary=s.outputs, owner=f"model set {s.name!r}")
    lines = (
        f"listen {cfg.server.listen}, {mode}",
        f"models: set {s.name} {s.version}, {len(s.models)} models, backend {cfg.pipeline.backend}",
        f"rules: {len(rules)} from {cfg.alerts.rules_file or s.rules_file.name}, and {len(system_rules())} system rules",
        _audit(cfg.audit.directory),
        _launch_source(cfg.case.source),
    )
    return ConfigReport(cfg, lines)
