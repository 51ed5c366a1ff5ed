"""Every real frame there is, read once and prepared exactly as the agent prepares its inputs.

Sources (read-only, ``../shared/data/real`` relative to the repository, or ``$OR_AGENT_REAL_DATA``;
CC BY-NC-SA 4.0, never copied into the repository):

- ``val``        cholect50-val VID68/70/73/75 key frames with expert phase labels and their second
- ``clips``      the 4 cholect50 clips (32 s each, other Cholec80 videos), sampled at ``CLIP_FPS``,
                 labelled from the real per-second Cholec80 labels of their source video
- ``video01``    the Cholec80 video01 clip (every 25th frame, Preparation) and its 20 frames
- ``endoscapes`` 418 Endoscapes-Seg50 frames of 40 other videos (no phase label; all taken during
                 hepatocystic-triangle (Calot) dissection, before the first clip)
- ``smoke``      smoky/clear 256x256 frames

Each frame is prepared as ``pipelines.preprocess`` prepares the agent's inputs: the content area
(``detect_content_area`` or the whole frame), ``crop_resize`` to the model size (INTER_AREA,
aspect not kept). Normalisation happens later, with ``normalise``.
"""

from __future__ import annotations

import csv
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from or_agent.pipelines.preprocess import ContentArea, crop_resize, detect_content_area

PHASES = ["Preparation", "CalotTriangleDissection", "ClippingCutting", "GallbladderDissection",
          "GallbladderPackaging", "CleaningCoagulation", "GallbladderRetraction"]
PHASE_ID = {p: i for i, p in enumerate(PHASES)}
VAL_VIDEOS = ["VID68", "VID70", "VID73", "VID75"]
CLIP_FPS = 2.0
REPO = Path(__file__).resolve().parents[3]
CACHE = REPO / ".cache" / "real-phase"


def real_root() -> Path:
    return Path(os.environ.get("OR_AGENT_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


def prepare(frame_bgr: np.ndarray, height: int, width: int) -> np.ndarray:
    """The agent's crop: content area (or the whole frame when too dark), resized; uint8 BGR."""
    h, w = frame_bgr.shape[:2]
    area = detect_content_area(frame_bgr) or ContentArea.whole_frame(w, h)
    return crop_resize(frame_bgr, area, height, width)


@dataclass
class FrameSet:
    """Frames of one source, prepared at one size, with their labels."""

    name: str
    images: np.ndarray  # N,H,W,3 uint8 BGR (the agent's crop)
    phase: np.ndarray  # N int, -1 = unknown
    group: np.ndarray  # N str: video the frame comes from
    second: np.ndarray  # N float: time in its video
    extra: dict = field(default_factory=dict)


def cholec80_phase_per_second() -> dict[str, np.ndarray]:
    """Real Cholec80 phase id per second (1 fps) for all 80 videos: {'video01': array, ...}."""
    out: dict[str, dict[int, int]] = {}
    for split in ("train", "val", "test"):
        with gzip.open(real_root() / "cholec80-phase-labels" / f"phase_data_{split}.csv.gz", "rt") as fh:
            for row in csv.DictReader(fh):
                video, frame = row["Files"].rsplit("_", 1)
                out.setdefault(video, {})[int(frame) // 25] = PHASE_ID[row["Phase"]]
    series = {}
    for video, d in out.items():
        secs = sorted(d)
        series[video] = np.array([d[s] for s in secs], np.int64)
    return dict(sorted(series.items()))


def load_val(height: int, width: int) -> FrameSet:
    imgs, ph, grp, sec, names = [], [], [], [], []
    for v in VAL_VIDEOS:
        d = real_root() / "cholect50-val" / v
        with open(d / "phase.csv") as fh:
            for row in csv.DictReader(fh):
                imgs.append(prepare(cv2.imread(str(d / row["image"])), height, width))
                ph.append(PHASE_ID[row["phase"]])
                grp.append(v)
                sec.append(float(row["second"]))
                names.append(f"{v}/{row['image']}")
    return FrameSet("val", np.stack(imgs), np.array(ph), np.array(grp), np.array(sec), {"file": np.array(names)})


def _read_video(path: Path, every: int):
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    i = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if i % every == 0:
            yield i, i / fps, frame
        i += 1
    cap.release()


def load_clips(height: int, width: int, fps: float = CLIP_FPS) -> FrameSet:
    """The 4 real 32 s clips; label = real Cholec80 per-second label of the source video (the clip
    spans centre-16 s .. centre+16 s; all four are one phase throughout, checked against the labels)."""
    per_sec = cholec80_phase_per_second()
    root = real_root() / "cholect50-clips"
    imgs, ph, grp, sec = [], [], [], []
    with open(root / "clips.csv") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        video, centre = row["cholec80_video"], int(row["center_second(from name)"])
        for _, t, frame in _read_video(root / row["clip"], int(round(25 / fps))):
            s = int(centre - 16 + t)
            imgs.append(prepare(frame, height, width))
            ph.append(int(per_sec[video][min(s, len(per_sec[video]) - 1)]))
            grp.append(video)
            sec.append(float(centre - 16 + t))
    return FrameSet("clips", np.stack(imgs), np.array(ph), np.array(grp), np.array(sec))


def load_video01(height: int, width: int) -> FrameSet:
    root = real_root()
    imgs, ph, sec = [], [], []
    for _, t, frame in _read_video(root / "cholec80-video01-clip" / "video01_0000-0249.mp4", 25):
        imgs.append(prepare(frame, height, width))
        ph.append(PHASE_ID["Preparation"])
        sec.append(t)
    d = root / "cholec80-video01-frames"
    with open(d / "phases.csv") as fh:
        for row in csv.DictReader(fh):
            imgs.append(prepare(cv2.imread(str(d / Path(row["file"]).name)), height, width))
            ph.append(PHASE_ID[row["phase"]])
            sec.append(int(row["cholec80_frame(assumed stride 30; verified for idx 0-8)"]) / 25.0)
    return FrameSet("video01", np.stack(imgs), np.array(ph), np.array(["video01"] * len(ph)), np.array(sec))


def load_endoscapes(height: int, width: int) -> FrameSet:
    """418 frames, 40 videos; phase unknown (-1) but all during Calot triangle dissection."""
    imgs, grp, sec, split = [], [], [], []
    for part in ("train", "val"):
        d = real_root() / "endoscapes-seg50" / part
        with open(d / "index.csv") as fh:
            for row in csv.DictReader(fh):
                imgs.append(prepare(cv2.imread(str(d / "images" / f"{row['image']}.jpg")), height, width))
                grp.append(f"endo{row['video']}")
                sec.append(int(row["frame"]) / 25.0)
                split.append(part)
    n = len(imgs)
    return FrameSet("endoscapes", np.stack(imgs), -np.ones(n, np.int64), np.array(grp), np.array(sec),
                    {"split": np.array(split)})


def load_smoke(height: int, width: int) -> FrameSet:
    imgs, smoky, names = [], [], []
    for label, sub in ((1, "smoky"), (0, "clear")):
        for p in sorted((real_root() / "smoke" / sub).glob("*.jpg"), key=lambda p: int(p.stem)):
            imgs.append(prepare(cv2.imread(str(p)), height, width))
            smoky.append(label)
            names.append(f"{sub}/{p.name}")
    n = len(imgs)
    return FrameSet("smoke", np.stack(imgs), -np.ones(n, np.int64), np.array(["smoke"] * n), np.zeros(n),
                    {"smoky": np.array(smoky), "file": np.array(names)})


LOADERS = {"val": load_val, "clips": load_clips, "video01": load_video01,
           "endoscapes": load_endoscapes, "smoke": load_smoke}


def load_all(height: int, width: int, names=tuple(LOADERS)) -> dict[str, FrameSet]:
    """All sources at one size, cached as uint8 arrays under .cache/real-phase/."""
    out = {}
    for name in names:
        path = CACHE / f"frames-{name}-{height}x{width}.npz"
        if path.exists():
            z = np.load(path, allow_pickle=False)
            extra = {k[2:]: z[k] for k in z.files if k.startswith("x_")}
            out[name] = FrameSet(name, z["images"], z["phase"], z["group"], z["second"], extra)
            continue
        fs = LOADERS[name](height, width)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, images=fs.images, phase=fs.phase, group=fs.group, second=fs.second,
                 **{f"x_{k}": v for k, v in fs.extra.items()})
        out[name] = fs
    return out
