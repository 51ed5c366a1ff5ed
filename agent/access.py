"""Who is calling, and what they may do: the display's identity from its certificate, the roles, and
the revocation list.

Under mutual TLS (``server.tls_cert`` with ``require_client_auth``, the default beyond loopback) a
display is the name (CN) in the certificate it presented; a ``client_id`` it sends must be that name
or empty, so one display cannot acknowledge an alert as another, and the audit trail records the
verified name. The roles (``server.may_start_stop``, ``server.may_acknowledge``) name the displays
allowed to start and stop cases and to acknowledge alerts; ``"*"``, the default, is every display
certificate the CA signed, so existing deployments keep working. The revocation list
(``or-agent certs revoke NAME``; ``server.tls_revoked``, by default ``revoked.txt`` beside
``tls_ca``) is read at start (a bad one stops the start, naming the line) and again whenever the file
changes (checked at most once a second); a list that becomes unreadable leaves the last good one in
force, so a typo never lets a revoked display back in.

Without mutual TLS (plaintext on loopback, or server-only TLS) nothing identifies a display: its
``client_id`` is what it says, as before, and roles other than ``"*"`` are refused by the
configuration check.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from or_agent.agent.certs import PeerCertificate, Revocation, read_revocations, revocation_of, revoked_path
from or_agent.agent.config import ServerConfig
from or_agent.pipelines.errors import InputError

log = logging.getLogger("or-agent.access")

START_STOP, ACKNOWLEDGE = "start_stop", "acknowledge"
ROLE_KEYS = {START_STOP: "server.may_start_stop", ACKNOWLEDGE: "server.may_acknowledge"}
ROLE_WORDS = {START_STOP: "start or stop cases", ACKNOWLEDGE: "acknowledge alerts"}


class Refused(Exception):
    """A call the agent refuses: ``code`` is the gRPC status's name (UNAUTHENTICATED, PERMISSION_DENIED,
    INVALID_ARGUMENT), ``message`` what the caller is told."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Caller:
    name: str  # the verified certificate name, or (without mutual TLS) the client_id as sent
    certificate: PeerCertificate | None = None  # under mutual TLS


@functools.lru_cache(maxsize=256)
def _peer_certificate(pem: bytes) -> PeerCertificate:
    return PeerCertificate.from_pem(pem)


class RevocationWatch:
    """The revocation list, reloaded when its file changes (checked at most every ``interval_s``)."""

    def __init__(self, path: Path, required: bool, interval_s: float = 1.0):
        self.path, self.interval_s = Path(path), interval_s
        self.entries: list[Revocation] = []
        self.generation = 0  # counts the loads that changed the list
        self._stamp: tuple[int, int, int] | None = None
        self._checked = time.monotonic()
        stamp = self._stat()
        if stamp is None:
            if required:
                raise InputError(f"server.tls_revoked: {self.path}: no such file")
            return
        self.entries, self._stamp = read_revocations(self.path), stamp  # a bad list stops the start
        log.info("revocation list %s: %d entries", self.path, len(self.entries))

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> list[Revocation]:
        now = time.monotonic()
        if now - self._checked >= self.interval_s:
            self._checked = now
            stamp = self._stat()
            if stamp is not None and stamp != self._stamp:
                try:
                    entries = read_revocations(self.path)
                except InputError as exc:
                    log.error("revocation list not reloaded, the previous one stays in force: %s", exc)
                else:
                    self.entries, self._stamp = entries, stamp
                    self.generation += 1
                    log.warning("revocation list %s reloaded: %d entries", self.path, len(entries))
        return self.entries


class Access:
    """The agent's access rules, made once per server from ``[server]``."""

    def __init__(self, cfg: ServerConfig):
        self.mutual = cfg.mutual_tls
        self.roles = {START_STOP: frozenset(cfg.may_start_stop), ACKNOWLEDGE: frozenset(cfg.may_acknowledge)}
        self.revocations: RevocationWatch | None = None
        if self.mutual:
            path = Path(cfg.tls_revoked) if cfg.tls_revoked else revoked_path(Path(cfg.tls_ca))
            self.revocations = RevocationWatch(path, required=bool(cfg.tls_revoked))

    def identify(self, auth_context: dict, client_id: str | None) -> Caller:
        """The caller of a call with this gRPC auth context; ``client_id`` is the request's (None where the
        request has none). Raises ``Refused``."""
        if not self.mutual:
            return Caller(client_id or "")
        pems = auth_context.get("x509_pem_cert") or []
        if not pems:
            raise Refused("UNAUTHENTICATED", "no client certificate: this agent serves only displays with a certificate from its CA")
        try:
            cert = _peer_certificate(bytes(pems[0]))
        except ValueError:
            raise Refused("UNAUTHENTICATED", "the client certificate cannot be read") from None
        caller = Caller(cert.name, cert)
        self.check_revoked(caller)
        if client_id and client_id != cert.name:
            raise Refused("PERMISSION_DENIED", f"client_id {client_id[:80]!r} is not this display's certificate name "
                                               f"{cert.name!r}: under mutual TLS a display is the name in its certificate "
                                               "(send that, or leave client_id empty)")
        return caller

    def check_revoked(self, caller: Caller) -> None:
        """Raises ``Refused`` if the caller's certificate is revoked (now: the list may have changed since
        the call began)."""
        if caller.certificate is None or self.revocations is None:
            return
        entry = revocation_of(caller.certificate, self.revocations.current())
        if entry is not None:
            raise Refused("UNAUTHENTICATED", f"the certificate of {caller.name!r} (serial {caller.certificate.serial:x}) "
                                             f"was revoked on {entry.revoked_at:%Y-%m-%d %H:%M} UTC; "
                                             "the display needs a new certificate")

    def require(self, caller: Caller, role: str) -> None:
        """Raises ``Refused`` unless the caller may do ``role``."""
        allowed = self.roles[role]
        if "*" in allowed or caller.name in allowed:
            return
        raise Refused("PERMISSION_DENIED", f"display {caller.name!r} may not {ROLE_WORDS[role]} "
                                           f"(not in {ROLE_KEYS[role]} on the agent)")

    @property
    def generation(self) -> int:
        """Changes whenever the revocation list does: open streams check their caller again then."""
        if self.revocations is None:
            return 0
        self.revocations.current()
        return self.revocations.generation
