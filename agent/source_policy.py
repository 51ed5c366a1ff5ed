"""Which sources a display may start a case on (``[case] allowed_sources``), and how a source is named
to the outside.

``StartCase`` names a source chosen by a client; without a limit it would open any path on the box (an
image folder anywhere is streamed back as JPEG) or any URL the box can reach. So a source must match
the allow-list, after resolving it the way the operating system will (``realpath``: no ``..`` or
symbolic link leads out of an allowed directory), and anything else gets one refusal,
``NOT_ALLOWED``, the same whether or not the path exists and whatever it is, so that the answer tells
nothing about the box's files.

Always allowed: the source configured at launch (``[case] source`` or ``--source``: the operator chose
it on the box) and the box's own capture devices (a camera index, or a path that resolves to
``/dev/videoN``). ``allowed_sources`` adds, each entry one of:

* an absolute directory: any file or image folder inside it (after resolving);
* an absolute file: that file;
* a camera index or device path (redundant: capture devices are always allowed);
* a URL prefix (``rtsp://camera-1.or3/live/``): streams of that scheme, host and port whose path
  starts with the prefix's path at a ``/``; credentials in either are ignored in the match, and a
  path with ``.`` or ``..`` segments is refused.

Outside the agent a source is shown by ``public_name``: a file or folder by its name alone (a full
path can carry a patient's name), a device as it is, a URL without its credentials and query.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

from or_agent.pipelines.errors import InputError

NOT_ALLOWED = "source not allowed: add it to [case] allowed_sources on the agent"
# the stream schemes the sources open (pipelines.sources.STREAM_SCHEMES, kept in step by a test)
STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https", "rtmp")
_VIDEO_DEVICE = re.compile(r"/dev/video[0-9]+")


class SourceNotAllowed(InputError):
    """A source outside the allow-list; its message is always ``NOT_ALLOWED``."""

    def __init__(self) -> None:
        super().__init__(NOT_ALLOWED)


def check_entry(entry: object) -> str | None:
    """What is wrong with an ``allowed_sources`` entry, or None."""
    if not isinstance(entry, str) or not entry.strip():
        return f"must be a non-empty string, got {entry!r}"
    if entry.isdigit() or "://" in entry:
        if "://" in entry and _url_key(entry) is None:
            return (f"{_without_credentials(entry)!r} is not a stream URL prefix "
                    f"({', '.join(STREAM_SCHEMES)} with a host, no '.' or '..' in its path)")
        return None
    if not os.path.isabs(entry):
        return f"{entry!r} is not an absolute path, a camera index or a stream URL prefix"
    return None


def _realpath(path: str) -> str | None:
    try:
        return os.path.realpath(path)
    except (ValueError, OSError):  # an embedded NUL byte, a symbolic link loop
        return None


def _url_key(url: str) -> tuple[str, str, int | None, str, str] | None:
    """(scheme, host, port, path, query) of a stream URL, credentials left out; None if it is not one
    or its path climbs ('.' or '..' segments, also percent-encoded)."""
    try:
        parts = urlsplit(url)
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in STREAM_SCHEMES or not host:
        return None
    if any(seg in (".", "..") for seg in unquote(parts.path).replace("\\", "/").split("/")):
        return None
    return scheme, host, port, parts.path, parts.query


def _without_credentials(url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "(not a URL)"
    return f"{parts.scheme}://{host}{parts.path}"


def public_name(spec: str) -> str:
    """How a source is named outside the agent (status, case info, logs, alerts, the audit trail): a
    file or folder by its name only, a device as it is, a URL without credentials or query."""
    spec = spec.strip()
    if spec.isdigit() or _VIDEO_DEVICE.fullmatch(spec) or spec.startswith("/dev/v4l/"):
        return spec
    if "://" in spec:
        return _without_credentials(spec)
    return os.path.basename(spec.rstrip("/")) or spec


class SourcePolicy:
    """The allow-list, resolved once when the agent starts."""

    def __init__(self, allowed: Iterable[str] = (), launch_source: str = ""):
        self.paths: list[str] = []
        self.urls: list[tuple[str, str, int | None, str, str]] = []
        self.exact_urls: set[str] = set()
        for entry in allowed:
            self._add(entry)
        launch = launch_source.strip()
        if launch and not launch.isdigit():
            if "://" in launch:
                self.exact_urls.add(launch)
            else:
                real = _realpath(launch)
                if real is not None:
                    self.paths.append(real)  # that file (or folder) exactly, and what lies inside a folder

    def _add(self, entry: str) -> None:
        entry = entry.strip()
        if entry.isdigit():
            return  # capture devices are always allowed
        if "://" in entry:
            key = _url_key(entry)
            if key is not None:
                self.urls.append(key)
            return
        real = _realpath(entry)
        if real is not None:
            self.paths.append(real)

    def admit(self, spec: str) -> str:
        """The source to open for ``spec`` (a path resolved), or ``SourceNotAllowed``. An empty spec is
        returned as it is, for the case's own check to name."""
        spec = spec.strip()
        if not spec or spec.isdigit():
            return spec
        if "://" in spec:
            if spec in self.exact_urls or self._url_allowed(spec):
                return spec
            raise SourceNotAllowed()
        real = _realpath(spec)
        if real is None:
            raise SourceNotAllowed()
        if _VIDEO_DEVICE.fullmatch(real) or any(real == p or real.startswith(p.rstrip("/") + "/") for p in self.paths):
            return real
        raise SourceNotAllowed()

    def _url_allowed(self, url: str) -> bool:
        key = _url_key(url)
        if key is None:
            return False
        scheme, host, port, path, query = key
        for p_scheme, p_host, p_port, p_path, p_query in self.urls:
            if (scheme, host, port) != (p_scheme, p_host, p_port):
                continue
            if p_query:  # a prefix with a query names one stream exactly
                if (path, query) == (p_path, p_query):
                    return True
                continue
            # the prefix's path, whole, then a '/' (or the prefix ends with one)
            boundary = p_path if p_path.endswith("/") else p_path + "/"
            if path == p_path or path.startswith(boundary):
                return True
        return False
