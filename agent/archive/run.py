"""``or-agent archive run``: replay every case of an archive on a Ray cluster, resumably.

Each Ray worker holds one ``LoadedModels`` (an actor; one GPU each when the cluster has GPUs) and replays
one video at a time with replay's own ``replay_one``, into ``OUT/.tmp-<case>-<random>/`` beside the final
folder, so on the same (shared) storage; it writes ``DONE.json`` into that folder and renames it to
``OUT/<case id>/``. A case folder therefore either holds a complete replay with its ``DONE.json`` or
does not exist, and since the workers publish their own results, a killed driver loses nothing completed.

``DONE.json`` records the input's fingerprint, the model set's identity and every file of the case with its
size; a rerun skips a case whose fingerprint and model set match and whose files are all there at their
sizes, and redoes it otherwise (so a folder half-deleted or half-copied behind the rename is never done).
The fingerprint is the file's size and the sha256 of its first and last MiB, not a full sha256: the
driver checks every case of a 10,000-case archive on each rerun, and reading ~10 TB to skip them would
cost as much as a replay; a re-encode or a different recording changes the size or the container's
header/index (at the start or end of an MP4), while the mtime, which a copy of the archive changes, is
left out.

The driver keeps at most ``in_flight_per_worker`` videos queued per worker (backpressure: the task
queue never holds the whole archive), retries a failed video up to ``retries`` times, records permanent
failures in ``OUT/failures.json`` and reports them at the end without stopping the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from or_agent.agent.archive.sources import Case, list_cases
from or_agent.pipelines.errors import DependencyError, InputError, OrAgentError
from or_agent.pipelines.files import atomic_write_text, make_output_dir, refuse_file_in_the_way

DONE_FILE = "DONE.json"
FAILURES_FILE = "failures.json"
FINGERPRINT_BYTES = 1 << 20  # the head and tail read per input
_TMP_PREFIX, _OLD_PREFIX = ".tmp-", ".old-"


@dataclass(frozen=True)
class ArchiveOptions:
    out: Path
    ray_address: str = "local"  # "local": start Ray on this machine; else a cluster's address ("auto", "host:port")
    models: str | None = None
    workers: int | None = None  # default: one per CPU of the cluster (one per GPU where it has GPUs)
    retries: int = 2
    in_flight_per_worker: int = 2

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--workers must be at least 1, got {self.workers}")
        if self.retries < 0:
            raise InputError(f"--retries must be 0 or more, got {self.retries}")
        if self.in_flight_per_worker < 1:
            raise InputError("in-flight videos per worker must be at least 1")
        if not self.ray_address:
            raise InputError("--ray needs 'local' or a cluster address (host:port, auto, ray://host:port)")


def input_fingerprint(video: Path) -> dict[str, Any]:
    """Size and the sha256 of the first and last MiB (see the module doc for why not the whole file)."""
    try:
        size = video.stat().st_size
        h = hashlib.sha256()
        with open(video, "rb") as fh:
            h.update(fh.read(FINGERPRINT_BYTES))
            if size > FINGERPRINT_BYTES:
                fh.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                h.update(fh.read(FINGERPRINT_BYTES))
    except OSError as exc:
        return {"error": exc.strerror or str(exc)}  # unreadable: never matches, so the case is tried (and reported)
    return {"size": size, "sha256_head_tail": h.hexdigest()}


def model_set_fingerprint(models: str | None) -> dict[str, Any]:
    """The model set's identity: name, version, each model's sha256 and the rules' sha256; a bad set is
    refused here, before any cluster starts."""
    from or_agent.pipelines.model_set import load_model_set

    s = load_model_set(models)
    ident = {"name": s.name, "version": s.version, "models": {m.name: m.sha256 for m in s.models},
             "rules_sha256": hashlib.sha256(s.rules_file.read_bytes()).hexdigest() if s.rules_file.is_file() else ""}
    ident["id"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return ident


def case_files(case_dir: Path) -> dict[str, int]:
    """Every file of a case folder but its ``DONE.json``, with its size (what ``DONE.json`` lists)."""
    return {p.relative_to(case_dir).as_posix(): p.stat().st_size for p in sorted(case_dir.rglob("*"))
            if p.is_file() and p != case_dir / DONE_FILE}


def is_done(case_dir: Path, fingerprint: dict, model_set: dict) -> bool:
    """Whether the case folder holds a replay of this input with this model set, every file it listed there."""
    try:
        done = json.loads((case_dir / DONE_FILE).read_text())
        if not (isinstance(done, dict) and done.get("input") == fingerprint
                and isinstance(done.get("model_set"), dict) and done["model_set"].get("id") == model_set["id"]):
            return False
        files = done.get("files")
        return isinstance(files, dict) and bool(files) and all(
            isinstance(size, int) and (case_dir / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError):
        return False


def _publish(produced: Path, final: Path) -> None:
    """Put a complete case folder in place: renames only, so readers see the old one or the new one."""
    if final.exists():
        old = final.with_name(f"{_OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(produced, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(produced, final)


class ReplayWorker:
    """One per Ray worker (as an actor): the models loaded once, then one video after another."""

    def __init__(self, models: str | None, out: str):
        from or_agent.agent.session import LoadedModels

        self.models = LoadedModels(models, live_session=False)
        self.out = Path(out)
        self.node = socket.gethostname()

    def replay(self, case: Case, done_record: dict) -> dict:
        from or_agent.agent.offline.replay import replay_one

        tmp_root = self.out / f"{_TMP_PREFIX}{case.case_id}-{uuid.uuid4().hex[:8]}"
        t0 = time.monotonic()
        try:
            summary = replay_one(case.replay_inputs(), tmp_root, self.models, False, None, case.case_id).summary
            produced = tmp_root / case.video.stem
            wall_s = time.monotonic() - t0
            record = {**done_record, "frames": summary["frames"], "duration_s": summary["duration_s"],
                      "wall_s": round(wall_s, 3), "node": self.node, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "files": case_files(produced)}
            atomic_write_text(produced / DONE_FILE, json.dumps(record, indent=1) + "\n")
            _publish(produced, self.out / case.case_id)
            return {"ok": True, "frames": summary["frames"], "wall_s": wall_s, "complete": summary["complete"]}
        except OrAgentError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug or a broken file deep in a decoder: this case fails, the worker goes on
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)

    def close(self) -> None:
        self.models.close()


class ArchiveProgress:
    """Progress lines on the driver: cases done, in flight, videos/h and frames/s across the cluster,
    ETA. A line on each finished case, and every ``every_s`` while waiting."""

    def __init__(self, total: int, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 every_s: float = 30.0):
        self.total, self.stream, self.clock, self.every_s = total, stream or sys.stdout, clock, every_s
        self.t0 = clock()
        self.done = self.failed = self.frames = 0
        self._last = self.t0

    def finished(self, ok: bool, frames: int = 0) -> None:
        self.done += ok
        self.failed += not ok
        self.frames += frames

    def line(self, in_flight: int) -> str:
        elapsed = max(1e-9, self.clock() - self.t0)
        finished = self.done + self.failed
        per_h = 3600.0 * self.done / elapsed
        eta = f"{(self.total - finished) * elapsed / finished:.0f} s" if finished else "?"
        return (f"archive: {finished}/{self.total} cases finished ({self.failed} failed), {in_flight} in flight; "
                f"{per_h:.0f} videos/h, {self.frames / elapsed:.1f} frames/s; ETA {eta}")

    def maybe_print(self, in_flight: int, force: bool = False) -> None:
        now = self.clock()
        if force or now - self._last >= self.every_s:
            self._last = now
            print(self.line(in_flight), file=self.stream, flush=True)


def _check_reachable(address: str) -> None:
    """A quick one-line error for a head that does not answer, instead of Ray's long retries."""
    target = address.removeprefix("ray://")
    if address in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        raise InputError(f"--ray {address}: no Ray cluster answers there ({getattr(exc, 'strerror', None) or exc})") from None


def _start_ray(options: ArchiveOptions):
    """Ray, connected (or started locally); returns (ray, started_here)."""
    try:
        import ray
    except ImportError:
        raise DependencyError("archive run needs Ray: pip install 'or-agent[archive]'") from None
    if ray.is_initialized():
        return ray, False  # a caller (a test, a notebook) already holds a session: use it, leave it running
    try:
        if options.ray_address == "local":
            ray.init(num_cpus=options.workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        else:
            _check_reachable(options.ray_address)
            ray.init(address=options.ray_address, log_to_driver=False, logging_level=logging.WARNING)
    except OrAgentError:
        raise
    except Exception as exc:
        raise InputError(f"--ray {options.ray_address}: cannot start or join Ray ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return ray, True


def _clean_leftovers(out: Path) -> None:
    """Folders a killed run left half-written (never a completed case: those are renamed into place)."""
    for p in out.iterdir():
        if p.is_dir() and (p.name.startswith(_TMP_PREFIX) or p.name.startswith(_OLD_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class RunOutcome:
    cases: int
    skipped: list[str]
    replayed: list[str]
    failures: list[dict]
    attempts: dict[str, int]


def run_archive(sources: Sequence[str], options: ArchiveOptions, stream: TextIO | None = None,
                clock: Callable[[], float] = time.monotonic) -> RunOutcome:
    out = options.out
    stream = stream or sys.stdout
    refuse_file_in_the_way(out)
    cases = list_cases(sources)
    model_set = model_set_fingerprint(options.models)
    make_output_dir(out)
    _clean_leftovers(out)
    todo: deque[tuple[Case, dict]] = deque()
    skipped: list[str] = []
    for c in cases:
        fp = input_fingerprint(c.video)
        if is_done(out / c.case_id, fp, model_set):
            skipped.append(c.case_id)
        else:
            todo.append((c, {"case_id": c.case_id, "video": str(c.video), "input": fp, "model_set": model_set}))
    print(f"archive: {len(cases)} cases, {len(skipped)} already done with model set {model_set['name']} "
          f"{model_set['version']}, {len(todo)} to replay", file=stream, flush=True)
    replayed: list[str] = []
    failures: list[dict] = []
    attempts: dict[str, int] = {}
    to_replay = len(todo)
    if todo:
        ray, started_here = _start_ray(options)
        try:
            _drive(ray, todo, options, stream, clock, replayed, failures, attempts)
        finally:
            if started_here:
                ray.shutdown()
    atomic_write_text(out / FAILURES_FILE, json.dumps({"model_set": model_set, "failures": failures}, indent=1) + "\n")
    for f in failures:
        print(f"FAILED {f['case_id']} ({f['video']}) after {f['attempts']} attempts: {f['error']}", file=stream)
    print(f"{len(replayed)} of {to_replay} cases replayed, {len(skipped)} skipped as already done"
          + (f", {len(failures)} failed (see {out / FAILURES_FILE})" if failures else ""), file=stream, flush=True)
    return RunOutcome(len(cases), skipped, replayed, failures, attempts)


def _drive(ray, todo: deque, options: ArchiveOptions, stream: TextIO, clock, replayed: list, failures: list,
           attempts: dict) -> None:
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    workers = options.workers or (gpus if gpus else max(1, int(resources.get("CPU", 1))))
    per_actor = {"num_cpus": 1, "num_gpus": min(1.0, gpus / workers) if gpus else 0}
    remote_worker = ray.remote(max_restarts=3, **per_actor)(ReplayWorker)
    actors = [remote_worker.remote(options.models, str(options.out)) for _ in range(workers)]
    print(f"archive: {workers} workers ({'GPU' if gpus else 'CPU'}), at most {options.in_flight_per_worker} "
          "videos queued per worker", file=stream, flush=True)
    progress = ArchiveProgress(len(todo), stream, clock)
    load = [0] * workers
    in_flight: dict[Any, tuple[Case, dict, int]] = {}
    try:
        while todo or in_flight:
            while todo and min(load) < options.in_flight_per_worker:
                a = load.index(min(load))
                case, record = todo.popleft()
                attempts[case.case_id] = attempts.get(case.case_id, 0) + 1
                in_flight[actors[a].replay.remote(case, record)] = (case, record, a)
                load[a] += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=progress.every_s)
            for ref in ready:
                case, record, a = in_flight.pop(ref)
                load[a] -= 1
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died (killed, out of memory): Ray restarts it
                    result = {"ok": False, "error": f"worker lost: {type(exc).__name__}: {str(exc).splitlines()[0]}"}
                if result["ok"]:
                    replayed.append(case.case_id)
                    progress.finished(True, result["frames"])
                    print(f"ok     {case.case_id}: {result['frames']} frames in {result['wall_s']:.1f} s"
                          + ("" if result["complete"] else " (INCOMPLETE: see its summary.json)"), file=stream, flush=True)
                elif attempts[case.case_id] <= options.retries:
                    print(f"retry  {case.case_id} (attempt {attempts[case.case_id]} failed: {result['error']})",
                          file=stream, flush=True)
                    todo.append((case, record))
                else:
                    failures.append({"case_id": case.case_id, "video": str(case.video),
                                     "attempts": attempts[case.case_id], "error": result["error"]})
                    progress.finished(False)
            progress.maybe_print(len(in_flight), force=bool(ready))
    finally:
        for actor in actors:
            ray.kill(actor)
