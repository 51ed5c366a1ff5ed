"""A tamper-evident audit trail: what the system showed, and when, as an append-only hash chain.

Format. A directory of JSON Lines files ``audit-000001.jsonl``, ``audit-000002.jsonl``, ... Each line
is one record in canonical JSON (sorted keys, no spaces, UTF-8) with the fields ``seq`` (1, 2, ...,
continuing across files), ``ts`` (UTC, ISO-8601 with milliseconds), ``mono_ns`` (the monotonic clock,
for ordering within one run), ``kind`` (see ``KINDS``), ``data`` (a dict), ``prev`` (the previous
record's ``hash``; 64 zeros for the first record of a chain) and ``hash``, the sha256 of the canonical
JSON of the record without its ``hash``. Beside the files, ``audit.head`` holds the seq and hash of the
newest record known to be on disk (the anchor, see below).

No patient data. ``append`` refuses keys that name patient data (``DENIED_KEYS``, and any key
containing "patient" or "birth") at any depth of ``data``, and strings longer than 2000 characters (no
free text). Case identifiers must carry no patient data; that is validated where they are made
(``agent.session.CaseSpec``), not here. Callers must not log file names or stream URLs either, which
can carry a patient's name.

Durability. Every record is written with a single ``os.write`` of the whole line to a file opened with
``O_APPEND``, so records never interleave and nothing is buffered in the process. Records of the
kinds in ``fsync_kinds`` (by default every ``alert_*``, ``failsafe``, ``session_start`` and
``session_stop``) are followed by ``os.fsync`` before ``append`` returns; other kinds reach the
kernel at once but are fsynced only once ``fsync_every`` of them have accumulated, on rotation and on
``close``. After every fsync ``audit.head`` is rewritten atomically (temporary file, fsync, rename).
A crash mid-write leaves at most one partial last line: verification reports it as a truncated tail
and everything before it verifies. Existing files are never modified: after a crash (or a failed
write) the writer continues the chain in a new file whose first record is a ``note``
``{"previous_tail": "truncated", "file": <damaged file>}`` chained to the last complete record.

Rotation. Once the current file reaches ``max_bytes`` the writer appends a ``rotated`` record
(``{"next": "audit-NNNNNN.jsonl"}``), fsyncs, and continues in that file: its first record's ``prev``
is the ``rotated`` record's hash. Opening a directory that already holds a chain continues it.

What ``verify`` detects: a damaged line (not JSON, missing or unexpected fields), an edited record
(hash mismatch), an edited record whose hash was recomputed (the next record's ``prev``), deleted,
duplicated or reordered records (seq and ``prev``), a missing first, middle or last file (seq, the
``rotated`` record's next file), a file truncated mid-record (reported as a truncated tail, a warning
when it is a crash's, an error when the chain goes on without the continuation note), and records
removed from the end, by comparing the chain's end with ``audit.head``. Without the anchor, removing
records from the end of a hash chain cannot be detected; with it, only records written since the
last fsync (never an alert, failsafe or session record) can go unnoticed.

Limits. The chain has no secret: someone who can write the directory can rewrite every record, every
hash and ``audit.head`` consistently. The chain shows accidental damage and naive edits; against a
determined insider, copy ``audit.head`` somewhere they cannot write (the case report, a log server).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from or_agent.pipelines.errors import InputError

log = logging.getLogger(__name__)

KINDS = ("session_start", "session_stop", "config", "models", "alert_raised", "alert_updated", "alert_cleared",
         "alert_acknowledged", "alert_reannounced", "failsafe", "note", "rotated")
DEFAULT_FSYNC_KINDS = frozenset({"alert_raised", "alert_updated", "alert_cleared", "alert_acknowledged",
                                 "alert_reannounced", "failsafe", "session_start", "session_stop"})
FIELDS = frozenset({"seq", "ts", "mono_ns", "kind", "data", "prev", "hash"})
ZERO_HASH = "0" * 64
MAX_STRING = 2000
HEAD_NAME = "audit.head"
# Records are canonical JSON with sorted keys, so every one starts with this; a crash's partial last line
# is a prefix of one record, never longer than this many bytes.
RECORD_START = b'{"data":'
MAX_TAIL_BYTES = 64 * 1024
LOCK_NAME = "audit.lock"
# Keys are compared lower-cased with '-' and ' ' read as '_'; any key containing "patient" or
# "birth" is refused as well. "name" is refused outright, so name models with "model".
DENIED_KEYS = frozenset({
    "patient", "patient_id", "name", "first_name", "last_name", "surname", "given_name", "family_name",
    "full_name", "birth", "birthdate", "birth_date", "date_of_birth", "dob", "mrn", "medical_record_number",
    "ssn", "nhs_number", "insurance_id", "address", "phone", "email",
})

_FILE_RE = re.compile(r"audit-(\d{6,})\.jsonl")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_hash(record: dict) -> str:
    """sha256 hex of the canonical JSON of ``record`` without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body).encode("utf-8")).hexdigest()


def file_name(index: int) -> str:
    return f"audit-{index:06d}.jsonl"


def _index(path: Path) -> int | None:
    m = _FILE_RE.fullmatch(path.name)
    return int(m.group(1)) if m else None


def audit_files(directory: Path) -> list[Path]:
    """The directory's ``audit-*.jsonl`` files in chain order (by number, not by name: 1000000 > 999999)."""
    return sorted((p for p in Path(directory).iterdir() if _index(p) is not None and p.is_file()), key=_index)


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


def _last_line(path: Path) -> tuple[bytes | None, bool]:
    """The file's last complete line (without its newline) and whether a partial line follows it.

    Reads backwards in blocks, so reopening a large log costs the size of its last record.
    """
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        buf, pos = b"", size
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            end = buf.rfind(b"\n")
            if end != -1 and buf.rfind(b"\n", 0, end) != -1:
                break
    partial = size > 0 and not buf.endswith(b"\n")
    end = buf.rfind(b"\n")
    if end == -1:
        return None, partial
    return buf[buf.rfind(b"\n", 0, end) + 1:end], partial


def _fsync_dir(directory: Path) -> None:
    """Make a created or renamed file's directory entry durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms that cannot open a directory (Windows) have nothing to sync here
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories (EINVAL); the data itself is synced
        pass
    finally:
        os.close(fd)


def _record_problem(rec) -> str | None:
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
        if not isinstance(rec[key], str) or not _HEX64_RE.fullmatch(rec[key]):
            return f"field {key!r} is not 64 hex digits (record damaged)"
    return None


class AuditLog:
    """The writer: append records to the chain in ``directory``; thread-safe; one process per directory."""

    def __init__(self, directory: Path, max_bytes: int = 10 * 1024 * 1024,
                 fsync_kinds: frozenset[str] = DEFAULT_FSYNC_KINDS, fsync_every: int = 50):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        if fsync_every < 1:
            raise ValueError(f"fsync_every must be at least 1, got {fsync_every}")
        unknown = set(fsync_kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"fsync_kinds: unknown kind {sorted(unknown)[0]!r} (one of {', '.join(KINDS)})")
        self._dir = Path(directory)
        self._max_bytes = max_bytes
        self._fsync_kinds = frozenset(fsync_kinds)
        self._fsync_every = fsync_every
        self._lock = threading.Lock()
        self._opened = False
        self._lock_fd: int | None = None
        self._fd: int | None = None  # None while open means: the last write failed, resume on the next append
        self._path: Path | None = None
        self._size = 0
        self._seq = 0
        self._hash = ZERO_HASH
        self._unsynced = 0

    # -- public API -------------------------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        """The file being written."""
        return self._path

    @property
    def seq(self) -> int:
        """The seq of the last record written (0 before the first)."""
        return self._seq

    @property
    def last_hash(self) -> str:
        return self._hash

    def open(self) -> AuditLog:
        with self._lock:
            if self._opened:
                return self
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
                self._take_directory()
                self._resume()
            except OSError as exc:
                self._release()
                raise InputError(f"{self._dir}: cannot open the audit log ({exc.strerror or exc})") from None
            except BaseException:
                self._release()
                raise
            self._opened = True
        return self

    def close(self) -> None:
        with self._lock:
            if not self._opened:
                return
            try:
                if self._fd is not None and self._unsynced:
                    self._sync()
            finally:
                self._opened = False
                self._release()

    def __enter__(self) -> AuditLog:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def append(self, kind: str, data: dict) -> dict:
        """Write one record and return it as written. ``rotated`` is written by the log itself.

        An OSError means the record may or may not be in the file; the chain stays verifiable either
        way, and the next append continues it (in a new file if a partial line was left).
        """
        if kind not in KINDS:
            raise ValueError(f"audit kind {kind!r}: unknown (one of {', '.join(KINDS)})")
        if kind == "rotated":
            raise ValueError("audit kind 'rotated': written by the log itself when it rotates")
        check_data(data)
        with self._lock:
            if not self._opened:
                raise RuntimeError("audit log is not open (call open() or use it in a with block)")
            if self._fd is None:
                self._resume()
            line = self._write(kind, data)
            if kind in self._fsync_kinds or self._unsynced >= self._fsync_every:
                self._sync()
            if self._size >= self._max_bytes:
                try:
                    self._rotate()
                except OSError as exc:  # the record is written: report it, and retry on the next append
                    log.warning("audit log %s: rotation failed (%s); retrying on the next record", self._path, exc)
                    self._drop_fd()
        return json.loads(line)

    # -- internals (called with self._lock held) ----------------------------------------------------

    def _take_directory(self) -> None:
        # Two writers on one directory would fork the chain; an advisory lock refuses the second.
        try:
            import fcntl
        except ImportError:  # not on POSIX: no guard
            return
        fd = os.open(self._dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(f"{self._dir}: another audit writer holds this directory") from None
        self._lock_fd = fd

    def _release(self) -> None:
        self._drop_fd()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _drop_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def _resume(self) -> None:
        """Continue the chain found in the directory (or start one), never modifying what is there."""
        self._drop_fd()
        self._unsynced = 0
        files = audit_files(self._dir)
        nonempty = [p for p in files if p.stat().st_size > 0]
        newest = nonempty[-1] if nonempty else None
        # Empty files after the newest non-empty one were created just before a crash (or after a
        # rotation with nothing written since): the next file is one of them rather than a new name.
        empties = [p for p in files if newest is None or _index(p) > _index(newest)]
        next_new = empties[0] if empties else self._dir / file_name((_index(files[-1]) if files else 0) + 1)
        tail_file, tail, partial = None, None, False
        for i, p in enumerate(reversed(nonempty)):
            line, part = _last_line(p)
            if i == 0:
                partial = part
            if line is not None:
                tail_file, tail = p, self._parse_tail(p, line)
                break
        self._seq, self._hash = (tail["seq"], tail["hash"]) if tail else (0, ZERO_HASH)
        if partial:
            self._open_file(next_new)
            self._write("note", {"previous_tail": "truncated", "file": newest.name})
            self._sync()
        elif tail is None:
            self._open_file(empties[0] if empties else self._dir / file_name(1))
            self._write_head()  # so that a chain without its anchor stands out
        elif tail["kind"] == "rotated":
            self._open_file(self._dir / tail["data"]["next"])
        else:
            self._open_file(tail_file)

    def _parse_tail(self, path: Path, line: bytes) -> dict:
        try:
            rec = json.loads(line.decode("utf-8"))
        except ValueError:
            rec, why = None, "not valid JSON"
        else:
            why = _record_problem(rec)
            if why is None and record_hash(rec) != rec["hash"]:
                why = "hash mismatch"
            if why is None and rec["kind"] == "rotated" and rec["data"] != {"next": file_name(_index(path) + 1)}:
                why = "rotated record does not name the next file"
        if why is not None:
            # Not a crash (that leaves a partial line): continuing would chain onto a damaged record.
            raise InputError(f"{path}: last record is damaged ({why}); run `or-agent audit verify {self._dir}` "
                             "and move the log aside")
        return rec

    def _open_file(self, path: Path) -> None:
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o640)
        self._fd, self._path, self._size = fd, path, os.fstat(fd).st_size
        if not existed:
            _fsync_dir(self._dir)

    def _write(self, kind: str, data: dict) -> bytes:
        record = {"seq": self._seq + 1, "ts": _utc_now(), "mono_ns": time.monotonic_ns(), "kind": kind,
                  "data": data, "prev": self._hash}
        record["hash"] = record_hash(record)
        line = (canonical(record) + "\n").encode("utf-8")
        try:
            written = os.write(self._fd, line)  # one write of the whole line: a crash leaves at most its prefix
        except OSError:
            self._drop_fd()
            raise
        if written != len(line):
            self._drop_fd()
            raise OSError(errno.EIO, f"short write to {self._path} ({written} of {len(line)} bytes); "
                                     "the chain continues in a new file")
        self._seq, self._hash = record["seq"], record["hash"]
        self._size += written
        self._unsynced += 1
        return line

    def _sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError:
            self._drop_fd()  # after a failed fsync the page cache cannot be trusted: resume from disk
            raise
        self._unsynced = 0
        self._write_head()

    def _write_head(self) -> None:
        """Rewrite audit.head atomically: it names the newest record known to be on disk."""
        head = self._dir / HEAD_NAME
        tmp = head.with_name(HEAD_NAME + ".tmp")
        body = (canonical({"seq": self._seq, "hash": self._hash, "file": self._path.name}) + "\n").encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o640)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            # No directory fsync: after a crash the rename may be lost, leaving the older head, which
            # only ever lags the chain (harmless); the records themselves are already synced.
            os.replace(tmp, head)
        except OSError as exc:  # the record is durable; a lagging anchor only weakens end-of-chain checks
            log.warning("audit log %s: could not update %s (%s)", self._dir, HEAD_NAME, exc)

    def _rotate(self) -> None:
        nxt = self._dir / file_name(_index(self._path) + 1)
        self._write("rotated", {"next": nxt.name})
        self._sync()
        self._drop_fd()
        self._open_file(nxt)
        if self._size:  # a stray file with content under the next name: never append to it
            self._drop_fd()
            raise OSError(errno.EEXIST, f"{nxt} exists and is not empty")


@dataclass(frozen=True)
class VerifyResult:
    """``ok`` is False only for damage or tampering; a crash's truncated tail is a warning."""

    ok: bool
    records: int  # complete records verified (up to the first error)
    files: tuple[str, ...]
    first_error: str | None  # "audit-000001.jsonl:17: hash mismatch (record edited)"
    warnings: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "files", tuple(self.files))
        object.__setattr__(self, "warnings", tuple(self.warnings))
        if self.ok != (self.first_error is None):
            raise ValueError("VerifyResult: ok must be True exactly when there is no first_error")
        if self.records < 0:
            raise ValueError(f"VerifyResult: records must be non-negative, got {self.records}")


class _Broken(Exception):
    pass


class _Verifier:
    def __init__(self, files: list[Path], head: tuple[int, str] | None):
        self.files = files
        self.head = head
        self.records = 0
        self.expected_seq = 1
        self.prev = ZERO_HASH
        self.warnings: list[str] = []
        self.last_file: str | None = None  # the last file with content
        self.rotation: tuple[str, str, str] | None = None  # (next file, where, in file)
        self.rotation_target_seen = False
        self.truncated: tuple[str, int] | None = None  # (file, line) of a partial last line

    def run(self) -> None:
        for path in self.files:
            self._file(path)
        self._end()

    def _file(self, path: Path) -> None:
        name, lineno = path.name, 0
        try:
            with open(path, "rb") as f:
                for raw in f:
                    lineno += 1
                    if lineno == 1:
                        self._enter(name)
                    if self.rotation is not None and self.rotation[2] == name:
                        raise _Broken(f"{name}:{lineno}: data after the rotated record (files spliced?)")
                    if not raw.endswith(b"\n"):  # only ever the last piece of a file
                        self._check_tail(name, lineno, raw)
                        if self.truncated is not None:  # the file meant to continue the chain is itself cut
                            self._truncated_warning(name)
                        self.truncated = (name, lineno)
                        break
                    self._record(name, lineno, raw[:-1])
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if lineno == 0:
            # An empty file holds no records; it is the next file created just before a crash or
            # right after a rotation.
            if self.rotation is not None and self.rotation[0] == name:
                self.rotation_target_seen = True
        else:
            self.last_file = name

    def _check_tail(self, name: str, lineno: int, raw: bytes) -> None:
        """A crash mid-write leaves the beginning of one record: short, and the start of canonical JSON.
        Anything else after the last newline is damage or an insertion, not a crash."""
        where = f"{name}:{lineno}"
        if len(raw) > MAX_TAIL_BYTES:
            raise _Broken(f"{where}: {len(raw)} bytes after the last record, more than a record cut by a crash "
                          f"({MAX_TAIL_BYTES} at most): appended data")
        if not (raw.startswith(RECORD_START) or RECORD_START.startswith(raw)):
            raise _Broken(f"{where}: the bytes after the last record are not the start of a record (appended data)")
        try:
            complete = json.loads(raw.decode("utf-8"))
        except ValueError:
            return  # the beginning of a record: a crash's truncated tail
        # a whole record without its newline: a crash between the record and its newline only if it
        # continues the chain exactly
        if (not isinstance(complete, dict) or _record_problem(complete) is not None or record_hash(complete) != complete["hash"]
                or canonical(complete).encode("utf-8") != raw or complete["seq"] != self.expected_seq
                or complete["prev"] != self.prev):
            raise _Broken(f"{where}: a record without its newline that does not continue the chain (inserted?)")

    def _enter(self, name: str) -> None:
        """Checks for the move from the previous file with content to ``name``."""
        if self.last_file is None:
            return
        if self.rotation is not None:
            target, where, _ = self.rotation
            if target != name:
                raise _Broken(f"{where}: rotated to {target}, but the next file is {name} (file missing)")
            self.rotation = None
        elif self.truncated is None:
            raise _Broken(f"{name}: follows {self.last_file}, which does not end with a rotated record "
                          "(records removed or files out of order)")

    def _truncated_warning(self, continued_in: str | None) -> None:
        tname, tline = self.truncated
        if continued_in:
            self.warnings.append(f"{tname}:{tline}: truncated last record (crash mid-write); "
                                 f"the chain continues in {continued_in}")
        else:
            self.warnings.append(f"{tname}:{tline}: truncated last record (crash mid-write); everything before it verifies")
        self.truncated = None

    def _record(self, name: str, lineno: int, raw: bytes) -> None:
        where = f"{name}:{lineno}"
        try:
            rec = json.loads(raw.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError is a ValueError
            raise _Broken(f"{where}: not valid JSON (record damaged)") from None
        why = _record_problem(rec)
        if why is not None:
            raise _Broken(f"{where}: {why}")
        if record_hash(rec) != rec["hash"]:
            raise _Broken(f"{where}: hash mismatch (record edited)")
        if canonical(rec).encode("utf-8") != raw:  # e.g. a duplicated key that another parser reads differently
            raise _Broken(f"{where}: not in canonical form (record edited)")
        if self.truncated is not None and lineno == 1:
            tname = self.truncated[0]
            if rec["kind"] != "note" or rec["data"] != {"previous_tail": "truncated", "file": tname}:
                raise _Broken(f"{where}: {tname} ends with a truncated record, but {name} does not start with "
                              "the continuation note (records removed?)")
            self._truncated_warning(name)
        if self.records == 0:
            if rec["seq"] != 1:
                raise _Broken(f"{where}: chain starts at seq {rec['seq']}, not 1 (earlier records or files removed)")
            if rec["prev"] != ZERO_HASH:
                raise _Broken(f"{where}: first record's prev is not 64 zeros (earlier records removed)")
        else:
            if rec["seq"] != self.expected_seq:
                raise _Broken(f"{where}: seq {rec['seq']} where {self.expected_seq} was expected "
                              "(records removed or reordered)")
            if rec["prev"] != self.prev:
                raise _Broken(f"{where}: prev does not match the hash of the record before it "
                              "(records edited, removed or reordered)")
        if self.head is not None and rec["seq"] == self.head[0] and rec["hash"] != self.head[1]:
            raise _Broken(f"{where}: hash differs from the one audit.head holds for seq {rec['seq']} (records rewritten)")
        if rec["kind"] == "rotated":
            if set(rec["data"]) != {"next"} or not isinstance(rec["data"]["next"], str):
                raise _Broken(f"{where}: rotated record does not name the next file (record damaged)")
            self.rotation = (rec["data"]["next"], where, name)
            self.rotation_target_seen = False
        self.records += 1
        self.expected_seq = rec["seq"] + 1
        self.prev = rec["hash"]

    def _end(self) -> None:
        if self.truncated is not None:
            self._truncated_warning(None)
        if self.rotation is not None and not self.rotation_target_seen:
            target, where, in_file = self.rotation
            in_dir = next(p.parent for p in self.files if p.name == in_file)
            if not (in_dir / target).exists():
                raise _Broken(f"{where}: rotated to {target}, which is missing (file removed)")
            self.warnings.append(f"{where}: the chain continues in {target}, which was not given")
        if self.head is not None and self.expected_seq - 1 < self.head[0]:
            raise _Broken(f"chain ends at seq {self.expected_seq - 1} but audit.head says {self.head[0]} "
                          "(records removed from the end)")
        if self.head is not None and self.head[0] < self.expected_seq - 1:
            # the agent rewrites the head after each fsync, so it lags only if it crashed in between:
            # otherwise the anchor was rolled back, and then records removed from the end would pass
            self.warnings.append(f"{HEAD_NAME} names seq {self.head[0]} but the chain runs to seq {self.expected_seq - 1}: "
                                 "rolled back, or the agent crashed before updating it; records removed from the end "
                                 "after seq " f"{self.head[0]} would go unnoticed")


def _expand(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = audit_files(p)
            if not found:
                raise InputError(f"{p}: no audit-*.jsonl files in this directory")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or directory")
    if not files:
        raise InputError("audit verify: no files given")
    return files


def _head_for(files: list[Path], warnings: list[str]) -> tuple[int, str] | None:
    """The anchor that applies: only when the given files reach the newest file of their directory."""
    directory = files[-1].parent
    numbered = audit_files(directory)
    given = {p.resolve() for p in files}
    if not numbered or numbered[-1].resolve() not in given:
        return None
    head = directory / HEAD_NAME
    if not head.exists():
        warnings.append(f"{HEAD_NAME} missing: records removed from the end of the chain would go unnoticed")
        return None
    try:
        obj = json.loads(head.read_bytes().decode("utf-8"))
        seq, digest = obj["seq"], obj["hash"]
        if type(seq) is not int or seq < 0 or not isinstance(digest, str) or not _HEX64_RE.fullmatch(digest):
            raise ValueError
    except OSError as exc:
        raise InputError(f"{head}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError):
        raise _Broken(f"{HEAD_NAME}: not valid (damaged or edited)") from None
    return seq, digest


def verify(paths: Sequence[Path]) -> VerifyResult:
    """Verify the chain through ``paths``: files in the given order, a directory meaning all its audit files."""
    files = _expand(paths)
    warnings: list[str] = []
    try:
        head = _head_for(files, warnings)
    except _Broken as exc:
        return VerifyResult(False, 0, tuple(map(str, files)), str(exc), tuple(warnings))
    v = _Verifier(files, head)
    v.warnings = warnings
    try:
        v.run()
        error = None
    except _Broken as exc:
        error = str(exc)
    return VerifyResult(ok=error is None, records=v.records, files=tuple(map(str, files)), first_error=error,
                        warnings=tuple(v.warnings))


def cmd_audit_verify(args) -> int:
    """``or-agent audit verify PATH...``: one line, exit 0 if the chain is intact, 1 if it is broken."""
    result = verify([Path(p) for p in args.paths])
    if not result.ok:
        print(f"BROKEN: {result.first_error}")
        return 1
    print(f"ok: {result.records} records in {len(result.files)} files, chain intact")
    for w in result.warnings:
        print(f"warning: {w}")
    return 0
