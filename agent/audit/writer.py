"""The audit trail's writer: ``AuditLog`` appends records to the chain, durably, and rotates its files.

Only the agent writes the trail, and how it does so (what is fsynced when, how a crash is survived)
is a durability policy, separate from what a record is (``agent.audit.chain``) and from how a trail
is checked (``agent.audit.verify``).

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

Damage found at open. Before continuing a chain the writer verifies the stretch it continues (the
file holding the last record, from its start, and any after it; ``agent.audit.verify.verify_from``,
against ``audit.head`` too). If that stretch is damaged (an edited, removed or reordered record, a
rolled-back anchor...) it does not chain onto it: it starts a new segment in a new file with a
``chain_damaged`` record (``agent.audit.chain.damage_record``: what was found, from which file it had
checked, the last record it read) whose ``prev`` is 64 zeros, and says so in ``damage``. The verifier
shows that break as a warning naming where, and verifies the new segment. A damaged *last* record is
still refused at open (there is no record to number on from that can be trusted).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from pathlib import Path

from or_agent.agent.audit.chain import (
    HEAD_NAME,
    KINDS,
    ZERO_HASH,
    audit_files,
    canonical,
    check_data,
    continuation_note,
    damage_record,
    file_index,
    file_name,
    new_record,
    record_hash,
    record_line,
    record_problem,
)
from or_agent.agent.audit.verify import verify_from
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.files import fsync_dir

log = logging.getLogger(__name__)

DEFAULT_FSYNC_KINDS = frozenset({"alert_raised", "alert_updated", "alert_cleared", "alert_acknowledged",
                                 "alert_reannounced", "failsafe", "session_start", "session_stop", "chain_damaged"})
LOCK_NAME = "audit.lock"


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
        # a ``pruned`` record must be on disk before the files it names are removed (agent.audit.retention)
        self._fsync_kinds = frozenset(fsync_kinds) | {"pruned"}
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
        self._damage: str | None = None

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

    @property
    def damage(self) -> str | None:
        """What ``open`` found wrong with the chain it continues, and where it restarted it; None if intact."""
        return self._damage

    def open(self) -> AuditLog:
        with self._lock:
            if self._opened:
                return self
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
                self._take_directory()
                self._resume(check=True)
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
        if kind in ("rotated", "chain_damaged"):
            raise ValueError(f"audit kind {kind!r}: written by the log itself when it {'rotates' if kind == 'rotated' else 'opens'}")
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

    def _resume(self, check: bool = False) -> None:
        """Continue the chain found in the directory (or start one), never modifying what is there.
        With ``check`` (at open) the stretch continued is verified first, and a new segment started if
        it is damaged."""
        self._drop_fd()
        self._unsynced = 0
        files = audit_files(self._dir)
        nonempty = [p for p in files if p.stat().st_size > 0]
        newest = nonempty[-1] if nonempty else None
        # Empty files after the newest non-empty one were created just before a crash (or after a
        # rotation with nothing written since): the next file is one of them rather than a new name.
        empties = [p for p in files if newest is None or file_index(p) > file_index(newest)]
        next_new = empties[0] if empties else self._dir / file_name((file_index(files[-1]) if files else 0) + 1)
        tail_file, tail, partial = None, None, False
        for i, p in enumerate(reversed(nonempty)):
            line, part = _last_line(p)
            if i == 0:
                partial = part
            if line is not None:
                tail_file, tail = p, self._parse_tail(p, line)
                break
        self._seq, self._hash = (tail["seq"], tail["hash"]) if tail else (0, ZERO_HASH)
        problem = self._check_stretch(files, tail_file) if check and tail_file is not None else None
        if problem is not None:
            self._open_file(next_new)
            self._hash = ZERO_HASH  # a new segment: nothing before it is vouched for
            self._write("chain_damaged", damage_record(problem, tail_file.name, tail["seq"], tail["hash"]))
            self._sync()
            self._damage = f"{problem}; chain restarted in {next_new.name}"
            log.error("audit log %s: the chain is damaged (%s); restarted it in %s. Run `or-agent audit verify %s`",
                      self._dir, problem, next_new.name, self._dir)
        elif partial:
            self._open_file(next_new)
            self._write("note", continuation_note(newest.name))
            self._sync()
        elif tail is None:
            self._open_file(empties[0] if empties else self._dir / file_name(1))
            self._write_head()  # so that a chain without its anchor stands out
        elif tail["kind"] == "rotated":
            self._open_file(self._dir / tail["data"]["next"])
        else:
            self._open_file(tail_file)

    def _check_stretch(self, files: list[Path], tail_file: Path) -> str | None:
        """The first problem in the stretch of the chain about to be continued (the file holding the
        last record, from its start, and any after it), or None if it verifies."""
        start = file_index(tail_file)
        result = verify_from([p for p in files if file_index(p) >= start])
        return result.first_error

    def _parse_tail(self, path: Path, line: bytes) -> dict:
        try:
            rec = json.loads(line.decode("utf-8"))
        except ValueError:
            rec, why = None, "not valid JSON"
        else:
            why = record_problem(rec)
            if why is None and record_hash(rec) != rec["hash"]:
                why = "hash mismatch"
            if why is None and rec["kind"] == "rotated" and rec["data"] != {"next": file_name(file_index(path) + 1)}:
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
            fsync_dir(self._dir)

    def _write(self, kind: str, data: dict) -> bytes:
        record = new_record(self._seq + 1, kind, data, self._hash)
        line = record_line(record)
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
        nxt = self._dir / file_name(file_index(self._path) + 1)
        self._write("rotated", {"next": nxt.name})
        self._sync()
        self._drop_fd()
        self._open_file(nxt)
        if self._size:  # a stray file with content under the next name: never append to it
            self._drop_fd()
            raise OSError(errno.EEXIST, f"{nxt} exists and is not empty")
