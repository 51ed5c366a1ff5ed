"""Verifying an audit trail: read it back and report the first broken record, or that it is intact.

Verification runs wherever a trail is checked (``or-agent audit verify``, an auditor's machine, and the
writer itself as it opens, over the stretch it continues), and must not trust anything the writer
believed: it re-derives every hash and link from the bytes on disk, with only ``agent.audit.chain``'s
rules in common with the writer.

What ``verify`` detects: a damaged line (not JSON, missing or unexpected fields), an edited record
(hash mismatch), an edited record whose hash was recomputed (the next record's ``prev``), deleted,
duplicated or reordered records (seq and ``prev``), a missing first, middle or last file (seq, the
``rotated`` record's next file), a file truncated mid-record (reported as a truncated tail, a warning
when it is a crash's, an error when the chain goes on without the continuation note), and records
removed from the end, by comparing the chain's end with ``audit.head``. Without the anchor, removing
records from the end of a hash chain cannot be detected; with it, only records written since the
last fsync (never an alert, failsafe or session record) can go unnoticed. What the chain cannot show
at all is in ``agent.audit.chain`` (Limits).

Recorded breaks. The writer runs ``verify_from`` over the stretch of the chain it continues when it
opens (the file it appends to, from its start). If that is damaged it does not chain onto it: it starts
a new segment with a ``chain_damaged`` record (``agent.audit.chain.damage_record``). ``verify`` accepts
such a break, as a warning naming where the chain broke and where the new segment starts, when the
first damage it finds lies in the stretch the writer had checked (from its ``checked_from`` file on);
damage before that stretch was never recorded and stays an error, and so does any damage after the
new segment starts. The records between the damage and the new segment are not verified.

Pruned chains. Retention (``agent.audit.retention``) removes whole old files after writing a ``pruned``
record that names where the chain then starts (``first_seq``, ``first_prev``). A chain whose oldest
file starts after record 1 verifies only when a ``pruned`` record in it names exactly that start; it is
then intact, with the note "starts at record N after pruning". Without such a record it is still an
error (earlier files removed), and so is a later file given on its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from or_agent.agent.audit.chain import (
    HEAD_NAME,
    HEX64_RE,
    RECORD_START,
    ZERO_HASH,
    audit_files,
    canonical,
    continuation_note,
    file_index,
    is_restart,
    record_hash,
    record_problem,
)
from or_agent.pipelines.errors import InputError

# A crash's partial last line is a prefix of one record, never longer than this many bytes.
MAX_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class VerifyResult:
    """``ok`` is False only for damage or tampering; a crash's truncated tail is a warning."""

    ok: bool
    records: int  # complete records verified (up to the first error)
    files: tuple[str, ...]
    first_error: str | None  # "audit-000001.jsonl:17: hash mismatch (record edited)"
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # what is fine but worth saying ("starts at record 120 after pruning")

    def __post_init__(self):
        object.__setattr__(self, "files", tuple(self.files))
        object.__setattr__(self, "warnings", tuple(self.warnings))
        object.__setattr__(self, "notes", tuple(self.notes))
        if self.ok != (self.first_error is None):
            raise ValueError("VerifyResult: ok must be True exactly when there is no first_error")
        if self.records < 0:
            raise ValueError(f"VerifyResult: records must be non-negative, got {self.records}")


class _Broken(Exception):
    pass


class _Verifier:
    def __init__(self, files: list[Path], head: tuple[int, str] | None, from_middle: bool = False):
        self.files = files
        self.head = head
        self.from_middle = from_middle  # the first record is taken as given: the stretch starts mid-chain
        self.pending_break: str | None = None  # damage found, to be matched with the new segment that records it
        self.records = 0
        self.expected_seq = 1
        self.prev = ZERO_HASH
        self.warnings: list[str] = []
        self.last_file: str | None = None  # the last file with content
        self.rotation: tuple[str, str, str] | None = None  # (next file, where, in file)
        self.rotation_target_seen = False
        self.truncated: tuple[str, int] | None = None  # (file, line) of a partial last line
        self.pruned_start: tuple[int, str, str] | None = None  # (seq, prev, the error if no pruning recorded it)
        self.pruned_start_recorded = False
        self.notes: list[str] = []

    def run(self) -> None:
        i = 0
        while i < len(self.files):
            try:
                self._file(self.files[i])
                i += 1
            except _Broken as exc:
                j = self._recorded_restart(i)
                if j is None:
                    raise
                self.pending_break = str(exc)
                i = j
        self._end()

    def _recorded_restart(self, broken: int) -> int | None:
        """The index of the file that opens the new segment recording damage found in ``files[broken]``,
        or None: the first new segment after it must have been started by a writer that had checked
        the chain from that file or an earlier one."""
        for j in range(broken + 1, len(self.files)):
            rec = self._restart_record(self._first_line(self.files[j]))
            if rec is None:
                continue
            checked_from, damaged = file_index(Path(rec["data"]["checked_from"])), file_index(self.files[broken])
            covered = checked_from is not None and damaged is not None and checked_from <= damaged
            return j if covered else None
        return None

    @staticmethod
    def _first_line(path: Path) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.readline(MAX_TAIL_BYTES + 1)
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None

    @staticmethod
    def _restart_record(raw: bytes) -> dict | None:
        """The record on this line if it is an intact ``chain_damaged`` record opening a new segment."""
        if not raw.endswith(b"\n"):
            return None
        try:
            rec = json.loads(raw[:-1].decode("utf-8"))
        except ValueError:
            return None
        if (record_problem(rec) is not None or record_hash(rec) != rec["hash"]
                or canonical(rec).encode("utf-8") != raw[:-1] or not is_restart(rec)):
            return None
        return rec

    def _restart(self, name: str, rec: dict) -> None:
        """A new segment starts at line 1 of ``name``: the chain before it ends here, by record."""
        where = f"{name}:1"
        if self.pending_break is not None:
            self.warnings.append(f"{self.pending_break}; the agent found this damage and recorded it at {where} "
                                 f"(chain_damaged, seq {rec['seq']}), where a new segment starts; records from the "
                                 "damage to there are not verified")
            self.pending_break = None
        else:
            self.warnings.append(f"{where}: the agent found the chain damaged ({rec['data']['problem']}) and "
                                 f"started a new segment here (seq {rec['seq']})")
        if self.truncated is not None:
            self._truncated_warning(name)
        self.rotation = None
        self._check_head(where, rec)
        self.records += 1
        self.expected_seq = rec["seq"] + 1
        self.prev = rec["hash"]

    def _check_head(self, where: str, rec: dict) -> None:
        if self.head is not None and rec["seq"] == self.head[0] and rec["hash"] != self.head[1]:
            raise _Broken(f"{where}: hash differs from the one audit.head holds for seq {rec['seq']} (records rewritten)")

    def _file(self, path: Path) -> None:
        name, lineno = path.name, 0
        try:
            with open(path, "rb") as f:
                for raw in f:
                    lineno += 1
                    if lineno == 1:
                        restart = self._restart_record(raw)
                        if restart is not None:
                            self._restart(name, restart)
                            continue
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
        if (not isinstance(complete, dict) or record_problem(complete) is not None or record_hash(complete) != complete["hash"]
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
        why = record_problem(rec)
        if why is not None:
            raise _Broken(f"{where}: {why}")
        if record_hash(rec) != rec["hash"]:
            raise _Broken(f"{where}: hash mismatch (record edited)")
        if canonical(rec).encode("utf-8") != raw:  # e.g. a duplicated key that another parser reads differently
            raise _Broken(f"{where}: not in canonical form (record edited)")
        if self.truncated is not None and lineno == 1:
            tname = self.truncated[0]
            if rec["kind"] != "note" or rec["data"] != continuation_note(tname):
                raise _Broken(f"{where}: {tname} ends with a truncated record, but {name} does not start with "
                              "the continuation note (records removed?)")
            self._truncated_warning(name)
        if self.records == 0 and self.from_middle:
            pass  # the stretch's first record: what comes before it is not being checked
        elif self.records == 0:
            if rec["seq"] != 1:
                problem = f"{where}: chain starts at seq {rec['seq']}, not 1 (earlier records or files removed)"
                if not self._starts_its_directory():
                    raise _Broken(problem)
                # pruned, if a later ``pruned`` record names exactly this start (checked at the end)
                self.pruned_start = (rec["seq"], rec["prev"], problem)
            elif rec["prev"] != ZERO_HASH:
                raise _Broken(f"{where}: first record's prev is not 64 zeros (earlier records removed)")
        else:
            if rec["seq"] != self.expected_seq:
                raise _Broken(f"{where}: seq {rec['seq']} where {self.expected_seq} was expected "
                              "(records removed or reordered)")
            if rec["prev"] != self.prev:
                raise _Broken(f"{where}: prev does not match the hash of the record before it "
                              "(records edited, removed or reordered)")
        self._check_head(where, rec)
        if rec["kind"] == "pruned" and self.pruned_start is not None and not self.pruned_start_recorded:
            data = rec["data"]
            self.pruned_start_recorded = (data.get("first_seq"), data.get("first_prev")) == self.pruned_start[:2]
        if rec["kind"] == "rotated":
            if set(rec["data"]) != {"next"} or not isinstance(rec["data"]["next"], str):
                raise _Broken(f"{where}: rotated record does not name the next file (record damaged)")
            self.rotation = (rec["data"]["next"], where, name)
            self.rotation_target_seen = False
        self.records += 1
        self.expected_seq = rec["seq"] + 1
        self.prev = rec["hash"]

    def _starts_its_directory(self) -> bool:
        """Whether the first file given is the oldest audit file of its directory (a pruned chain's start);
        a later file given on its own is a stretch, not a pruned chain."""
        first = self.files[0]
        numbered = audit_files(first.parent) if file_index(first) is not None else []
        return bool(numbered) and numbered[0].resolve() == first.resolve()

    def _end(self) -> None:
        if self.pruned_start is not None:
            if not self.pruned_start_recorded:
                raise _Broken(self.pruned_start[2])
            self.notes.append(f"starts at record {self.pruned_start[0]} after pruning")
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
        if type(seq) is not int or seq < 0 or not isinstance(digest, str) or not HEX64_RE.fullmatch(digest):
            raise ValueError
    except OSError as exc:
        raise InputError(f"{head}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError):
        raise _Broken(f"{HEAD_NAME}: not valid (damaged or edited)") from None
    return seq, digest


def verify(paths: Sequence[Path]) -> VerifyResult:
    """Verify the chain through ``paths``: files in the given order, a directory meaning all its audit files."""
    return _verify(_expand(paths), from_middle=False)


def verify_from(paths: Sequence[Path]) -> VerifyResult:
    """Verify a stretch of a chain that starts mid-chain, as the writer does with the files it continues:
    the first record of the first file is taken as given (its seq and ``prev`` are not checked against
    the files before it); everything after it is checked as ``verify`` does, against ``audit.head`` too."""
    return _verify(_expand(paths), from_middle=True)


def _verify(files: list[Path], from_middle: bool) -> VerifyResult:
    warnings: list[str] = []
    try:
        head = _head_for(files, warnings)
    except _Broken as exc:
        return VerifyResult(False, 0, tuple(map(str, files)), str(exc), tuple(warnings))
    v = _Verifier(files, head, from_middle)
    v.warnings = warnings
    try:
        v.run()
        error = None
    except _Broken as exc:
        error = str(exc)
    return VerifyResult(ok=error is None, records=v.records, files=tuple(map(str, files)), first_error=error,
                        warnings=tuple(v.warnings), notes=tuple(v.notes) if error is None else ())
