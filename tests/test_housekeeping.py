"""Housekeeping: audit trail retention (by age and size, on the record, never the chain's head) and the
doctor's certificate-expiry and clock-sync checks."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from or_agent.agent import cli
from or_agent.agent.audit import chain
from or_agent.agent.audit.chain import HEAD_NAME, audit_files
from or_agent.agent.audit.retention import MIB, AuditRetention, RetentionPolicy, plan_prune, prune
from or_agent.agent.audit.verify import verify
from or_agent.agent.audit.writer import AuditLog

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)


class FakeClock:
    """The audit records' wall clock, moved by the test (no sleeping, no real dates)."""

    def __init__(self, now: datetime = T0):
        self.now = now

    def stamp(self) -> str:
        return self.now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(chain, "_utc_now", c.stamp)
    return c


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(audit_log: AuditLog, n: int, size: int = 100) -> None:
    for i in range(n):
        audit_log.append("note", {"i": i, "pad": "x" * size})


def test_pruning_by_age_removes_only_old_whole_files_on_the_record(tmp_path, clock):
    d = tmp_path / "audit"
    with AuditLog(d, max_bytes=1000) as audit_log:
        _write(audit_log, 30)  # day 0: several files
        old = [p.name for p in audit_files(d)[:-1]]
        clock.now = T0 + timedelta(days=10)
        _write(audit_log, 30)
        kept_from = audit_files(d)[len(old)]
        expected = [(p.name, _records(p)[-1]["seq"], _records(p)[-1]["hash"]) for p in audit_files(d)[:len(old)]]
        first_kept = _records(kept_from)[0]
        clock.now = T0 + timedelta(days=12)
        done = prune(audit_log, RetentionPolicy(days=5), now=clock.now)
    assert [p.name for p in done.removed] == old and done.first_seq == first_kept["seq"]
    assert audit_files(d)[0].name == kept_from.name
    rec = [r for p in audit_files(d) for r in _records(p) if r["kind"] == "pruned"][-1]
    assert [(r["file"], r["last_seq"], r["last_hash"]) for r in rec["data"]["removed"]] == expected
    assert (rec["data"]["first_seq"], rec["data"]["first_prev"]) == (first_kept["seq"], first_kept["prev"])
    result = verify([d])
    assert result.ok, result.first_error
    assert result.notes == (f"starts at record {first_kept['seq']} after pruning",)
    # nothing more is old enough
    with AuditLog(d, max_bytes=1000) as audit_log:  # the writer reopens the pruned trail and continues it
        assert prune(audit_log, RetentionPolicy(days=5), now=clock.now).removed == ()
        audit_log.append("note", {"after": "reopen"})
    assert verify([d]).ok


def test_pruning_by_size_keeps_the_trail_under_the_limit(tmp_path, clock):
    d = tmp_path / "audit"
    with AuditLog(d, max_bytes=256 * 1024) as audit_log:
        _write(audit_log, 1400, size=1900)  # about 2.8 MB in 11 files
        files_before = audit_files(d)
        sizes = {p: p.stat().st_size for p in files_before}
        done = prune(audit_log, RetentionPolicy(mb=1), now=clock.now)
    left = audit_files(d)
    assert done.removed == tuple(files_before[:len(done.removed)])  # the oldest, in one run from the start
    assert sum(p.stat().st_size for p in left) <= 1 * MIB
    assert sum(p.stat().st_size for p in left) + left[0].stat().st_size > 1 * MIB  # no more than needed
    assert done.freed_bytes == sum(sizes[p] for p in done.removed)
    assert verify([d]).ok


def test_the_newest_file_holding_the_chain_head_is_never_removed(tmp_path, clock):
    d = tmp_path / "audit"
    with AuditLog(d, max_bytes=1000) as audit_log:
        _write(audit_log, 2, size=10)
        assert len(audit_files(d)) == 1
        # one file: it holds the head, so even a year later nothing goes
        assert prune(audit_log, RetentionPolicy(days=1, mb=0), now=T0 + timedelta(days=365)).removed == ()
        _write(audit_log, 40)
        newest = audit_files(d)[-1]
        done = prune(audit_log, RetentionPolicy(days=1), now=T0 + timedelta(days=365))
    assert done.removed and newest not in done.removed
    assert audit_files(d)[0] == newest  # everything older went (the pruning record may have opened one more file)
    head = json.loads((d / HEAD_NAME).read_text())
    assert head["seq"] == [r for p in audit_files(d) for r in _records(p)][-1]["seq"]  # the anchor still names the chain's end
    result = verify([d])
    assert result.ok and result.notes


def test_pruning_twice_still_verifies(tmp_path, clock):
    d = tmp_path / "audit"
    with AuditLog(d, max_bytes=1000) as audit_log:
        _write(audit_log, 20)
        clock.now = T0 + timedelta(days=3)
        prune(audit_log, RetentionPolicy(days=2), now=clock.now)
        _write(audit_log, 30)
        clock.now = T0 + timedelta(days=6)
        second = prune(audit_log, RetentionPolicy(days=2), now=clock.now)
    assert second.removed  # including the file holding the first pruning's record
    result = verify([d])
    assert result.ok and result.notes == (f"starts at record {second.first_seq} after pruning",)


def test_files_removed_without_a_pruning_record_are_still_broken(tmp_path, clock):
    d = tmp_path / "audit"
    with AuditLog(d, max_bytes=1000) as audit_log:
        _write(audit_log, 30)
        clock.now = T0 + timedelta(days=10)
        prune(audit_log, RetentionPolicy(days=5), now=clock.now)
    first = audit_files(d)[0]
    first.unlink()  # one more file removed by hand: the recorded start no longer matches
    start = _records(audit_files(d)[0])[0]["seq"]
    result = verify([d])
    assert not result.ok
    assert result.first_error == (f"{audit_files(d)[0].name}:1: chain starts at seq {start}, not 1 "
                                  "(earlier records or files removed)")


def test_a_later_file_given_alone_is_not_taken_for_a_pruned_chain(tmp_path, clock):
    d = tmp_path / "audit"
    with AuditLog(d, max_bytes=1000) as audit_log:
        _write(audit_log, 30)
        clock.now = T0 + timedelta(days=10)
        prune(audit_log, RetentionPolicy(days=5), now=clock.now)
    later = audit_files(d)[1:]
    assert not verify(later).ok


def test_plan_prune_with_no_retention_removes_nothing(tmp_path, clock):
    d = tmp_path / "audit"
    with AuditLog(d, max_bytes=1000) as audit_log:
        _write(audit_log, 30)
    assert plan_prune(d, RetentionPolicy(), T0 + timedelta(days=999)) == ([], None)
    with pytest.raises(ValueError, match="retention days: must be a non-negative integer, got -1"):
        RetentionPolicy(days=-1)


def test_the_agent_prunes_at_start_on_its_own_thread(tmp_path, clock):
    d = tmp_path / "audit"
    with AuditLog(d, max_bytes=1000) as audit_log:
        _write(audit_log, 30)
        ran = threading.Event()
        pruned = []

        def later():  # the retention thread's clock: 10 days on; also tells the test the pruning ran
            if pruned:
                ran.set()
            pruned.append(1)
            return T0 + timedelta(days=10)

        keeper = AuditRetention(audit_log, RetentionPolicy(days=5), every_s=0.01, clock=later).start()
        try:
            assert ran.wait(60.0)
        finally:
            keeper.stop()
    assert keeper.runs >= 2
    result = verify([d])
    assert result.ok and result.notes


def test_cli_audit_prune_and_verify(tmp_path, clock, capsys):
    clock.now = datetime.now(timezone.utc) - timedelta(days=30)  # the command prunes by the real clock
    d = tmp_path / "audit"
    with AuditLog(d, max_bytes=1000) as audit_log:
        _write(audit_log, 30)
    config = tmp_path / "agent.toml"
    config.write_text(f'[audit]\ndirectory = "{d}"\nretention_days = 0\n')
    assert cli.main(["audit", "prune", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith("nothing to do: no retention set")
    n_old = len([p for p in audit_files(d) if p.stat().st_size]) - 1  # not the newest with records
    assert cli.main(["audit", "prune", str(d), "--days", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"removed {n_old} file(s)") and out.rstrip().endswith("(recorded in the trail)")
    assert cli.main(["audit", "verify", str(d)]) == 0
    start = _records(audit_files(d)[0])[0]["seq"]
    assert capsys.readouterr().out.splitlines()[0].endswith(f"chain intact; starts at record {start} after pruning")
    assert cli.main(["audit", "prune", str(tmp_path / "nothing")]) == 2


# --------------------------------------------------------------------------- doctor: certificates and clock

def _doctor_lines(check, *args) -> tuple[list[str], object]:
    from or_agent.agent.offline.doctor import Report

    lines: list[str] = []
    report = Report(lines.append)
    check(report, *args)
    return lines, report


def _expiry(path: Path) -> datetime:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


def test_doctor_warns_of_certificates_expiring_within_30_days_and_fails_expired_ones(tmp_path):
    from or_agent.agent.certs import make_certificates
    from or_agent.agent.offline.doctor import _check_certificates

    made = make_certificates(tmp_path / "pki", "or3-box", ["or3-main"], cert_days=10)
    now = datetime.now(timezone.utc)
    lines, report = _doctor_lines(_check_certificates, [tmp_path / "pki"], now)
    ca, server, client = made.ca_cert, made.server_cert, made.clients["or3-main"][0]
    assert [line.split(":")[0] for line in lines] == [f"ok    certificate {ca}", f"WARN  certificate {server}",
                                                      f"WARN  certificate {client}"]
    days = int((_expiry(server) - now).total_seconds() / 86400)
    assert lines[1] == (f"WARN  certificate {server}: expires {_expiry(server):%Y-%m-%d %H:%M} UTC, in {days} day(s) "
                        "-> renew it before then (or-agent certs --out DIR --box BOX ...)")
    assert report.failures == [] and len(report.warnings) == 2
    # twenty days on, the two have expired: that stops the displays connecting, so it fails the check
    lines, report = _doctor_lines(_check_certificates, [server, ca], now + timedelta(days=20))
    assert lines[0] == (f"FAIL  certificate {server}: expired {_expiry(server):%Y-%m-%d %H:%M} UTC -> make a new one "
                        "(or-agent certs --out DIR --box BOX ...); TLS peers refuse it")
    assert lines[1].startswith(f"ok    certificate {ca}: expires ")
    assert len(report.failures) == 1
    lines, _ = _doctor_lines(_check_certificates, [], now)
    assert lines == ["      TLS certificates: none given (doctor --config agent.toml or --certs DIR to check their expiry)"]


def test_doctor_cli_reads_the_certificates_from_the_config(tmp_path, capsys):
    from or_agent.agent.certs import make_certificates

    made = make_certificates(tmp_path / "pki", "or3-box", ["or3-main"], cert_days=5)
    config = tmp_path / "agent.toml"
    config.write_text(f'[server]\ntls_cert = "{made.server_cert}"\ntls_key = "{made.server_key}"\n'
                      f'tls_ca = "{made.ca_cert}"\n')
    code = cli.main(["doctor", "--config", str(config), "--no-capture-probe", "--audit-dir", str(tmp_path),
                     "--cache-dir", str(tmp_path / "engines")])
    out = capsys.readouterr().out.splitlines()
    certs = [line for line in out if " certificate " in line]
    assert [line[:6] + line.split(":")[0][6:] for line in certs] == [
        f"WARN  certificate {made.server_cert}", f"ok    certificate {made.ca_cert}",
        f"WARN  certificate {made.clients['or3-main'][0]}"]
    assert code == 0  # warnings only


@pytest.mark.parametrize("timedatectl, adjtimex, flag, expected", [
    ("yes", None, False, "ok    clock {stamp}, synchronised (timedatectl)"),
    ("no", True, True, "WARN  clock not synchronised (timedatectl) -> enable NTP (timedatectl set-ntp true, or "
                       "chrony) so audit times match the hospital's"),
    (None, False, True, "WARN  clock not synchronised (adjtimex) -> enable NTP (timedatectl set-ntp true, or "
                        "chrony) so audit times match the hospital's"),
    (None, None, True, "ok    clock {stamp}, synchronised (systemd-timesyncd)"),
    (None, None, False, "      clock {stamp}; clock sync: unknown (no timedatectl, adjtimex or systemd-timesyncd answer)"),
])
def test_doctor_clock_sync(tmp_path, monkeypatch, timedatectl, adjtimex, flag, expected):
    import time

    from or_agent.agent.offline import doctor

    flag_file = tmp_path / "synchronized"
    if flag:
        flag_file.touch()
    monkeypatch.setattr(doctor, "_run", lambda cmd, timeout=5.0: timedatectl if cmd[0] == "timedatectl" else None)
    monkeypatch.setattr(doctor, "_adjtimex_state", lambda: adjtimex)
    monkeypatch.setattr(doctor, "TIMESYNCD_FLAG", flag_file)
    frozen = time.gmtime()
    monkeypatch.setattr(doctor.time, "gmtime", lambda *a: frozen)
    lines, _ = _doctor_lines(doctor._check_clock)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", frozen)
    assert lines[-1] == expected.format(stamp=stamp)


def test_the_agent_prunes_its_trail_when_it_starts(tmp_path, clock):
    import asyncio
    import time

    from or_agent.agent.config import load_config
    from or_agent.agent.server import AgentServer
    from or_agent.agent.session import LoadedModels

    clock.now = datetime.now(timezone.utc) - timedelta(days=30)  # an earlier month's trail
    d = tmp_path / "audit"
    with AuditLog(d, max_bytes=4096) as audit_log:
        _write(audit_log, 120)
    old = [p for p in audit_files(d) if p.stat().st_size][:-1]
    assert len(old) >= 2
    clock.now = datetime.now(timezone.utc)
    cfg = load_config(None).with_overrides(**{"server.listen": "127.0.0.1:0", "audit.directory": str(d),
                                              "audit.max_bytes": 4096, "audit.retention_days": 7})

    async def scenario():
        server = AgentServer(cfg, LoadedModels())
        await server.start()
        try:
            deadline = time.monotonic() + 60.0  # generous: the pruning runs on its own thread
            while any(p.exists() for p in old) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await server.stop()

    asyncio.run(scenario())
    assert not any(p.exists() for p in old)
    result = verify([d])
    assert result.ok and result.notes, result.first_error
