"""The audit trail's hash chain: the record format, its hashing and how records chain together.

Writer and verifier must agree on every byte of a record, so what a record is lives here once, and
neither of them can change it alone.

Format. A directory of JSON Lines files ``audit-000001.jsonl``, ``audit-000002.jsonl``, ... Each line
is one record in canonical JSON (sorted keys, no spaces, UTF-8) with the fields ``seq`` (1, 2, ...,
continuing across files), ``ts`` (UTC, ISO-8601 with milliseconds), ``mono_ns`` (the monotonic clock,
for ordering within one run), ``kind`` (see ``KINDS``), ``data`` (a dict), ``prev`` (the previous
record's ``hash``; 64 zeros for the first record of a chain) and ``hash``, the sha256 of the canonical
JSON of the record without its ``hash``. Beside the files, ``audit.head`` holds the seq and hash of the
newest record known to be on disk (the anchor; ``agent.audit.writer`` says when it is written,
``agent.audit.verify`` what it lets verification detect).

No patient data. ``check_data`` refuses keys that name patient data (``DENIED_KEYS``, and any key
containing "patient" or "birth") at any depth of ``data``, and strings longer than 2000 characters (no
free text). Case identifiers must carry no patient data; that is validated where they are made
(``agent.session.CaseSpec``), not here. Callers must not log file names or stream URLs either, which
can carry a patient's name.

Limits. The chain has no secret: someone who can write the directory can rewrite every record, every
hash and ``audit.head`` consistently. The chain shows accidental damage and naive edits; against a
determined insider, copy ``audit.head`` somewhere they cannot write (the case report, a log server).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from datetime import datetime, timezone
from pathlib import Path

KINDS = ("session_start", "session_stop", "config", "models", "alert_raised", "alert_updated", "alert_cleared",
         "alert_acknowledged", "alert_reannounced", "failsafe", "note", "rotated", "chain_damaged",
         "pruned", "config_reload", "config_reload_refused")
FIELDS = frozenset({"seq", "ts", "mono_ns", "kind", "data", "prev", "hash"})
ZERO_HASH = "0" * 64
MAX_STRING = 2000
HEAD_NAME = "audit.head"
# Records are canonical JSON with sorted keys, so every one starts with this.
RECORD_START = b'{"data":'
# Keys are compared lower-cased with '-' and ' ' read as '_'; any key containing "patient" or
# "birth" is refused as well. "name" is refused outright, so name models with "model".
DENIED_KEYS = frozenset({
    "patient", "patient_id", "name", "first_name", "last_name", "surname", "given_name", "family_name",
    "full_name", "birth", "birthdate", "birth_date", "date_of_birth", "dob", "mrn", "medical_record_number",
    "ssn", "nhs_number", "insurance_id", "address", "phone", "email",
})

_FILE_RE = re.compile(r"audit-(\d{6,})\.jsonl")
HEX64_RE = re.compile(r"[0-9a-f]{64}")


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_hash(record: dict) -> str:
    """sha256 hex of the canonical JSON of ``record`` without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body).encode("utf-8")).hexdigest()


def new_record(seq: int, kind: str, data: dict, prev: str) -> dict:
    """The record chained after the one with hash ``prev``, stamped now and hashed."""
    record = {"seq": seq, "ts": _utc_now(), "mono_ns": time.monotonic_ns(), "kind": kind, "data": data, "prev": prev}
    record["hash"] = record_hash(record)
    return record


def record_line(record: dict) -> bytes:
    """The bytes of ``record`` as one line of an audit file."""
    return (canonical(record) + "\n").encode("utf-8")


def continuation_note(damaged_file: str) -> dict:
    """The data of the ``note`` that opens the file continuing a chain whose last file ends in a partial line."""
    return {"previous_tail": "truncated", "file": damaged_file}


# Damage found when a writer starts. The writer cannot continue a chain it found broken (its next
# record would vouch for records that no longer verify), so it starts a new segment: a new file whose
# first record is a ``chain_damaged`` record with ``prev`` 64 zeros, numbered on from the last record
# it read. Its data says what was found and from which file the writer had checked the chain; the
# verifier accepts the break in that stretch as recorded (a warning naming where), not as tampering.
def damage_record(problem: str, checked_from: str, after_seq: int, after_hash: str) -> dict:
    """The data of the ``chain_damaged`` record that opens a new segment after damage found at start."""
    return {"problem": problem[:MAX_STRING], "checked_from": checked_from, "after_seq": after_seq,
            "after_hash": after_hash}


def is_restart(rec: dict) -> bool:
    """Whether a well-formed record opens a new segment after recorded damage (``damage_record``)."""
    data = rec.get("data")
    return (rec.get("kind") == "chain_damaged" and rec.get("prev") == ZERO_HASH and isinstance(data, dict)
            and isinstance(data.get("problem"), str) and isinstance(data.get("checked_from"), str))


def file_name(index: int) -> str:
    return f"audit-{index:06d}.jsonl"


def file_index(path: Path) -> int | None:
    """The number in an audit file's name, or None for any other file."""
    m = _FILE_RE.fullmatch(path.name)
    return int(m.group(1)) if m else None


def audit_files(directory: Path) -> list[Path]:
    """The directory's ``audit-*.jsonl`` files in chain order (by number, not by name: 1000000 > 999999)."""
    return sorted((p for p in Path(directory).iterdir() if file_index(p) is not None and p.is_file()), key=file_index)


def check_data(data) -> None:
    """Raise ValueError if ``data`` is not a JSON dict fit for the audit log (no patient data, no free text)."""
    if not isinstance(data, dict):
        raise ValueError(f"audit data: expected a dict, got {type(data).__name__}")
    _check_value(data, "data")


def _check_value(value, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"audit data: {where}: key {key!r} is not a string")
            norm = key.strip().lower().replace("-", "_").replace(" ", "_")
            if norm in DENIED_KEYS or "patient" in norm or "birth" in norm:
                raise ValueError(f"audit data: {where}.{key}: key refused (the audit log never holds patient data)")
            if len(key) > MAX_STRING:
                raise ValueError(f"audit data: {where}: key of {len(key)} characters, more than {MAX_STRING}")
            _check_value(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]")
    elif isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ValueError(f"audit data: {where}: string of {len(value)} characters, more than {MAX_STRING} "
                             "(no free text in the audit log)")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"audit data: {where}: string is not valid Unicode") from None
    elif isinstance(value, float):
        if not math.isfinite(value):  # json.dumps would write NaN/Infinity, which is not JSON
            raise ValueError(f"audit data: {where}: {value} is not a JSON number")
    elif value is not None and not isinstance(value, (bool, int)):
        raise ValueError(f"audit data: {where}: {type(value).__name__} is not JSON "
                         "(use dict, list, str, int, float, bool or None)")


def _utc_now() -> str:
    return datetime.fromtimestamp(time.time(), tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record_problem(rec) -> str | None:
    """Why a parsed line is not a well-formed record (hash not checked), or None."""
    if not isinstance(rec, dict):
        return "not a JSON object (record damaged)"
    missing = FIELDS - rec.keys()
    if missing:
        return f"missing field {sorted(missing)[0]!r} (record damaged)"
    extra = rec.keys() - FIELDS
    if extra:
        return f"unexpected field {sorted(extra)[0]!r} (record edited)"
    for key in ("seq", "mono_ns"):
        if type(rec[key]) is not int or rec[key] < (1 if key == "seq" else 0):
            return f"field {key!r} is not a {'positive' if key == 'seq' else 'non-negative'} integer (record damaged)"
    if not isinstance(rec["ts"], str):
        return "field 'ts' is not a string (record damaged)"
    if rec["kind"] not in KINDS:
        return f"unknown kind {rec['kind']!r} (record damaged)"
    if not isinstance(rec["data"], dict):
        return "field 'data' is not an object (record damaged)"
    for key in ("prev", "hash"):
        if not isinstance(rec[key], str) or not HEX64_RE.fullmatch(rec[key]):
            return f"field {key!r} is not 64 hex digits (record damaged)"
    return None
