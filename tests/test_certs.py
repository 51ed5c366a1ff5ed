"""The box's local PKI (agent/certs.py, printed by `or-agent certs` in agent/cli.py): the files, the certificates,
and real mutual-TLS handshakes."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from or_agent.agent.certs import (
    CertificateSet,
    channel_credentials,
    describe,
    load_tls_files,
    make_certificates,
    server_credentials,
)
from or_agent.agent.cli import build_parser, cmd_certs
from or_agent.pipelines.errors import InputError

AGAIN = "; run with --force-new-ca to make a new CA (every display then needs a new certificate)"


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def fingerprint(path: Path) -> bytes:
    return cert(path).fingerprint(hashes.SHA256())


def cn(c: x509.Certificate) -> str:
    return c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def ext(c: x509.Certificate, kind):
    return c.extensions.get_extension_for_class(kind)


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> CertificateSet:
    return make_certificates(tmp_path_factory.mktemp("pki"), "or-box-3", ["wall-left", "boom.1"],
                             dns=["orbox3.hospital.local"], ips=["10.20.30.40", "fd00::7"])


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> CertificateSet:
    """A second, unrelated PKI: its display and its CA must get nowhere with the first box."""
    return make_certificates(tmp_path_factory.mktemp("other"), "or-box-9", ["intruder"])


# -- the files and the certificates ------------------------------------------------------------


def test_files_and_modes(pki):
    root = pki.ca_cert.parent
    assert pki.ca_cert == root / "ca.crt" and pki.ca_key == root / "ca.key"
    assert pki.server_cert == root / "server.crt" and pki.server_key == root / "server.key"
    assert pki.clients == {"wall-left": (root / "clients/wall-left.crt", root / "clients/wall-left.key"),
                           "boom.1": (root / "clients/boom.1.crt", root / "clients/boom.1.key")}
    assert pki.new_ca
    keys = [pki.ca_key, pki.server_key, *(k for _, k in pki.clients.values())]
    for key in keys:
        assert mode(key) == 0o600, key
        data = key.read_bytes()
        assert data.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
        loaded = serialization.load_pem_private_key(data, password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey) and loaded.curve.name == "secp256r1"
    assert mode(root) == 0o700 and mode(root / "clients") == 0o700
    assert sorted(p.name for p in root.rglob("*")) == sorted(
        ["ca.crt", "ca.key", "server.crt", "server.key", "clients",
         "wall-left.crt", "wall-left.key", "boom.1.crt", "boom.1.key"])  # no temporary files left


def test_ca_certificate(pki):
    ca = cert(pki.ca_cert)
    assert cn(ca) == "or-agent local CA or-box-3" and ca.issuer == ca.subject
    bc = ext(ca, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(ca, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert ext(ca, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(ca.public_key())
    ca.verify_directly_issued_by(ca)  # self-signed
    days = (ca.not_valid_after_utc - ca.not_valid_before_utc).days
    assert 3650 <= days <= 3651


def test_server_certificate(pki):
    ca, server = cert(pki.ca_cert), cert(pki.server_cert)
    assert cn(server) == "or-box-3"
    server.verify_directly_issued_by(ca)
    san = ext(server, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["or-box-3", "localhost", "orbox3.hospital.local"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(a) for a in
                                                       ("127.0.0.1", "::1", "10.20.30.40", "fd00::7")]
    assert list(ext(server, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not ext(server, x509.BasicConstraints).value.ca
    assert ext(server, x509.AuthorityKeyIdentifier).value.key_identifier == \
        ext(ca, x509.SubjectKeyIdentifier).value.digest
    days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert 825 <= days <= 826


def test_client_certificates(pki, other):
    ca = cert(pki.ca_cert)
    for name, (crt, _) in pki.clients.items():
        c = cert(crt)
        assert cn(c) == name
        c.verify_directly_issued_by(ca)
        assert list(ext(c, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert not ext(c, x509.BasicConstraints).value.ca
    with pytest.raises(Exception):  # signature check against the wrong CA fails
        cert(other.clients["intruder"][0]).verify_directly_issued_by(ca)


def test_describe(pki):
    line = describe(pki.server_cert)
    assert "\n" not in line
    until = cert(pki.server_cert).not_valid_after_utc
    assert line == (f"server CN=or-box-3, issuer CN=or-agent local CA or-box-3, valid until {until:%Y-%m-%d %H:%M} UTC, "
                    "SAN DNS:or-box-3 DNS:localhost DNS:orbox3.hospital.local IP:127.0.0.1 IP:::1 IP:10.20.30.40 IP:fd00::7")
    assert describe(pki.clients["boom.1"][0]).startswith("client CN=boom.1, issuer CN=or-agent local CA or-box-3, ")
    assert describe(pki.ca_cert).startswith("CA CN=or-agent local CA or-box-3, issuer CN=or-agent local CA or-box-3, ")


def test_keys_are_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)  # the most permissive umask: the keys must still never be readable by others
    try:
        # A link planted at the temporary name must not be written through.
        out = tmp_path / "pki"
        out.mkdir()
        victim = tmp_path / "victim"
        victim.write_text("untouched")
        (out / "server.part.key").symlink_to(victim)
        made = make_certificates(out, "box", ["d"])
    finally:
        os.umask(old)
    assert victim.read_text() == "untouched"
    assert mode(made.ca_key) == mode(made.server_key) == mode(made.clients["d"][1]) == 0o600
    assert not (out / "server.part.key").exists()


def test_cert_never_outlives_its_ca(tmp_path):
    made = make_certificates(tmp_path, "box", ["d"], ca_days=30)
    assert cert(made.server_cert).not_valid_after_utc == cert(made.ca_cert).not_valid_after_utc
    assert cert(made.clients["d"][0]).not_valid_after_utc == cert(made.ca_cert).not_valid_after_utc


# -- running again -----------------------------------------------------------------------------


def test_rerun_keeps_the_ca_and_old_display_certs(tmp_path):
    first = make_certificates(tmp_path, "box", ["a"])
    ca_fp, a_fp, server_fp = fingerprint(first.ca_cert), fingerprint(first.clients["a"][0]), fingerprint(first.server_cert)
    ca_key = first.ca_key.read_bytes()

    second = make_certificates(tmp_path, "box", ["b"], dns=["box.local"])
    assert not second.new_ca and set(second.clients) == {"b"}
    assert fingerprint(second.ca_cert) == ca_fp and second.ca_key.read_bytes() == ca_key
    assert fingerprint(first.clients["a"][0]) == a_fp  # untouched
    cert(first.clients["a"][0]).verify_directly_issued_by(cert(second.ca_cert))  # and still valid
    cert(second.clients["b"][0]).verify_directly_issued_by(cert(second.ca_cert))
    assert fingerprint(second.server_cert) != server_fp  # the server certificate is replaced...
    assert "box.local" in describe(second.server_cert)  # ...with the new names

    third = make_certificates(tmp_path, "box", ["b"], force_new_ca=True)
    assert third.new_ca and fingerprint(third.ca_cert) != ca_fp
    new_ca = cert(third.ca_cert)
    cert(third.server_cert).verify_directly_issued_by(new_ca)
    cert(third.clients["b"][0]).verify_directly_issued_by(new_ca)
    with pytest.raises(Exception):
        cert(first.clients["a"][0]).verify_directly_issued_by(new_ca)


def test_refuses_a_ca_it_cannot_use(tmp_path):
    made = make_certificates(tmp_path, "box", [])
    ca_key = made.ca_key.read_bytes()
    server_fp = fingerprint(made.server_cert)

    made.ca_key.write_bytes(b"garbage\n")
    with pytest.raises(InputError) as e:
        make_certificates(tmp_path, "box", ["d"])
    assert str(e.value) == f"{made.ca_key}: not a PEM private key{AGAIN}"
    assert made.ca_key.read_bytes() == b"garbage\n" and fingerprint(made.server_cert) == server_fp  # nothing written
    assert not (tmp_path / "clients" / "d.crt").exists()

    made.ca_key.unlink()
    made.ca_key.mkdir()  # unreadable, even for root
    with pytest.raises(InputError) as e:
        make_certificates(tmp_path, "box", [])
    assert str(e.value) == f"{made.ca_key}: is a directory, not a PEM file{AGAIN}"
    made.ca_key.rmdir()

    with pytest.raises(InputError) as e:
        make_certificates(tmp_path, "box", [])
    assert str(e.value) == f"{made.ca_key}: no such file, but ca.crt is there{AGAIN}"

    made.ca_key.write_bytes(made.server_key.read_bytes())
    with pytest.raises(InputError) as e:
        make_certificates(tmp_path, "box", [])
    assert str(e.value) == f"{made.ca_cert} does not match {made.ca_key}{AGAIN}"

    shutil.copy(made.server_cert, made.ca_cert)  # a matching pair, but not a CA
    with pytest.raises(InputError) as e:
        make_certificates(tmp_path, "box", [])
    assert str(e.value) == f"{made.ca_cert}: not a CA certificate{AGAIN}"

    # --force-new-ca is the way out, and it works.
    again = make_certificates(tmp_path, "box", ["d"], force_new_ca=True)
    assert again.new_ca and again.ca_key.read_bytes() != ca_key
    cert(again.clients["d"][0]).verify_directly_issued_by(cert(again.ca_cert))


def test_refuses_an_unreadable_ca_key(tmp_path):
    made = make_certificates(tmp_path, "box", [])
    made.ca_key.chmod(0)
    if os.access(made.ca_key, os.R_OK):
        made.ca_key.chmod(0o600)
        pytest.skip("this user reads any file whatever its mode (root with CAP_DAC_OVERRIDE)")
    try:
        with pytest.raises(InputError) as e:
            make_certificates(tmp_path, "box", [])
        assert str(e.value) == f"{made.ca_key}: cannot read (Permission denied){AGAIN}"
    finally:
        made.ca_key.chmod(0o600)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(box="x y", displays=[]),
     "box name 'x y': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    (dict(box="", displays=[]),
     "box name '': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    (dict(box="box", displays=["ok", "x y"]),
     "display name 'x y': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    (dict(box="box", displays=["-rf"]),
     "display name '-rf': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    (dict(box="box", displays=["../escape"]),
     "display name '../escape': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    (dict(box="box", displays=["a" * 65]),
     f"display name '{'a' * 65}': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    (dict(box="box", displays=[], dns=["bad name"]),
     "--dns 'bad name': not a DNS name (labels of letters, digits and '-', separated by '.')"),
    (dict(box="box", displays=[], dns=["a..b"]),
     "--dns 'a..b': not a DNS name (labels of letters, digits and '-', separated by '.')"),
    (dict(box="box", displays=[], ips=["300.1.1.1"]),
     "--ip '300.1.1.1': not an IPv4 or IPv6 address"),
    (dict(box="box", displays=[], ca_days=0),
     "--ca-days must be at least 1, got 0"),
    (dict(box="box", displays=[], cert_days=900),
     "--cert-days must be 1 to 825 (the longest many TLS clients accept), got 900"),
])
def test_bad_input_writes_nothing(tmp_path, kwargs, message):
    out = tmp_path / "pki"
    with pytest.raises(InputError) as e:
        make_certificates(out, **kwargs)
    assert str(e.value) == message
    assert not out.exists()


def test_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError) as e:
        make_certificates(tmp_path / "f", "box", [])
    assert str(e.value) == f"{tmp_path / 'f'}: exists and is not a directory"


def test_load_tls_files(pki, other, tmp_path):
    cert_pem, key_pem, ca_pem = load_tls_files(pki.server_cert, pki.server_key, pki.ca_cert)
    assert cert_pem == pki.server_cert.read_bytes() and key_pem == pki.server_key.read_bytes()
    assert ca_pem == pki.ca_cert.read_bytes()
    assert load_tls_files(pki.server_cert, pki.server_key, None)[2] is None

    def error(*args) -> str:
        with pytest.raises(InputError) as e:
            load_tls_files(*args)
        return str(e.value)

    missing, empty, text = tmp_path / "missing.crt", tmp_path / "empty.crt", tmp_path / "notes.txt"
    empty.write_bytes(b"")
    text.write_text("not a certificate\n")
    assert error(missing, pki.server_key, None) == f"{missing}: no such file"
    assert error(pki.server_cert, missing, None) == f"{missing}: no such file"
    assert error(pki.server_cert, pki.server_key, missing) == f"{missing}: no such file"
    assert error(tmp_path, pki.server_key, None) == f"{tmp_path}: is a directory, not a PEM file"
    assert error(empty, pki.server_key, None) == f"{empty}: file is empty"
    assert error(text, pki.server_key, None) == f"{text}: not a PEM certificate"
    assert error(pki.server_key, pki.server_key, None) == f"{pki.server_key}: not a PEM certificate"
    assert error(pki.server_cert, text, None) == f"{text}: not a PEM private key"
    assert error(pki.server_cert, pki.server_cert, None) == f"{pki.server_cert}: not a PEM private key"
    assert error(pki.server_cert, pki.server_key, text) == f"{text}: not a PEM certificate"
    assert error(pki.server_cert, pki.ca_key, None) == f"{pki.server_cert} does not match {pki.ca_key}"
    assert error(pki.server_cert, other.server_key, None) == f"{pki.server_cert} does not match {other.server_key}"

    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    assert error(pki.server_cert, locked, None) == (
        f"{locked}: the private key is encrypted; the agent needs it unencrypted "
        "(protect it with file permissions and disk encryption)")

    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    old = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
           .serial_number(1).not_valid_before(now - dt.timedelta(days=30)).not_valid_after(now - dt.timedelta(days=1))
           .sign(key, hashes.SHA256()))
    expired = tmp_path / "expired.crt"
    expired.write_bytes(old.public_bytes(serialization.Encoding.PEM))
    assert error(expired, pki.server_key, None) == (
        f"{expired}: expired on {old.not_valid_after_utc:%Y-%m-%d}; make a new one with or-agent certs")


def test_credential_helpers_check_their_inputs(pki):
    with pytest.raises(InputError) as e:
        server_credentials(pki.server_cert, pki.server_key, None, require_client_auth=True)
    assert str(e.value) == "--tls-ca: needed to check the displays' certificates (mutual TLS)"
    crt, key = pki.clients["wall-left"]
    with pytest.raises(InputError) as e:
        channel_credentials(pki.ca_cert, cert=crt)
    assert str(e.value) == "client TLS cert given without its key: give both, or neither"
    with pytest.raises(InputError) as e:
        channel_credentials(pki.ca_cert, key=key)
    assert str(e.value) == "client TLS key given without its cert: give both, or neither"
    with pytest.raises(InputError) as e:
        channel_credentials(pki.server_key)
    assert str(e.value) == f"{pki.server_key}: not a PEM certificate"
    with pytest.raises(InputError) as e:
        channel_credentials(pki.ca_cert, crt, pki.clients["boom.1"][1])
    assert str(e.value) == f"{crt} does not match {pki.clients['boom.1'][1]}"


def test_cmd_certs(tmp_path, capsys):
    ap = build_parser()
    out = tmp_path / "pki"
    args = ap.parse_args(["certs", "--out", str(out), "--box", "or-box-1", "--display", "wall", "--display", "boom",
                          "--dns", "or1.local", "--ip", "10.0.0.5"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'server.crt'}  {describe(out / 'server.crt')}" in printed
    assert f"{out / 'clients' / 'boom.crt'}  {describe(out / 'clients' / 'boom.crt')}" in printed
    assert f"{out / 'ca.key'}  new CA private key (mode 0600)" in printed
    assert f"--tls-cert {out / 'server.crt'} --tls-key {out / 'server.key'} --tls-ca {out / 'ca.crt'}" in printed
    assert "IP:10.0.0.5" in printed and "DNS:or1.local" in printed

    args = ap.parse_args(["certs", "--out", str(out), "--box", "or-box-1", "--display", "wall", "--force-new-ca"])
    assert cmd_certs(args) == 0
    printed = capsys.readouterr().out
    assert (f"note: {out / 'clients' / 'boom.crt'} was signed by a previous CA and will be refused; "
            "make it again with --display boom") in printed
    assert "wall.crt was signed" not in printed


# -- real TLS handshakes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_port(pki):
    """A real gRPC server on 127.0.0.1 that requires a display certificate from the box's CA."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(pki.server_cert, pki.server_key, pki.ca_cert,
                                                                    require_client_auth=True))
    assert port
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait(5)


def check(target: str, creds: grpc.ChannelCredentials, **options) -> int:
    # A channel-local subchannel pool: without it gRPC may share one connection among channels,
    # and a refused client could ride on an accepted one's handshake.
    opts = [("grpc.use_local_subchannel_pool", 1), *options.items()]
    with grpc.secure_channel(target, creds, options=opts) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def refused(target: str, creds: grpc.ChannelCredentials, **options) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        check(target, creds, **options)
    return e.value.code()


SERVING = health_pb2.HealthCheckResponse.SERVING


def test_display_with_its_certificate_is_served(pki, mtls_port):
    # "localhost" resolves to 127.0.0.1 here and is in the server's SANs: no target name override needed.
    for name, (crt, key) in pki.clients.items():
        assert check(f"localhost:{mtls_port}", channel_credentials(pki.ca_cert, crt, key)) == SERVING, name
    # The IP SAN is checked too, when the box is reached by address.
    crt, key = pki.clients["wall-left"]
    assert check(f"127.0.0.1:{mtls_port}", channel_credentials(pki.ca_cert, crt, key)) == SERVING
    # The box's own name, which nothing here resolves: only this case needs the override.
    assert check(f"127.0.0.1:{mtls_port}", channel_credentials(pki.ca_cert, crt, key),
                 **{"grpc.ssl_target_name_override": "or-box-3"}) == SERVING


def test_client_without_certificate_is_refused(pki, mtls_port):
    assert refused(f"localhost:{mtls_port}", channel_credentials(pki.ca_cert)) == grpc.StatusCode.UNAVAILABLE


def test_client_with_another_cas_certificate_is_refused(pki, other, mtls_port):
    crt, key = other.clients["intruder"]
    # It trusts the right CA for the server, but its own certificate is from another CA.
    assert refused(f"localhost:{mtls_port}", channel_credentials(pki.ca_cert, crt, key)) == grpc.StatusCode.UNAVAILABLE


def test_client_that_does_not_trust_the_ca_refuses_the_box(pki, other, mtls_port):
    crt, key = pki.clients["wall-left"]  # a valid display certificate, but the wrong root of trust
    assert refused(f"localhost:{mtls_port}", channel_credentials(other.ca_cert, crt, key)) == grpc.StatusCode.UNAVAILABLE


def test_client_checks_the_server_name(pki, mtls_port):
    crt, key = pki.clients["wall-left"]
    assert refused(f"127.0.0.1:{mtls_port}", channel_credentials(pki.ca_cert, crt, key),
                   **{"grpc.ssl_target_name_override": "not-the-box"}) == grpc.StatusCode.UNAVAILABLE


def test_server_only_tls(pki, other):
    """Loopback-only deployments may skip client certificates: then anyone who trusts the CA gets in."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(pki.server_cert, pki.server_key, None,
                                                                    require_client_auth=False))
    server.start()
    try:
        assert check(f"localhost:{port}", channel_credentials(pki.ca_cert)) == SERVING
        assert refused(f"localhost:{port}", channel_credentials(other.ca_cert)) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=None).wait(5)


def test_a_private_key_readable_by_others_is_refused(pki, tmp_path):
    import os
    import shutil

    key = tmp_path / "server.key"
    shutil.copy(pki.server_key, key)
    os.chmod(key, 0o644)
    with pytest.raises(InputError) as e:
        server_credentials(pki.server_cert, key, pki.ca_cert, require_client_auth=True)
    assert str(e.value) == f"{key}: the private key is readable or writable by other users (mode 644); chmod 600 {key}"
    os.chmod(key, 0o600)
    assert server_credentials(pki.server_cert, key, pki.ca_cert, require_client_auth=True) is not None


# -- revocation (issue 13 item 10) -------------------------------------------------------------


def test_revoke_lists_the_serial_and_the_name(tmp_path, capsys):
    import datetime as dt

    from or_agent.agent.certs import PeerCertificate, read_revocations, revocation_of
    from or_agent.agent.cli import main

    out = tmp_path / "pki"
    made = make_certificates(out, "or-box-1", ["wall", "boom"])
    wall_old = PeerCertificate.from_pem(made.clients["wall"][0].read_bytes())
    wall = PeerCertificate.from_pem(make_certificates(out, "or-box-1", ["wall"]).clients["wall"][0].read_bytes())
    assert wall.serial != wall_old.serial and wall.name == "wall"

    assert main(["certs", "revoke", "wall", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"revoked: certificate serial {wall.serial:x} and every certificate issued to wall until ")
    assert main(["certs", "revoke", "gone", "--out", str(out)]) == 0  # no certificate file: by name alone
    assert "revoked by name only" in capsys.readouterr().out

    entries = read_revocations(out / "revoked.txt")
    assert [(e.serial, e.name) for e in entries] == [(wall.serial, "wall"), (None, "gone")]
    # refused: the certificate listed, and an older copy of the display's certificate (issued before)
    assert revocation_of(wall, entries) == entries[0] and revocation_of(wall_old, entries) == entries[0]
    boom = PeerCertificate.from_pem(made.clients["boom"][0].read_bytes())
    assert revocation_of(boom, entries) is None
    # a certificate made for the name after the revocation is accepted
    later = PeerCertificate("wall", 12345, entries[0].revoked_at + dt.timedelta(seconds=1))
    assert revocation_of(later, entries) is None
    # a certificate with a listed serial is refused, whatever its name says
    assert revocation_of(PeerCertificate("renamed", wall.serial, later.issued_at), entries) == entries[0]


def test_revoke_checks_its_input(tmp_path, capsys):
    from or_agent.agent.certs import read_revocations
    from or_agent.agent.cli import main

    assert main(["certs", "revoke", "wall", "--out", str(tmp_path / "nothing-here")]) == 2
    assert f"{tmp_path / 'nothing-here' / 'ca.crt'}: no such file" in capsys.readouterr().err
    out = tmp_path / "pki"
    make_certificates(out, "or-box-1", ["wall"])
    assert main(["certs", "revoke", "../wall", "--out", str(out)]) == 2
    assert "display name '../wall': use 1-64 letters" in capsys.readouterr().err
    assert not (out / "revoked.txt").exists()
    (out / "revoked.txt").write_text("# comment\n\nzz wall 2026-01-01T00:00:00Z\n")
    with pytest.raises(InputError) as e:
        read_revocations(out / "revoked.txt")
    assert str(e.value).startswith(f"{out / 'revoked.txt'}:3: expected 'SERIAL NAME YYYY-MM-DDTHH:MM:SSZ'")
    # `certs` itself still needs --out and --box
    assert main(["certs", "--out", str(out)]) == 2
    assert "--out and --box are required" in capsys.readouterr().err


def test_the_display_is_named_by_its_certificate_by_default(pki):
    from or_agent.agent.cli import _certificate_name

    assert _certificate_name(pki.clients["boom.1"][0]) == "boom.1"
    assert _certificate_name(pki.server_key) == "display"  # not a certificate: the credentials' check says so
