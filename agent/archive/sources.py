"""The cases of an archive: which videos, under which case id, with which labels.

A SOURCE is a video file, a folder (searched recursively, so a folder of per-case subfolders works), or
a CSV manifest ``path,case_id[,labels]`` (paths relative to the manifest). Outputs go to
``OUT/<case id>/``, so case ids must be unique: a manifest names them; otherwise a video's id is its
path relative to the folder given, without the suffix, ``/`` written as ``__`` (``caseA/video01.mp4``
is ``caseA__video01``), and videos named directly whose names collide are told apart by their parent
folders. Labels and masks are found next to each video as ``or-agent replay`` finds them.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from or_agent.agent.offline.replay import ReplayInputs, expand_inputs
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.sources import VIDEO_SUFFIXES, is_video_name

_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MANIFEST_COLUMNS = ("path", "case_id", "labels")


@dataclass(frozen=True)
class Case:
    """One recorded surgery to replay."""

    case_id: str
    video: Path
    labels: Path | None = None
    masks: Path | None = None

    def __post_init__(self):
        if not _CASE_ID.fullmatch(self.case_id):
            raise InputError(f"case id {self.case_id!r}: use letters, digits, '.', '_' and '-' "
                             "(at most 128, not starting with '.', '_' or '-')")

    def replay_inputs(self) -> ReplayInputs:
        return ReplayInputs(self.video, self.labels, self.masks)


def _safe_id(text: str) -> str:
    """A derived case id: characters a folder name may not safely hold become '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip("._-")
    return cleaned[:128] or "case"


def _found_next_to(video: Path, labels: Path | None) -> ReplayInputs:
    # replay's own rules for labels (<name>-phase.txt / .csv) and masks (masks/<name>/) next to a video
    return expand_inputs([str(video)], str(labels) if labels else None, None)[0]


def _read_manifest(path: Path) -> list[Case]:
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the manifest ({getattr(exc, 'strerror', None) or exc})") from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if header not in (list(MANIFEST_COLUMNS[:2]), list(MANIFEST_COLUMNS)):
        raise InputError(f"{path}: a manifest's first line must be 'path,case_id' or 'path,case_id,labels'")
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) > len(header) or len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise InputError(f"{path}:{n}: expected {','.join(header)}, got {','.join(row)!r}")
        video = path.parent / row[0].strip()
        case_id = row[1].strip()
        if case_id in seen:
            raise InputError(f"{path}:{n}: case id {case_id!r} repeats line {seen[case_id]}")
        seen[case_id] = n
        labels = path.parent / row[2].strip() if len(row) > 2 and row[2].strip() else None
        if labels is not None and not labels.is_file():
            raise InputError(f"{path}:{n}: {labels}: no such label file")
        found = _found_next_to(video, labels)
        try:
            cases.append(Case(case_id, video, found.labels, found.masks))
        except InputError as exc:
            raise InputError(f"{path}:{n}: {exc}") from None
    if not cases:
        raise InputError(f"{path}: the manifest lists no videos")
    return cases


def _folder_videos(folder: Path) -> list[Path]:
    found = sorted(p for p in folder.rglob("*")
                   if is_video_name(p) and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not found:
        raise InputError(f"{folder}: no video files in it or its subfolders ({', '.join(VIDEO_SUFFIXES)})")
    return found


def _disambiguated(videos: list[Path]) -> list[str]:
    """Ids for videos named directly: the file's stem, lengthened by parent folders where two collide."""
    depth = [0] * len(videos)

    def name(i: int) -> str:
        v = videos[i].resolve()
        parents = [p.name for p in v.parents][:depth[i]][::-1]
        return _safe_id("__".join([*parents, v.stem]))

    while True:
        ids = [name(i) for i in range(len(videos))]
        clashing = [i for i, x in enumerate(ids) if ids.count(x) > 1]
        if not clashing:
            return ids
        grown = False
        for i in clashing:
            if depth[i] < len(videos[i].resolve().parents):
                depth[i] += 1
                grown = True
        if not grown:
            return ids  # left to the uniqueness check, which names both


def list_cases(sources: Sequence[str]) -> list[Case]:
    """Every case the sources name, in order; one line naming the problem if any source is unusable or
    two cases would share an id (and so an output folder)."""
    if not sources:
        raise InputError("no sources given: name video files, folders or CSV manifests")
    cases: list[Case] = []
    direct: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            for v in _folder_videos(source):
                rel = v.relative_to(source).with_suffix("")
                found = _found_next_to(v, None)
                cases.append(Case(_safe_id("__".join(rel.parts)), v, found.labels, found.masks))
        elif source.is_file() and source.suffix.lower() == ".csv":
            cases += _read_manifest(source)
        elif source.is_file():
            direct.append(source)
        else:
            raise InputError(f"{source}: no such video file, folder or manifest")
    for v, case_id in zip(direct, _disambiguated(direct)):
        found = _found_next_to(v, None)
        cases.append(Case(case_id, v, found.labels, found.masks))
    unique: dict[str, Case] = {}
    for c in cases:
        other = unique.get(c.case_id)
        if other is not None and other.video.resolve() == c.video.resolve():
            continue  # the same video reached twice (a file and its folder): replayed once
        if other is not None:
            raise InputError(f"case id {c.case_id!r} names two videos ({other.video} and {c.video}): "
                             "give them distinct ids in a manifest")
        unique[c.case_id] = c
    return list(unique.values())
