"""A local PKI for one OR box and its displays, made by ``or-agent certs`` (``agent.cli`` prints what it made).

The agent's gRPC server speaks TLS, and mutual TLS whenever it listens beyond loopback: the video
overlays and alerts of a running surgery must reach only the OR's own displays, and the box must
know a display is one of its own before it sends anything. A hospital seldom has a PKI that
reaches an OR box, so the box makes its own, with the ``cryptography`` package (no openssl
command line needed):

    DIR/ca.crt, DIR/ca.key                      the box's CA, self-signed, signs nothing but
                                                the certificates below (pathlen 0)
    DIR/server.crt, DIR/server.key              the box: CN = box name, SANs for its names and
                                                addresses, serverAuth
    DIR/clients/<name>.crt, <name>.key          one per display: CN = display name, clientAuth

Keys are ECDSA P-256: 128-bit security, like RSA 3072, but generated in a millisecond rather
than a second, with small certificates and cheap handshakes on the displays' small CPUs, and
supported by every TLS stack gRPC runs on (BoringSSL, OpenSSL, Go, Java).

Private keys are PEM and NOT encrypted: the agent starts unattended when the box boots, with no
one to type a passphrase, and a passphrase stored beside the key would protect nothing. They are
protected instead by their file mode (0600, created so from the start, never briefly readable
by others) and by the box's disk encryption. ``ca.key`` is needed only to make more
certificates; it can be moved off the box once the displays have theirs.

Running again with the same directory reuses the CA, so the displays' certificates stay valid,
and replaces only the server certificate and the displays named; ``force_new_ca`` makes a new
CA, after which every display needs a new certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from or_agent.agent.config import is_plain_name
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.files import atomic_write_bytes, part_path, refuse_file_in_the_way

CA_DAYS = 3650
CERT_DAYS = 825  # the longest validity many TLS clients accept for a leaf certificate
# Certificates start this long before "now", so a display whose clock is a little behind the
# box's does not reject a certificate made a minute ago as not yet valid.
BACKDATE = dt.timedelta(minutes=5)

_DNS_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


@dataclass(frozen=True)
class CertificateSet:
    """The files one run wrote (``clients`` holds only the displays named in that run)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # display name -> (crt, key)
    new_ca: bool = False  # whether this run made the CA (False: it reused the one in the directory)


# -- names -----------------------------------------------------------------------------------


def check_name(kind: str, name: str) -> str:
    """A box or display name: it becomes a file name and a certificate CN, so keep it plain."""
    if not is_plain_name(name):
        raise InputError(f"{kind} name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def _check_dns(name: str) -> str:
    labels = name[2:].split(".") if name.startswith("*.") else name.split(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise InputError(f"--dns {name!r}: not a DNS name (labels of letters, digits and '-', separated by '.')")
    return name


def _check_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InputError(f"--ip {text!r}: not an IPv4 or IPv6 address") from None


def _unique(items):
    return list(dict.fromkeys(items))


# -- files -----------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key atomically, mode 0600 from the moment the file exists.

    ``atomic_write_bytes`` would create the temporary file with the umask's mode (often 0644)
    and leave the key readable by everyone until a chmod; here it is created 0600 (O_EXCL, so a
    planted file or link at the temporary name is never written through), then renamed.
    """
    tmp = part_path(path)
    try:
        tmp.unlink(missing_ok=True)  # left by a run that died mid-write
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a key must not be renamed into place before it is on disk
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_public(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _read(path: Path) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a PEM file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data.strip():
        raise InputError(f"{path}: file is empty")
    return data


def _parse_certs(path: Path, data: bytes) -> list:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise InputError(f"{path}: not a PEM certificate") from None


def _parse_key(path: Path, data: bytes):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying "needs a password"
        raise InputError(f"{path}: the private key is encrypted; the agent needs it unencrypted "
                         "(protect it with file permissions and disk encryption)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise InputError(f"{path}: not a PEM private key") from None


def _same_key(cert, key) -> bool:
    from cryptography.hazmat.primitives import serialization

    def der(public_key):
        return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    return der(cert.public_key()) == der(key.public_key())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# -- making certificates ---------------------------------------------------------------------


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _cn(text: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _key_usage(*, sign_certs: bool):
    from cryptography import x509

    return x509.KeyUsage(digital_signature=not sign_certs, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=sign_certs,
                         crl_sign=sign_certs, encipher_only=False, decipher_only=False)


def _make_ca(box: str, days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _new_key()
    now = _now()
    name = _cn(f"or-agent local CA {box}")
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(sign_certs=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _make_leaf(ca_cert, ca_key, cn: str, days: int, usage, sans=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _new_key()
    now = _now()
    # A certificate cannot outlive the CA that vouches for it: clients would reject it anyway
    # once the CA expires, so say so in the certificate itself.
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (x509.CertificateBuilder()
               .subject_name(_cn(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - BACKDATE)
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(sign_certs=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(aki, critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _load_ca(cert_path: Path, key_path: Path):
    """The CA already in the directory; refuses, rather than replaces, one it cannot use."""
    from cryptography import x509

    again = "; run with --force-new-ca to make a new CA (every display then needs a new certificate)"
    if cert_path.exists() != key_path.exists():
        present, missing = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
        raise InputError(f"{missing}: no such file, but {present.name} is there{again}")
    try:
        cert = _parse_certs(cert_path, _read(cert_path))[0]
        key = _parse_key(key_path, _read(key_path))
    except InputError as exc:
        raise InputError(f"{exc}{again}") from None
    if not _same_key(cert, key):
        raise InputError(f"{cert_path} does not match {key_path}{again}")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise InputError(f"{cert_path}: not a CA certificate{again}")
    if cert.not_valid_after_utc <= _now():
        raise InputError(f"{cert_path}: the CA expired on {cert.not_valid_after_utc:%Y-%m-%d}{again}")
    return cert, key


def make_certificates(out_dir: Path, box: str, displays: Sequence[str], dns: Sequence[str] = (),
                      ips: Sequence[str] = (), ca_days: int = CA_DAYS, cert_days: int = CERT_DAYS,
                      force_new_ca: bool = False) -> CertificateSet:
    """Make (or reuse) the CA in ``out_dir``, then a server certificate and one per display."""
    from cryptography.x509 import DNSName, IPAddress
    from cryptography.x509.oid import ExtendedKeyUsageOID

    # Every input is checked before anything is written, so a typo leaves the directory as it was.
    check_name("box", box)
    displays = _unique(check_name("display", d) for d in displays)
    dns_names = _unique([box, "localhost", *(_check_dns(d) for d in dns)])
    addresses = _unique([ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"), *(_check_ip(i) for i in ips)])
    if not isinstance(ca_days, int) or ca_days < 1:
        raise InputError(f"--ca-days must be at least 1, got {ca_days}")
    if not isinstance(cert_days, int) or not 1 <= cert_days <= CERT_DAYS:
        raise InputError(f"--cert-days must be 1 to {CERT_DAYS} (the longest many TLS clients accept), got {cert_days}")

    out = refuse_file_in_the_way(out_dir)
    clients_dir = out / "clients"
    try:
        # 0700: the directories hold private keys; only the agent's own user needs to look inside.
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        if displays:
            clients_dir.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{exc.filename or out}: cannot create the directory ({exc.strerror or exc})") from None

    ca_cert_path, ca_key_path = out / "ca.crt", out / "ca.key"
    new_ca = force_new_ca or not (ca_cert_path.exists() or ca_key_path.exists())
    if new_ca:
        ca_cert, ca_key = _make_ca(box, ca_days)
        # Key first: a run that dies in between leaves a pair that does not match, which the
        # next run refuses to use, rather than a certificate whose key is lost.
        _write_private(ca_key_path, _key_pem(ca_key))
        _write_public(ca_cert_path, _cert_pem(ca_cert))
    else:
        ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path)

    server_cert, server_key = _make_leaf(ca_cert, ca_key, box, cert_days, ExtendedKeyUsageOID.SERVER_AUTH,
                                         [*(DNSName(d) for d in dns_names), *(IPAddress(a) for a in addresses)])
    server_cert_path, server_key_path = out / "server.crt", out / "server.key"
    _write_private(server_key_path, _key_pem(server_key))
    _write_public(server_cert_path, _cert_pem(server_cert))

    clients: dict[str, tuple[Path, Path]] = {}
    for name in displays:
        cert, key = _make_leaf(ca_cert, ca_key, name, cert_days, ExtendedKeyUsageOID.CLIENT_AUTH)
        crt_path, key_path = clients_dir / f"{name}.crt", clients_dir / f"{name}.key"
        _write_private(key_path, _key_pem(key))
        _write_public(crt_path, _cert_pem(cert))
        clients[name] = (crt_path, key_path)
    return CertificateSet(ca_cert_path, ca_key_path, server_cert_path, server_key_path, clients, new_ca)


# -- using them ------------------------------------------------------------------------------


def load_tls_files(cert: Path, key: Path, ca: Path | None) -> tuple[bytes, bytes, bytes | None]:
    """The PEM bytes of a certificate, its key and (optionally) a CA, checked before gRPC sees them.

    gRPC reports a bad file only as a failed handshake, on the other end, long after start-up;
    these checks fail at once with the file's name instead.
    """
    cert, key = Path(cert), Path(key)
    cert_pem, key_pem = _read(cert), _read(key)
    leaf = _parse_certs(cert, cert_pem)[0]
    private = _parse_key(key, key_pem)
    if not _same_key(leaf, private):
        raise InputError(f"{cert} does not match {key}")
    if leaf.not_valid_after_utc <= _now():
        raise InputError(f"{cert}: expired on {leaf.not_valid_after_utc:%Y-%m-%d}; make a new one with or-agent certs")
    ca_pem = None
    if ca is not None:
        ca = Path(ca)
        ca_pem = _read(ca)
        _parse_certs(ca, ca_pem)
    return cert_pem, key_pem, ca_pem


def _role(cert) -> str:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ext = cert.extensions
    try:
        if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "CA"
    except x509.ExtensionNotFound:
        pass
    try:
        usages = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "certificate"
    roles = [r for oid, r in ((ExtendedKeyUsageOID.SERVER_AUTH, "server"), (ExtendedKeyUsageOID.CLIENT_AUTH, "client"))
             if oid in usages]
    return "+".join(roles) or "certificate"


def describe(cert_path: Path) -> str:
    """One line about a certificate: role, subject and issuer CN, expiry, SANs."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert_path = Path(cert_path)
    cert = _parse_certs(cert_path, _read(cert_path))[0]

    def cn(name) -> str:
        values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(values[0].value) if values else name.rfc4514_string()

    parts = [f"{_role(cert)} CN={cn(cert.subject)}", f"issuer CN={cn(cert.issuer)}",
             f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
        names += [f"IP:{a}" for a in san.get_values_for_type(x509.IPAddress)]
        parts.append("SAN " + " ".join(names))
    except x509.ExtensionNotFound:
        pass
    return ", ".join(parts)


def _refuse_shared_key(key: Path) -> None:
    """The box's private key must be readable by its owner only: anyone else who can read it can
    impersonate the agent to every display."""
    try:
        mode = key.stat().st_mode
    except OSError:
        return  # missing or unreadable: load_tls_files names the problem
    if mode & 0o077:
        raise InputError(f"{key}: the private key is readable or writable by other users (mode {mode & 0o777:03o}); "
                         f"chmod 600 {key}")


def server_credentials(cert: Path, key: Path, ca: Path | None, require_client_auth: bool):
    """gRPC server credentials; with ``require_client_auth`` only holders of a cert from ``ca`` get in."""
    import grpc

    if require_client_auth and ca is None:
        raise InputError("--tls-ca: needed to check the displays' certificates (mutual TLS)")
    _refuse_shared_key(Path(key))
    cert_pem, key_pem, ca_pem = load_tls_files(cert, key, ca)
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem,
                                       require_client_auth=require_client_auth)


def channel_credentials(ca: Path, cert: Path | None = None, key: Path | None = None):
    """gRPC channel credentials trusting only ``ca``; with ``cert``/``key``, presenting them (mutual TLS)."""
    import grpc

    if (cert is None) != (key is None):
        given, missing = ("cert", "key") if key is None else ("key", "cert")
        raise InputError(f"client TLS {given} given without its {missing}: give both, or neither")
    if cert is None:
        ca = Path(ca)
        ca_pem = _read(ca)
        _parse_certs(ca, ca_pem)
        return grpc.ssl_channel_credentials(root_certificates=ca_pem)
    cert_pem, key_pem, ca_pem = load_tls_files(cert, key, ca)
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)


# -- after a run ----------------------------------------------------------------------------


def stale_clients(made: CertificateSet) -> list[Path]:
    """The display certificates in ``made``'s directory that its CA did not sign (a previous CA's,
    or unreadable): the agent will refuse them, so each display named needs a new one."""
    clients_dir = made.ca_cert.parent / "clients"
    return [p for p in sorted(clients_dir.glob("*.crt")) if p.stem not in made.clients
            and not _signed_by(p, made.ca_cert)]


def _signed_by(cert_path: Path, ca_path: Path) -> bool:
    try:
        cert = _parse_certs(cert_path, _read(cert_path))[0]
        ca = _parse_certs(ca_path, _read(ca_path))[0]
        cert.verify_directly_issued_by(ca)
        return True
    except Exception:  # unreadable, not PEM, or not signed by it: all mean "will be refused"
        return False


# -- revocation -------------------------------------------------------------------------------
#
# `or-agent certs revoke NAME` writes DIR/revoked.txt: one line per revocation, the certificate's
# serial number (hex; "-" when no certificate file of that name was there), the display name and the
# time (UTC). The agent refuses a certificate whose serial is listed, and every certificate issued to
# a listed name up to that time (a display may hold an older copy made before a re-run of `certs`);
# a certificate made for the name afterwards (`or-agent certs --display NAME`) is accepted again. A
# plain text file rather than an X.509 CRL: a CRL lists serial numbers only, and gRPC's Python server
# cannot check one; the agent checks this list itself, on every call (agent.access).

REVOKED_FILE = "revoked.txt"
_REVOKED_HEADER = ("# or-agent revoked display certificates (or-agent certs revoke NAME): serial (hex, '-' for\n"
                   "# none), display name, revoked at (UTC). Refused: a listed serial, and every certificate\n"
                   "# issued to a listed name up to that time. Read by the agent at start and when it changes.\n")


@dataclass(frozen=True)
class Revocation:
    serial: int | None  # None: the name alone
    name: str
    revoked_at: dt.datetime  # UTC, whole seconds

    def line(self) -> str:
        serial = "-" if self.serial is None else format(self.serial, "x")
        return f"{serial} {self.name} {self.revoked_at:%Y-%m-%dT%H:%M:%SZ}"


@dataclass(frozen=True)
class PeerCertificate:
    """What the agent needs of a display's certificate: its name (CN), serial and when it was issued."""

    name: str
    serial: int
    issued_at: dt.datetime  # not_valid_before + BACKDATE: when `certs` made it

    @classmethod
    def from_pem(cls, pem: bytes) -> PeerCertificate:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        c = x509.load_pem_x509_certificate(pem)
        names = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = str(names[0].value) if names else ""
        return cls(name, c.serial_number, c.not_valid_before_utc + BACKDATE)


def revoked_path(ca_cert: Path) -> Path:
    """Where `or-agent certs revoke` writes the list: beside the CA's certificate."""
    return Path(ca_cert).parent / REVOKED_FILE


def read_revocations(path: Path) -> list[Revocation]:
    """The revocation list at ``path``; each bad line is named."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            if len(parts) != 3 or not is_plain_name(parts[1]):
                raise ValueError
            serial = None if parts[0] == "-" else int(parts[0], 16)
            at = dt.datetime.strptime(parts[2], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
        except ValueError:
            raise InputError(f"{path}:{number}: expected 'SERIAL NAME YYYY-MM-DDTHH:MM:SSZ' "
                             f"(SERIAL hex or '-'), got {line[:100]!r}") from None
        out.append(Revocation(serial, parts[1], at))
    return out


def revocation_of(cert: PeerCertificate, revocations: Sequence[Revocation]) -> Revocation | None:
    """The entry that revokes ``cert``, or None."""
    for r in revocations:
        if r.serial is not None and r.serial == cert.serial:
            return r
        if r.name == cert.name and cert.issued_at <= r.revoked_at:
            return r
    return None


def revoke(out_dir: Path, name: str) -> tuple[Revocation, Path, bool]:
    """Revoke the display ``name`` in ``out_dir``'s list: its certificate's serial (when
    ``clients/NAME.crt`` is one of this CA's) and every certificate issued to the name until now.
    Returns the entry, the list's path, and whether a certificate file was found."""
    check_name("display", name)
    out = Path(out_dir)
    ca_cert = out / "ca.crt"
    if not ca_cert.is_file():
        raise InputError(f"{ca_cert}: no such file (is {out} the directory `or-agent certs --out` made?)")
    path = revoked_path(ca_cert)
    existing = read_revocations(path) if path.exists() else []
    crt = out / "clients" / f"{name}.crt"
    serial = None
    if crt.is_file() and _signed_by(crt, ca_cert):
        serial = _parse_certs(crt, _read(crt))[0].serial_number
    # whole seconds, as certificates' times: one issued earlier within this second is covered too
    entry = Revocation(serial, name, _now().replace(microsecond=0))
    lines = [r.line() for r in existing] + [entry.line()]
    _write_public(path, (_REVOKED_HEADER + "\n".join(lines) + "\n").encode())
    return entry, path, serial is not None
