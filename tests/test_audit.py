"""The audit trail: a hash chain that verifies, and every kind of tampering or crash it must show."""

import json
import os
import re
import shutil
import threading
from argparse import Namespace

import pytest

from or_agent.agent.audit.chain import HEAD_NAME, ZERO_HASH, audit_files, canonical, record_hash
from or_agent.agent.audit.verify import VerifyResult, verify
from or_agent.agent.audit.writer import AuditLog
from or_agent.agent.cli import cmd_audit_verify
from or_agent.pipelines.errors import InputError

KIND_CYCLE = ["note", "alert_raised", "config", "alert_cleared", "models"]


def write_chain(directory, n=300, max_bytes=4096, fsync_every=10):
    """A closed chain of ``n`` appended records (plus the rotated records), several files long."""
    with AuditLog(directory, max_bytes=max_bytes, fsync_every=fsync_every) as log:
        log.append("session_start", {"case_id": "case-001"})
        for i in range(n - 2):
            log.append(KIND_CYCLE[i % len(KIND_CYCLE)], {"i": i, "rule": "bleeding", "score": i / 7})
        log.append("session_stop", {"reason": "done"})
    return log


def crash(log):
    """What a killed process leaves: its descriptors closed, nothing more synced or written."""
    log._release()


def lines(path):
    return path.read_bytes().splitlines(keepends=True)


def records(path):
    return [json.loads(line) for line in lines(path)]


def seq_before(directory, file_number, line):
    """The seq of the record just before ``line`` of file ``file_number`` (both 1-based)."""
    return records(directory / f"audit-{file_number:06d}.jsonl")[line - 2]["seq"]


@pytest.fixture(scope="module")
def master_chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("master") / "audit"
    return d, write_chain(d).seq


@pytest.fixture
def chain(master_chain, tmp_path):
    """A copy of the module's chain, to tamper with."""
    d = tmp_path / "audit"
    shutil.copytree(master_chain[0], d)
    return d, master_chain[1]


def test_a_chain_over_several_files_verifies(chain):
    d, total = chain
    files = audit_files(d)
    assert len(files) >= 4 and [f.name for f in files[:2]] == ["audit-000001.jsonl", "audit-000002.jsonl"]
    result = verify([d])
    assert result == VerifyResult(ok=True, records=total, files=tuple(map(str, files)), first_error=None, warnings=())
    all_records = [r for f in files for r in records(f)]
    assert [r["seq"] for r in all_records] == list(range(1, total + 1))
    assert all_records[0]["prev"] == ZERO_HASH
    for before, after in zip(all_records, all_records[1:]):
        assert after["prev"] == before["hash"] and before["hash"] == record_hash(before)
    for f, nxt in zip(files, files[1:]):
        last = records(f)[-1]
        assert last["kind"] == "rotated" and last["data"] == {"next": nxt.name}
        assert records(nxt)[0]["prev"] == last["hash"]
    for f in files:  # every line is canonical JSON
        assert all(line == (canonical(json.loads(line)) + "\n").encode() for line in lines(f))
    r = all_records[0]
    assert set(r) == {"seq", "ts", "mono_ns", "kind", "data", "prev", "hash"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["ts"])
    assert json.loads((d / HEAD_NAME).read_text()) == {"seq": total, "hash": all_records[-1]["hash"], "file": files[-1].name}


def test_an_edited_field_is_a_hash_mismatch(chain):
    d, _ = chain
    f = d / "audit-000003.jsonl"
    ls = lines(f)
    rec = json.loads(ls[4])
    rec["data"]["rule"] = "none"  # still valid JSON, still canonical
    ls[4] = (canonical(rec) + "\n").encode()
    f.write_bytes(b"".join(ls))
    result = verify([d])
    assert not result.ok and result.first_error == "audit-000003.jsonl:5: hash mismatch (record edited)"
    assert result.records == len(lines(d / "audit-000001.jsonl")) + len(lines(d / "audit-000002.jsonl")) + 4


def test_an_edited_record_with_a_recomputed_hash_breaks_the_next_prev(chain):
    d, _ = chain
    f = d / "audit-000003.jsonl"
    ls = lines(f)
    rec = json.loads(ls[4])
    rec["data"]["rule"] = "none"
    rec["hash"] = record_hash(rec)
    ls[4] = (canonical(rec) + "\n").encode()
    f.write_bytes(b"".join(ls))
    assert verify([d]).first_error == ("audit-000003.jsonl:6: prev does not match the hash of the record before it "
                                       "(records edited, removed or reordered)")


def test_a_deleted_record_is_a_seq_gap(chain):
    d, _ = chain
    f = d / "audit-000003.jsonl"
    s = seq_before(d, 3, 5)
    ls = lines(f)
    del ls[4]
    f.write_bytes(b"".join(ls))
    assert verify([d]).first_error == f"audit-000003.jsonl:5: seq {s + 2} where {s + 1} was expected (records removed or reordered)"


def test_swapped_records_are_out_of_order(chain):
    d, _ = chain
    f = d / "audit-000003.jsonl"
    s = seq_before(d, 3, 5)
    ls = lines(f)
    ls[4], ls[5] = ls[5], ls[4]
    f.write_bytes(b"".join(ls))
    assert verify([d]).first_error == f"audit-000003.jsonl:5: seq {s + 2} where {s + 1} was expected (records removed or reordered)"


def test_a_damaged_line_is_not_json(chain):
    d, _ = chain
    f = d / "audit-000002.jsonl"
    ls = lines(f)
    ls[1] = ls[1][:30] + b"\n"
    f.write_bytes(b"".join(ls))
    assert verify([d]).first_error == "audit-000002.jsonl:2: not valid JSON (record damaged)"


def test_a_missing_middle_file_is_named(chain):
    d, _ = chain
    last_line = len(lines(d / "audit-000002.jsonl"))
    (d / "audit-000003.jsonl").unlink()
    assert verify([d]).first_error == (f"audit-000002.jsonl:{last_line}: rotated to audit-000003.jsonl, "
                                       "but the next file is audit-000004.jsonl (file missing)")


def test_a_missing_first_file_is_named(chain):
    d, _ = chain
    first = records(d / "audit-000002.jsonl")[0]["seq"]
    (d / "audit-000001.jsonl").unlink()
    assert verify([d]).first_error == f"audit-000002.jsonl:1: chain starts at seq {first}, not 1 (earlier records or files removed)"


def test_a_missing_last_file_is_named(chain):
    d, _ = chain
    files = audit_files(d)
    files[-1].unlink()
    last_line = len(lines(files[-2]))
    assert verify([d]).first_error == (f"{files[-2].name}:{last_line}: rotated to {files[-1].name}, "
                                       "which is missing (file removed)")


def test_records_removed_from_the_end_are_caught_by_the_head(tmp_path):
    # One file: with rotation the last file may hold a single record (sizes vary with the timestamps).
    d = tmp_path / "audit"
    total = write_chain(d, n=40, max_bytes=1 << 20).seq
    f = audit_files(d)[-1]
    assert len(audit_files(d)) == 1 and len(lines(f)) == total
    f.write_bytes(b"".join(lines(f)[:-2]))
    assert verify([d]).first_error == f"chain ends at seq {total - 2} but audit.head says {total} (records removed from the end)"
    # a synced record cut mid-line is no crash's doing (a crash can only cut a record not yet synced)
    f.write_bytes(f.read_bytes()[:-30])
    assert verify([d]).first_error == f"chain ends at seq {total - 3} but audit.head says {total} (records removed from the end)"
    # without the anchor the shortened chain is self-consistent: that is why audit.head exists
    (d / HEAD_NAME).unlink()
    result = verify([d])
    assert result.ok and result.records == total - 3
    assert result.warnings == ("audit.head missing: records removed from the end of the chain would go unnoticed",
                               f"{f.name}:{len(lines(f))}: truncated last record (crash mid-write); everything before it verifies")


def test_a_rewritten_tail_is_caught_by_the_head(chain):
    d, total = chain
    f = audit_files(d)[-1]
    recs = records(f)
    prev = recs[0]["prev"]
    for rec in recs:  # edit the first record and rebuild every hash after it, as a careful forger would
        if rec is recs[0]:
            rec["data"]["rule"] = "none"
        rec["prev"] = prev
        rec["hash"] = prev = record_hash(rec)
    f.write_bytes(b"".join((canonical(r) + "\n").encode() for r in recs))
    assert verify([d]).first_error == (f"{f.name}:{len(recs)}: hash differs from the one audit.head holds for seq {total} "
                                       "(records rewritten)")


def test_a_damaged_head_is_reported(chain):
    d, _ = chain
    (d / HEAD_NAME).write_text("{}\n")
    assert verify([d]) == VerifyResult(False, 0, tuple(map(str, audit_files(d))), "audit.head: not valid (damaged or edited)")


def test_a_middle_file_cut_mid_record_without_continuation_is_broken(chain):
    d, _ = chain
    f = d / "audit-000003.jsonl"
    data = f.read_bytes()
    f.write_bytes(data[:-40])  # cuts the rotated record
    assert verify([d]).first_error == ("audit-000004.jsonl:1: audit-000003.jsonl ends with a truncated record, "
                                       "but audit-000004.jsonl does not start with the continuation note (records removed?)")


def crashed_chain(d):
    """A chain whose writer died after some unsynced notes, the last one cut mid-write."""
    log = AuditLog(d, max_bytes=4096, fsync_every=1000).open()
    log.append("session_start", {"case_id": "case-002"})
    for i in range(60):
        log.append("alert_raised" if i % 10 == 0 else "note", {"i": i})
    crash(log)
    f = log.path
    f.write_bytes(f.read_bytes()[:-25])
    return log, f


def test_a_crash_mid_write_leaves_a_truncated_tail_that_is_not_tampering(tmp_path):
    d = tmp_path / "audit"
    log, f = crashed_chain(d)
    result = verify([d])
    assert result.ok and result.records == log.seq - 1
    head_seq = json.loads((d / "audit.head").read_text())["seq"]
    assert head_seq < result.records  # the unsynced records were never anchored
    assert result.warnings == (
        f"{f.name}:{len(lines(f))}: truncated last record (crash mid-write); everything before it verifies",
        f"audit.head names seq {head_seq} but the chain runs to seq {result.records}: rolled back, or the agent crashed "
        f"before updating it; records removed from the end after seq {head_seq} would go unnoticed")
    assert cmd_audit_verify(Namespace(paths=[str(d)])) == 0


@pytest.mark.parametrize("tail, message", [
    (b"x" * 70_000, "70000 bytes after the last record, more than a record cut by a crash (65536 at most): appended data"),
    (b'{"forged": true}', "the bytes after the last record are not the start of a record (appended data)"),
    (b"garbage", "the bytes after the last record are not the start of a record (appended data)"),
])
def test_bytes_appended_after_the_last_record_are_not_a_crash(tmp_path, tail, message):
    d = tmp_path / "audit"
    log = AuditLog(d).open()
    for i in range(3):
        log.append("note", {"i": i})
    log.close()
    f = audit_files(d)[-1]
    n = len(lines(f))
    with open(f, "ab") as fh:
        fh.write(tail)
    assert verify([d]).first_error == f"{f.name}:{n + 1}: {message}"


def test_a_forged_whole_record_without_newline_is_broken(tmp_path):
    d = tmp_path / "audit"
    log = AuditLog(d).open()
    log.append("note", {"i": 0})
    log.close()
    f = audit_files(d)[-1]
    last = json.loads(lines(f)[-1])
    forged = {**last, "data": {"approved": "yes"}, "seq": last["seq"] + 1}  # its hash is not its own
    with open(f, "ab") as fh:
        fh.write(canonical(forged).encode())
    assert verify([d]).first_error.endswith("a record without its newline that does not continue the chain (inserted?)")


def test_reopening_after_a_crash_continues_in_a_new_file(tmp_path):
    d = tmp_path / "audit"
    _log, f = crashed_chain(d)
    before = {p.name: p.read_bytes() for p in audit_files(d)}
    last_complete = json.loads(lines(f)[-2])
    with AuditLog(d, max_bytes=4096) as log2:
        assert log2.path.name != f.name and log2.seq == last_complete["seq"] + 1
        note = records(log2.path)[0]
        assert note["kind"] == "note" and note["data"] == {"previous_tail": "truncated", "file": f.name}
        assert note["prev"] == last_complete["hash"] and note["seq"] == last_complete["seq"] + 1
        rec = log2.append("alert_raised", {"rule": "bleeding"})
        assert rec["prev"] == note["hash"]
    assert {p.name: p.read_bytes() for p in audit_files(d) if p.name in before} == before  # nothing modified
    result = verify([d])
    assert result.ok and result.records == log2.seq
    assert result.warnings == (f"{f.name}:{len(lines(f))}: truncated last record (crash mid-write); "
                               f"the chain continues in {log2.path.name}",)


def test_a_failed_write_continues_the_chain_in_a_new_file(tmp_path, monkeypatch):
    d = tmp_path / "audit"
    real_write = os.write
    with AuditLog(d) as log:
        log.append("session_start", {"case_id": "case-005"})
        first = log.path
        monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))  # disk full mid-line
        with pytest.raises(OSError, match="short write"):
            log.append("alert_raised", {"rule": "bleeding"})
        monkeypatch.setattr(os, "write", real_write)
        assert log.seq == 1
        rec = log.append("alert_raised", {"rule": "bleeding"})
        assert log.path != first and rec["seq"] == 3  # seq 2 is the continuation note
    assert records(log.path)[0]["data"] == {"previous_tail": "truncated", "file": first.name}
    result = verify([d])
    assert result.ok and result.records == 3 and len(result.warnings) == 1


def test_reopening_continues_the_chain(chain):
    d, total = chain
    last = records(audit_files(d)[-1])[-1]
    with AuditLog(d, max_bytes=4096) as log:
        assert log.seq == total and log.last_hash == last["hash"] and log.path == audit_files(d)[-1]
        rec = log.append("session_start", {"case_id": "case-003"})
    assert rec["seq"] == total + 1 and rec["prev"] == last["hash"]
    result = verify([d])  # (the append may have rotated too)
    assert result.ok and result.records == log.seq >= total + 1


def test_an_empty_next_file_after_rotation_verifies_and_is_continued(tmp_path):
    d = tmp_path / "audit"
    with AuditLog(d, max_bytes=1) as log:  # every record rotates
        log.append("session_start", {"case_id": "case-004"})
        log.append("note", {"i": 1})
    files = audit_files(d)
    assert [f.name for f in files] == [f"audit-00000{i}.jsonl" for i in (1, 2, 3)] and files[-1].stat().st_size == 0
    assert verify([d]) == VerifyResult(True, 4, tuple(map(str, files)), None)
    with AuditLog(d, max_bytes=1) as log:
        rec = log.append("note", {"i": 2})
    assert records(files[-1])[0] == rec and rec["seq"] == 5
    assert verify([d]).ok


def test_a_subset_of_files_verifies_without_the_head(chain):
    d, _ = chain
    result = verify([d / "audit-000001.jsonl", d / "audit-000002.jsonl"])
    n = len(lines(d / "audit-000002.jsonl"))
    assert result.ok and result.warnings == (f"audit-000002.jsonl:{n}: the chain continues in audit-000003.jsonl, "
                                             "which was not given",)


@pytest.mark.parametrize("data, message", [
    ({"patient_id": "123"}, "audit data: data.patient_id: key refused (the audit log never holds patient data)"),
    ({"evidence": {"Name": "Doe"}}, "audit data: data.evidence.Name: key refused (the audit log never holds patient data)"),
    ({"items": [{"MRN": "1"}]}, "audit data: data.items[0].MRN: key refused (the audit log never holds patient data)"),
    ({"Date-Of-Birth": "1970"}, "audit data: data.Date-Of-Birth: key refused (the audit log never holds patient data)"),
    ({"patientAge": 50}, "audit data: data.patientAge: key refused (the audit log never holds patient data)"),
    ({"text": "x" * 2001}, "audit data: data.text: string of 2001 characters, more than 2000 (no free text in the audit log)"),
    ({"score": float("nan")}, "audit data: data.score: nan is not a JSON number"),
    ({"when": object()}, "audit data: data.when: object is not JSON (use dict, list, str, int, float, bool or None)"),
    ([1], "audit data: expected a dict, got list"),
])
def test_patient_data_and_free_text_are_refused(tmp_path, data, message):
    with AuditLog(tmp_path / "audit") as log:
        log.append("note", {"ok": "x" * 2000})
        size, seq = log.path.stat().st_size, log.seq
        with pytest.raises(ValueError) as exc:
            log.append("note", data)
        assert str(exc.value) == message
        assert log.path.stat().st_size == size and log.seq == seq  # nothing written


def test_kinds_and_state_are_checked(tmp_path):
    log = AuditLog(tmp_path / "audit")
    with pytest.raises(RuntimeError, match="not open"):
        log.append("note", {})
    with log:
        with pytest.raises(ValueError, match="audit kind 'alert': unknown"):
            log.append("alert", {})
        with pytest.raises(ValueError, match="written by the log itself"):
            log.append("rotated", {"next": "x"})
    with pytest.raises(ValueError, match="fsync_kinds: unknown kind 'alerts'"):
        AuditLog(tmp_path, fsync_kinds=frozenset({"alerts"}))
    with pytest.raises(ValueError, match="fsync_every must be at least 1"):
        AuditLog(tmp_path, fsync_every=0)


def test_a_second_writer_is_refused(tmp_path):
    with AuditLog(tmp_path / "audit"):
        with pytest.raises(InputError) as exc:
            AuditLog(tmp_path / "audit").open()
    assert str(exc.value) == f"{tmp_path / 'audit'}: another audit writer holds this directory"


def test_a_damaged_last_record_is_not_continued(chain):
    d, _ = chain
    f = audit_files(d)[-1]
    ls = lines(f)
    rec = json.loads(ls[-1])
    rec["data"]["reason"] = "edited"
    ls[-1] = (canonical(rec) + "\n").encode()
    f.write_bytes(b"".join(ls))
    with pytest.raises(InputError) as exc:
        AuditLog(d).open()
    assert str(exc.value) == (f"{f}: last record is damaged (hash mismatch); run `or-agent audit verify {d}` "
                              "and move the log aside")


def test_fsync_policy(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd)))
    d = tmp_path / "audit"
    log = AuditLog(d, fsync_every=3).open()

    def log_syncs():
        return synced.count(log.path.stat().st_ino)

    def head_seq():
        return json.loads((d / HEAD_NAME).read_text())["seq"]

    assert log_syncs() == 0 and head_seq() == 0  # the anchor exists from the start
    log.append("note", {})
    log.append("config", {})
    assert log_syncs() == 0 and head_seq() == 0  # flushed to the kernel, not yet synced
    for n, kind in enumerate(["alert_raised", "alert_updated", "alert_cleared", "alert_acknowledged",
                              "alert_reannounced", "failsafe", "session_start", "session_stop"], start=1):
        rec = log.append(kind, {})
        assert log_syncs() == n and head_seq() == rec["seq"]  # synced before append returned
    log.append("note", {})
    log.append("models", {})
    assert log_syncs() == 8
    rec = log.append("note", {})  # the third unsynced record
    assert log_syncs() == 9 and head_seq() == rec["seq"]
    rec = log.append("note", {})
    log.close()  # close syncs what is pending
    assert log_syncs() == 10 and head_seq() == rec["seq"]

    synced.clear()
    with AuditLog(tmp_path / "quiet", fsync_kinds=frozenset(), fsync_every=100) as quiet:
        for _ in range(5):
            quiet.append("alert_raised", {})
        assert synced.count(quiet.path.stat().st_ino) == 0
    assert synced.count(quiet.path.stat().st_ino) == 1


def test_concurrent_appends_make_one_valid_chain(tmp_path):
    d = tmp_path / "audit"
    with AuditLog(d, max_bytes=8192, fsync_every=25) as log:
        def worker(t):
            for i in range(150):
                log.append("alert_raised" if i % 30 == 0 else "note", {"thread": t, "i": i})
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    result = verify([d])
    assert result.ok and result.records == log.seq and len(result.files) > 3
    recs = [r for f in audit_files(d) for r in records(f)]
    assert sorted((r["data"]["thread"], r["data"]["i"]) for r in recs if r["kind"] != "rotated") == \
        sorted((t, i) for t in range(4) for i in range(150))
    assert all(a["mono_ns"] <= b["mono_ns"] for a, b in zip(recs, recs[1:]))  # stamped under the lock


def test_cmd_audit_verify(chain, capsys, tmp_path):
    d, total = chain
    assert cmd_audit_verify(Namespace(paths=[str(d)])) == 0
    assert capsys.readouterr().out == f"ok: {total} records in {len(audit_files(d))} files, chain intact\n"
    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    (broken / "audit-000003.jsonl").unlink()
    assert cmd_audit_verify(Namespace(paths=[str(broken)])) == 1
    out = capsys.readouterr().out
    assert out.startswith("BROKEN: audit-000002.jsonl:") and out.count("\n") == 1
    with pytest.raises(InputError) as exc:
        cmd_audit_verify(Namespace(paths=[str(tmp_path / "nope")]))
    assert str(exc.value) == f"{tmp_path / 'nope'}: no such file or directory"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no audit-\\*.jsonl files in this directory"):
        verify([tmp_path / "empty"])


def test_verify_result_is_consistent():
    with pytest.raises(ValueError):
        VerifyResult(ok=True, records=1, files=("a",), first_error="x")
    with pytest.raises(ValueError):
        VerifyResult(ok=False, records=1, files=("a",), first_error=None)


def flip_a_byte_in_the_middle(f, within=b"bleeding"):
    """Flip one bit of one byte of the file's middle record (inside a string, so the line stays JSON):
    the silent damage of a bad disk block or a careless edit. Returns the damaged line's number."""
    ls = lines(f)
    n = len(ls) // 2
    at = ls[n].index(within) + 2
    ls[n] = ls[n][:at] + bytes([ls[n][at] ^ 1]) + ls[n][at + 1:]
    f.write_bytes(b"".join(ls))
    return n + 1


def test_damage_in_the_middle_of_the_continued_file_is_recorded_and_the_chain_restarts(tmp_path, capsys):
    d = tmp_path / "audit"
    total = write_chain(d, n=40, max_bytes=1 << 20).seq
    f = d / "audit-000001.jsonl"
    last = records(f)[-1]
    line = flip_a_byte_in_the_middle(f)
    problem = f"audit-000001.jsonl:{line}: hash mismatch (record edited)"
    assert verify([d]).first_error == problem
    before = f.read_bytes()

    with AuditLog(d, max_bytes=1 << 20) as log:
        assert log.damage == f"{problem}; chain restarted in audit-000002.jsonl"
        assert log.path.name == "audit-000002.jsonl"
        rec = log.append("session_start", {"case_id": "case-006"})
    assert f.read_bytes() == before  # the damaged file is kept as it is, for review
    first, second = records(d / "audit-000002.jsonl")
    assert first["kind"] == "chain_damaged" and first["prev"] == ZERO_HASH and first["seq"] == total + 1
    assert first["data"] == {"problem": problem, "checked_from": "audit-000001.jsonl", "after_seq": total,
                             "after_hash": last["hash"]}
    assert second == rec and rec["prev"] == first["hash"]

    # the verifier shows the break, where it is and where the new segment starts, and verifies the new segment
    result = verify([d])
    assert result.ok and result.records == (line - 1) + 2
    assert result.warnings == (f"{problem}; the agent found this damage and recorded it at audit-000002.jsonl:1 "
                               f"(chain_damaged, seq {total + 1}), where a new segment starts; records from the "
                               "damage to there are not verified",)
    assert cmd_audit_verify(Namespace(paths=[str(d)])) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"ok: {result.records} records in 2 files, chain intact"
    assert out[1] == f"warning: {result.warnings[0]}"

    # the new segment is what the next start continues: it verifies, and is simply continued
    with AuditLog(d, max_bytes=1 << 20) as log:
        assert log.damage is None and log.path.name == "audit-000002.jsonl"
        log.append("session_stop", {"reason": "done"})
    assert verify([d]).ok

    # damage after the new segment starts is not excused by the earlier break
    g = d / "audit-000002.jsonl"
    g.write_bytes(g.read_bytes().replace(b"case-006", b"case-007"))
    assert verify([d]).first_error == "audit-000002.jsonl:2: hash mismatch (record edited)"


def test_a_restart_excuses_only_the_stretch_the_writer_checked(chain):
    d, _ = chain
    files = audit_files(d)
    flip_a_byte_in_the_middle(files[1])  # in a file before the one the writer continues: it never sees this
    with AuditLog(d, max_bytes=1 << 20) as log:
        assert log.damage is None
        for i in range(6):  # so that the file it continues has a middle
            log.append("note", {"i": i})
    flip_a_byte_in_the_middle(files[-1], within=b'"kind"')  # now in the file it continues
    with AuditLog(d, max_bytes=1 << 20) as log:
        assert log.damage is not None and log.damage.startswith(f"{files[-1].name}:")
    result = verify([d])
    assert not result.ok and result.first_error.startswith("audit-000002.jsonl:")  # never recorded: still broken


def test_a_rolled_back_head_is_damage_found_at_start(tmp_path):
    """What the verifier cannot see after the fact (the anchor rewritten) is recorded when the writer sees it."""
    d = tmp_path / "audit"
    total = write_chain(d, n=20, max_bytes=1 << 20).seq
    head = json.loads((d / HEAD_NAME).read_text())
    f = d / "audit-000001.jsonl"
    f.write_bytes(b"".join(lines(f)[:-3]))  # the last three records removed
    problem = f"chain ends at seq {total - 3} but audit.head says {total} (records removed from the end)"
    assert verify([d]).first_error == problem
    with AuditLog(d) as log:
        assert log.damage == f"{problem}; chain restarted in audit-000002.jsonl"
    assert json.loads((d / HEAD_NAME).read_text())["seq"] == total - 2 != head["seq"]
    result = verify([d])
    assert result.ok and result.warnings == (
        f"audit-000002.jsonl:1: the agent found the chain damaged ({problem}) and started a new segment here "
        f"(seq {total - 2})",)


def test_chain_damaged_records_are_the_writers_own(tmp_path):
    with AuditLog(tmp_path / "audit") as log:
        with pytest.raises(ValueError, match="'chain_damaged': written by the log itself when it opens"):
            log.append("chain_damaged", {"problem": "x", "checked_from": "audit-000001.jsonl"})
