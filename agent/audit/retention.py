"""Retention of the audit trail: removing whole old files by age and total size, on the record.

A box keeps its trail for as long as the hospital's policy says (``[audit] retention_days``,
``retention_mb``; 0 keeps it forever), and no longer fills its disk. Pruning removes only whole files,
oldest first, as one unbroken run from the start of the chain, and never the newest file with records
(it holds the chain's head, and the writer appends to it). A file goes when its last record is older
than ``retention_days`` or, oldest first, while the trail is bigger than ``retention_mb``.

Before removing anything, the pruning is written into the trail itself as a ``pruned`` record (fsynced):
which files, their first and last seq and their last record's hash, and where the chain now starts
(``first_seq`` and ``first_prev``: the first kept record's seq and ``prev``). ``agent.audit.verify``
accepts a chain starting after record 1 only when such a record names exactly that start, and says
"starts at record N after pruning"; files removed any other way are still reported as missing. A crash
between the record and the removal leaves the files in place (the record then names a start the chain
does not have, which the verifier ignores) and the next pruning removes them.

Pruning runs through the agent's own ``AuditLog`` (it holds the directory's lock): at start and then
daily (``AuditRetention``), or with ``or-agent audit prune`` while no agent writes the directory.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from or_agent.agent.audit.chain import audit_files
from or_agent.agent.audit.writer import AuditLog, _last_line
from or_agent.pipelines.files import fsync_dir

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 24 * 3600.0
MIB = 1024 * 1024


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class RetentionPolicy:
    days: int = 0  # 0: no age limit
    mb: int = 0  # 0: no size limit

    def __post_init__(self):
        for key in ("days", "mb"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"retention {key}: must be a non-negative integer, got {value!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.days or self.mb)


@dataclass(frozen=True)
class _FileSpan:
    path: Path
    size: int
    first_seq: int
    first_prev: str
    last_seq: int
    last_hash: str
    last_time: datetime


@dataclass(frozen=True)
class PruneResult:
    removed: tuple[Path, ...]
    freed_bytes: int
    first_seq: int | None  # where the chain now starts (None: nothing removed)

    def __post_init__(self):
        object.__setattr__(self, "removed", tuple(self.removed))


def _span(path: Path) -> _FileSpan | None:
    """The file's first and last complete records, or None when they cannot be read (then nothing
    from it on is pruned: what cannot be described is not removed)."""
    try:
        with open(path, "rb") as fh:
            head = fh.readline()
        tail, _ = _last_line(path)  # reads from the end: a file's size does not matter
        if not head.endswith(b"\n") or tail is None:
            return None
        first, last = json.loads(head), json.loads(tail)
        ts = datetime.fromisoformat(str(last["ts"]).replace("Z", "+00:00"))
        return _FileSpan(path, path.stat().st_size, int(first["seq"]), str(first["prev"]), int(last["seq"]),
                         str(last["hash"]), ts)
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def plan_prune(directory: Path, policy: RetentionPolicy, now: datetime) -> tuple[list[_FileSpan], _FileSpan | None]:
    """The files to remove (oldest first) and the first file kept, under ``policy`` at ``now``."""
    if not policy.enabled:
        return [], None
    files = audit_files(directory)
    nonempty = [p for p in files if p.stat().st_size > 0]
    spans: list[_FileSpan] = []
    for p in nonempty:
        s = _span(p)
        if s is None:
            break
        spans.append(s)
    if len(spans) < 2:
        return [], None
    candidates = spans[:-1]  # never the newest readable file: the newest of all holds the chain's head
    cut = 0
    if policy.days:
        limit = now - timedelta(days=policy.days)
        while cut < len(candidates) and candidates[cut].last_time < limit:
            cut += 1
    if policy.mb:
        total = sum(p.stat().st_size for p in files)
        removed = sum(s.size for s in candidates[:cut])
        size_cut = cut
        while size_cut < len(candidates) and total - removed > policy.mb * MIB:
            removed += candidates[size_cut].size
            size_cut += 1
        cut = max(cut, size_cut)
    return candidates[:cut], spans[cut] if cut else None


def prune(audit_log: AuditLog, policy: RetentionPolicy, now: datetime | None = None) -> PruneResult:
    """Record and then remove the files ``plan_prune`` selects, through the open writer ``audit_log``."""
    if audit_log.path is None:
        raise RuntimeError("audit log is not open")
    directory = audit_log.path.parent
    doomed, first_kept = plan_prune(directory, policy, now or _utc_now())
    if not doomed or first_kept is None:
        return PruneResult((), 0, None)
    audit_log.append("pruned", {
        "removed": [{"file": s.path.name, "first_seq": s.first_seq, "last_seq": s.last_seq, "last_hash": s.last_hash,
                     "bytes": s.size} for s in doomed],
        "first_seq": first_kept.first_seq, "first_prev": first_kept.first_prev,
        "retention_days": policy.days, "retention_mb": policy.mb,
    })
    for s in doomed:
        s.path.unlink(missing_ok=True)
    fsync_dir(directory)
    log.info("audit trail %s: pruned %d file(s) (%d bytes); the chain now starts at record %d",
             directory, len(doomed), sum(s.size for s in doomed), first_kept.first_seq)
    return PruneResult(tuple(s.path for s in doomed), sum(s.size for s in doomed), first_kept.first_seq)



class AuditRetention:
    """Prunes the agent's trail at start and then every ``every_s`` on a thread of its own."""

    def __init__(self, audit_log: AuditLog, policy: RetentionPolicy, every_s: float = PRUNE_EVERY_S,
                 clock: Callable[[], datetime] = _utc_now):
        self._log, self._policy, self._every_s, self._clock = audit_log, policy, every_s, clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0  # prunings attempted (for tests and status)

    def start(self) -> AuditRetention:
        if self._policy.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="audit-retention", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30.0)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                prune(self._log, self._policy, self._clock())
            except Exception:  # a failed pruning must never stop the agent; it is retried next time
                log.exception("audit trail pruning failed; retrying in %.0f s", self._every_s)
            self.runs += 1
            self._stop.wait(self._every_s)
