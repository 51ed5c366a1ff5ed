"""What a configuration reload (SIGHUP) may change while the agent runs, and what needs a restart.

Pure: ``plan_reload`` compares the running configuration with a newly loaded (and so already validated)
one and returns the configuration to run with: the new values of the keys that are safe to change
while serving, the running values of every other key. The server applies it (``AgentServer.reload``).

- applied at once: who may do what and which displays are reserved, how many displays and how far
  behind, the revocation list's path, what StartCase may open, the log level and format;
- applied from the next case: the alert rules and their settings, ``stale_after_s`` and
  ``anatomy_every`` (a running case keeps what it started with, so its alerts stay consistent);
- everything else needs a restart: the listen address and TLS files (the gRPC server's sockets), the
  models and backends (loaded once), the audit trail's directory, the queues and histories sized at
  start, and the launch case (``[case] source``, ``case_id``, ``paced``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from or_agent.agent.config import RUNTIME_KEYS, AgentConfig, runtime_config
from or_agent.pipelines.errors import InputError

LIVE_KEYS = frozenset({
    "server.reserved_displays", "server.max_subscribers", "server.behind_limit_s", "server.may_start_stop",
    "server.may_acknowledge", "server.tls_revoked", "case.allowed_sources", "logging.level", "logging.format",
})
NEXT_CASE_KEYS = frozenset({
    "alerts.rules_file", "alerts.time_scale", "alerts.reannounce_s", "pipeline.stale_after_s",
    *(f"pipeline.{k}" for k in RUNTIME_KEYS),
})


def flat(config: AgentConfig) -> dict[str, Any]:
    """Every key as ``table.key`` (the runtime's own [pipeline] keys under ``pipeline.``)."""
    out: dict[str, Any] = {}
    for table in fields(config):
        for key, value in asdict(getattr(config, table.name)).items():
            if key == "runtime":
                out.update({f"pipeline.{k}": value[k] for k in RUNTIME_KEYS})
            else:
                out[f"{table.name}.{key}"] = tuple(value) if isinstance(value, list) else value
    return out


@dataclass(frozen=True)
class ReloadPlan:
    config: AgentConfig  # what the agent runs with after the reload
    applied: tuple[str, ...]  # changed keys in force at once
    next_case: tuple[str, ...]  # changed keys in force from the next case
    restart: tuple[str, ...]  # changed keys kept at their running values until a restart

    @property
    def changed(self) -> bool:
        return bool(self.applied or self.next_case or self.restart)


def plan_reload(running: AgentConfig, loaded: AgentConfig) -> ReloadPlan:
    """The configuration to run with after reloading ``loaded``. Raises ``InputError`` when the keys that
    can change, with the others kept as they run, do not make a valid configuration (e.g. roles that
    need mutual TLS turned on only in the new file)."""
    old, new = flat(running), flat(loaded)
    changed = sorted(k for k in old if old[k] != new[k])
    take = [k for k in changed if k in LIVE_KEYS or k in NEXT_CASE_KEYS]
    by_table: dict[str, dict[str, Any]] = {}
    for key in take:
        table, name = key.split(".")
        by_table.setdefault(table, {})[name] = new[key]
    config = running
    try:
        for table, values in by_table.items():
            section = getattr(config, table)
            runtime = {k: values.pop(k) for k in list(values) if table == "pipeline" and k in RUNTIME_KEYS}
            if runtime:
                values["runtime"] = runtime_config(**{**asdict(section.runtime), **runtime})
            config = replace(config, **{table: replace(section, **values)})
    except InputError as exc:
        restart = [k for k in changed if k not in take]
        raise InputError(f"{exc} (with {', '.join(restart)} kept as running until a restart)" if restart else str(exc)) from None
    return ReloadPlan(config, tuple(k for k in take if k in LIVE_KEYS), tuple(k for k in take if k in NEXT_CASE_KEYS),
                      tuple(k for k in changed if k not in take))
