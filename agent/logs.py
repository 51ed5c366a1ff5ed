"""The agent's log lines: level, text or JSON (one object a line, for journald and ELK), and the case id.

``configure_logging`` installs one handler on the root logger (replacing the one it installed before,
so a second call changes the format rather than doubling every line). The running case's id is the
process's, set by the service when a case starts and cleared when it stops: log lines come from the
pipeline's threads, gRPC's and the event loop, so a context variable, which each thread sees apart,
would miss most of them. A JSON line is ``json.dumps``'d whole, so a string a client sent can never
end a line and forge another.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from or_agent.pipelines.errors import InputError

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_case_id = ""  # the running case's, or "": one agent per process


def set_case(case_id: str) -> None:
    """The case whose id every log line carries from now on ("" when none runs)."""
    global _case_id
    _case_id = case_id


def current_case() -> str:
    return _case_id


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, ``case_id``
    (null outside a case), and ``exception`` / ``stack`` when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        millis = int((record.created - seconds) * 1000)
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
                "case_id": getattr(record, "case_id", None) or _case_id or None}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is written (a test's captured stream, a
    redirected one), not to the one there was when logging was set up."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


_installed: logging.Handler | None = None


def configure_logging(level: str = "warning", fmt: str = "text") -> logging.Handler:
    """Log at ``level`` and above to standard error, as ``fmt`` lines; returns the handler installed."""
    global _installed
    if level not in LEVELS:
        raise InputError(f"log level: must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise InputError(f"log format: must be text or json, got {fmt!r}")
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    _installed = handler
    return handler
