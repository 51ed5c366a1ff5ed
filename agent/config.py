"""The agent's configuration file (TOML), validated with errors that name the key.

Every key, its meaning and its default is in ``agent/agent.example.toml``; a key that is not
known is an error (a typo must not silently fall back to a default in an operating room).

One model: each table is a frozen dataclass that checks its own keys (type, range, choices) when it is
made, whether from the file, the defaults or a command-line override, and the pipeline's table embeds
the runtime's own ``PipelineConfig`` (``pipeline.anatomy_every`` lives and is checked there alone).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from or_agent.agent.logs import FORMATS, LEVELS
from or_agent.agent.source_policy import check_entry
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.options import BACKENDS, FRAME_PATHS
from or_agent.pipelines.runtime import PipelineConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_plain_name(value) -> bool:
    """1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, and nothing else (not
    even a trailing newline): safe as a file name, a certificate name and an audit field, and no room
    for patient data. Case ids, display names and box names all follow it."""
    return isinstance(value, str) and _PLAIN_NAME.fullmatch(value) is not None


class _Section:
    """A configuration table: every key's type checked on construction (an int is taken for a float, a bool
    never for a number), no number negative, and the ranges the table names."""

    SECTION: ClassVar[str]
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = ()
    POSITIVE: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        for f in fields(self):  # type: ignore[arg-type]  # every subclass is a dataclass
            if f.default is MISSING:
                continue  # an embedded table checks itself
            value, expected = getattr(self, f.name), type(f.default)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, f.name, value)
            if expected is tuple and isinstance(value, list):  # a TOML array; kept as a tuple (frozen)
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                kind = "an array" if expected is tuple else expected.__name__
                raise InputError(f"{self.SECTION}.{f.name}: must be {kind}, got {value!r}")
            if expected in (int, float) and value < 0:
                raise InputError(f"{self.SECTION}.{f.name}: must not be negative, got {value}")
        for key in self.AT_LEAST_ONE:
            if getattr(self, key) < 1:
                raise InputError(f"{self.SECTION}.{key}: must be at least 1, got {getattr(self, key)}")
        for key in self.POSITIVE:
            if getattr(self, key) <= 0:
                raise InputError(f"{self.SECTION}.{key}: must be positive, got {getattr(self, key)}")
        self.check()

    def check(self) -> None:
        """What relates the table's keys to each other."""


@dataclass(frozen=True)
class ServerConfig(_Section):
    SECTION = "server"
    AT_LEAST_ONE = ("max_subscribers", "subscriber_queue", "alert_history", "max_receive_message_bytes",
                    "max_send_message_bytes")
    POSITIVE = ("keepalive_time_s", "keepalive_timeout_s", "behind_limit_s")

    listen: str = "127.0.0.1:50051"
    tls_cert: str = ""  # server certificate (PEM); required beyond loopback unless insecure
    tls_key: str = ""
    tls_ca: str = ""  # CA that signs the displays' client certificates
    require_client_auth: bool = True  # mutual TLS; only effective with TLS
    insecure: bool = False  # allow plaintext beyond loopback (logged as a warning at start)
    max_subscribers: int = 16
    max_receive_message_bytes: int = 64 * 1024  # requests are small; anything bigger is refused
    max_send_message_bytes: int = 16 * 1024 * 1024
    keepalive_time_s: float = 20.0
    keepalive_timeout_s: float = 10.0
    subscriber_queue: int = 8  # overlays buffered per display before the oldest is dropped
    behind_limit_s: float = 5.0  # a display whose next (or oldest unshown) overlay is this old is told RESOURCE_EXHAUSTED
    alert_history: int = 1000  # alert events kept for reconnecting displays
    shutdown_grace_s: float = 2.0
    # revocation list written by `or-agent certs revoke`; default: revoked.txt beside tls_ca, if it is there
    tls_revoked: str = ""
    # roles under mutual TLS: the display names (certificate CNs) that may start and stop cases, and that
    # may acknowledge alerts; "*" is every display certificate of tls_ca (viewing needs only a certificate)
    may_start_stop: tuple = ("*",)
    may_acknowledge: tuple = ("*",)
    # displays (certificate CNs under mutual TLS, else client ids) that always get an overlay slot: when
    # every slot is taken, the stalest other display gives its own up
    reserved_displays: tuple = ()
    # HOST:PORT of the Prometheus metrics endpoint (plain HTTP, agent.metrics); "" turns it off.
    # Loopback only unless insecure: it says what the box runs and how it is doing, to anyone who asks
    metrics_listen: str = ""

    @property
    def mutual_tls(self) -> bool:
        """Whether a display is known by its certificate (TLS with client certificates required)."""
        return bool(self.tls_cert and self.require_client_auth)

    def check(self) -> None:
        host = listen_host(self.listen)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InputError("server.tls_cert and server.tls_key: give both or neither")
        if not self.tls_cert and not is_loopback(host) and not self.insecure:
            raise InputError(f"server.listen: {self.listen} is beyond loopback, so TLS is required: set server.tls_cert, "
                             "server.tls_key and server.tls_ca (see `or-agent certs`), or server.insecure = true")
        if self.tls_cert and self.require_client_auth and not self.tls_ca:
            raise InputError("server.tls_ca: mutual TLS (server.require_client_auth) needs the CA of the displays' certificates")
        for key in ("may_start_stop", "may_acknowledge"):
            names = getattr(self, key)
            bad = [n for n in names if n != "*" and not is_plain_name(n)]
            if bad:
                raise InputError(f"server.{key}: display names (1-64 letters, digits, '.', '_' or '-') or \"*\", got {bad[0]!r}")
            if "*" not in names and not self.mutual_tls:
                raise InputError(f"server.{key}: roles need mutual TLS (server.tls_cert, tls_key, tls_ca and "
                                 "require_client_auth): without a client certificate a display's name is only what it claims")
        bad = [n for n in self.reserved_displays if not is_plain_name(n)]
        if bad:
            raise InputError(f"server.reserved_displays: display names (1-64 letters, digits, '.', '_' or '-'), got {bad[0]!r}")
        if len(self.reserved_displays) >= self.max_subscribers:
            raise InputError(f"server.reserved_displays: {len(self.reserved_displays)} reserved slots leave none of the "
                             f"{self.max_subscribers} (max_subscribers) for other displays")
        if self.tls_revoked and not self.mutual_tls:
            raise InputError("server.tls_revoked: a revocation list needs mutual TLS (server.tls_cert, tls_key, tls_ca "
                             "and require_client_auth)")
        if self.metrics_listen:
            metrics_host = listen_host(self.metrics_listen, "server.metrics_listen", "127.0.0.1:9464")
            if not is_loopback(metrics_host) and not self.insecure:
                raise InputError(f"server.metrics_listen: {self.metrics_listen} is beyond loopback and the metrics endpoint is "
                                 "plain HTTP: keep it on loopback (a Prometheus on the box, or an SSH tunnel), "
                                 "or set server.insecure = true")


@dataclass(frozen=True)
class CaseConfig(_Section):
    SECTION = "case"

    source: str = ""  # started at launch when set: file, camera index, /dev/videoN, rtsp:// URL
    case_id: str = ""
    paced: bool = True  # files replay at their native rate, as a live feed would arrive
    # what StartCase may open besides the launch source and the box's capture devices: absolute
    # directories or files, stream URL prefixes (agent.source_policy)
    allowed_sources: tuple = ()

    def check(self) -> None:
        if self.case_id and not is_plain_name(self.case_id):
            raise InputError(f"case.case_id: use 1-64 letters, digits, '.', '_' or '-' (no patient data), got {self.case_id!r}")
        for entry in self.allowed_sources:
            problem = check_entry(entry)
            if problem is not None:
                raise InputError(f"case.allowed_sources: {problem}")


# keys earlier versions read, with what replaced them: an old config file gets that, not "unknown key"
RETIRED_KEYS = {
    "pipeline.models_dir": "renamed to pipeline.models (a model set's name or folder, or a models directory)",
    "pipeline.phase_rate_hz": "no longer set here: the phase model's manifest declares its rate (cadence)",
}
# the [pipeline] keys that belong to the runtime's own configuration (PipelineSettings.runtime)
RUNTIME_KEYS = ("anatomy_every",)


def runtime_config(**values: Any) -> PipelineConfig:
    """The runtime's configuration from [pipeline] keys, its errors named as config keys."""
    try:
        return PipelineConfig(**values)
    except InputError as exc:
        raise InputError(f"pipeline.{exc}") from None


@dataclass(frozen=True)
class PipelineSettings(_Section):
    SECTION = "pipeline"
    POSITIVE = ("stale_after_s",)

    models: str = ""  # a model set's name or folder, or a models directory; default $OR_AGENT_MODELS or the set "synthetic"
    backend: str = "auto"  # auto (TensorRT where an engine for this GPU exists, else ONNX Runtime), onnxruntime, tensorrt
    engine_cache: str = ""  # TensorRT engines; default $OR_AGENT_ENGINE_CACHE or ~/.cache/or-agent/engines
    preprocessing: str = "auto"  # auto (GPU kernels where a model runs on TensorRT, else CPU), cpu, gpu
    cuda_graphs: bool = False  # TensorRT engines replayed as CUDA graphs (less launch overhead per step)
    build_engines_live: bool = False  # build missing TensorRT engines when the agent starts (minutes) instead of refusing
    stale_after_s: float = 1.0  # no fresh result for this long: AI unavailable, health NOT_SERVING
    runtime: PipelineConfig = field(default_factory=PipelineConfig)  # [pipeline] anatomy_every and the runtime's own

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"pipeline.backend: must be auto, onnxruntime or tensorrt, got {self.backend!r}")
        if self.preprocessing not in FRAME_PATHS:
            raise InputError(f"pipeline.preprocessing: must be auto, cpu or gpu, got {self.preprocessing!r}")


@dataclass(frozen=True)
class AlertSettings(_Section):
    SECTION = "alerts"
    POSITIVE = ("time_scale", "reannounce_s")

    rules_file: str = ""  # decision-support rules (TOML); default: the built-in cholecystectomy set
    time_scale: float = 1.0  # divides the phase-duration limits (for time-compressed synthetic videos)
    reannounce_s: float = 30.0  # an unacknowledged critical alert is announced again this often


@dataclass(frozen=True)
class AuditSettings(_Section):
    SECTION = "audit"

    directory: str = "audit"  # the hash-chained audit trail; "" turns it off (not for clinical use)
    max_bytes: int = 10 * 1024 * 1024  # rotate files at this size
    retention_days: int = 0  # remove whole files whose last record is older than this; 0: keep forever
    retention_mb: int = 0  # remove the oldest whole files while the trail is bigger than this; 0: no limit

    def check(self) -> None:
        if self.max_bytes < 4096:
            raise InputError(f"audit.max_bytes: must be at least 4096, got {self.max_bytes}")


@dataclass(frozen=True)
class ModelStoreSettings(_Section):
    SECTION = "models"

    store: str = ""  # installed model sets (or-agent models install); default: agent.model_store.default_store_dir()
    trusted_keys: tuple = ()  # ed25519 public keys (PEM); when set, only sets signed by one of them install


@dataclass(frozen=True)
class LoggingSettings(_Section):
    SECTION = "logging"

    level: str = "info"  # debug, info, warning, error (or-agent --log-level)
    format: str = "text"  # text, or json: one object a line with the case id (or-agent --log-format)

    def check(self) -> None:
        if self.level not in LEVELS:
            raise InputError(f"logging.level: must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.format not in FORMATS:
            raise InputError(f"logging.format: must be text or json, got {self.format!r}")


@dataclass(frozen=True)
class AgentConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    case: CaseConfig = field(default_factory=CaseConfig)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    models: ModelStoreSettings = field(default_factory=ModelStoreSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    def with_overrides(self, **dotted: Any) -> AgentConfig:
        """Command-line overrides as {"server.listen": "0.0.0.0:50051", ...}; None means not given. Each
        table is checked again as it is remade."""
        by_section: dict[str, dict[str, Any]] = {}
        for key, value in dotted.items():
            if value is not None:
                section, name = key.split(".")
                by_section.setdefault(section, {})[name] = value
        cfg = self
        for section, values in by_section.items():  # a table's keys together: they are checked as one
            table = getattr(cfg, section)
            runtime = {k: values.pop(k) for k in list(values) if section == "pipeline" and k in RUNTIME_KEYS}
            if runtime:
                values["runtime"] = runtime_config(**{**asdict(table.runtime), **runtime})
            cfg = replace(cfg, **{section: replace(table, **values)})
        return cfg


def listen_host(listen: str, key: str = "server.listen", example: str = "127.0.0.1:50051") -> str:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise InputError(f"{key}: expected HOST:PORT such as {example}, got {listen!r}")
    return host.strip("[]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


SECTIONS = {"server": ServerConfig, "case": CaseConfig, "pipeline": PipelineSettings, "alerts": AlertSettings,
            "audit": AuditSettings, "models": ModelStoreSettings, "logging": LoggingSettings}


def load_config(path: str | Path | None) -> AgentConfig:
    if path is None:
        return AgentConfig()
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    parts = {}
    for section, value in doc.items():
        if section not in SECTIONS:
            raise InputError(f"{path}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(value, dict):
            raise InputError(f"{path}: {section}: must be a table")
        known = {f.name for f in fields(SECTIONS[section]) if f.name != "runtime"}
        known |= set(RUNTIME_KEYS) if section == "pipeline" else set()
        for key in value:
            if f"{section}.{key}" in RETIRED_KEYS:
                raise InputError(f"{path}: {section}.{key}: {RETIRED_KEYS[f'{section}.{key}']}")
            if key not in known:
                raise InputError(f"{path}: {section}.{key}: unknown key (known: {', '.join(sorted(known))})")
        try:
            if section == "pipeline":
                runtime = runtime_config(**{k: v for k, v in value.items() if k in RUNTIME_KEYS})
                value = {**{k: v for k, v in value.items() if k not in RUNTIME_KEYS}, "runtime": runtime}
            parts[section] = SECTIONS[section](**value)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
    return AgentConfig(**parts)
