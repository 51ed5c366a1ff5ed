"""Decoding a synthetic dataset once into the arrays the three models train on."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from or_agent.pipelines.preprocess import ContentAreaTracker, crop_resize

ANATOMY_SIZE = (256, 448)  # height, width
PHASE_SIZE = (112, 192)
VISIBILITY_SIZE = (64, 112)
PHASE_RATE_HZ = 5.0


@dataclass
class VideoSamples:
    name: str
    anatomy_x: np.ndarray  # N,H,W,3 uint8 BGR (frames with masks)
    anatomy_y: np.ndarray  # N,H,W uint8 class ids, in model coordinates
    phase_x: np.ndarray  # T,H,W,3 uint8 at PHASE_RATE_HZ
    phase_y: np.ndarray  # T phase ids
    vis_x: np.ndarray  # T,H,W,3 uint8
    vis_y: np.ndarray  # T,2 (out_of_body, low_visibility)


def read_flags(path: Path) -> np.ndarray:
    """frame, phase, out_of_body, smoke, blur, bleeding as an int array."""
    with open(path) as fh:
        rows = list(csv.reader(fh))[1:]
    return np.array(rows, np.int64)


def decode_video(dataset: Path, name: str) -> VideoSamples:
    cache = dataset / "cache" / f"{name}.npz"
    if cache.exists():
        z = np.load(cache)
        return VideoSamples(name, *(z[k] for k in ("ax", "ay", "px", "py", "vx", "vy")))
    meta = json.loads((dataset / f"{name}.json").read_text())
    flags = read_flags(dataset / f"{name}-flags.csv")
    stride = max(1, int(round(meta["fps"] / PHASE_RATE_HZ)))
    cap = cv2.VideoCapture(str(dataset / f"{name}.mp4"))
    tracker = ContentAreaTracker()
    ax, ay, px, py, vx, vy = [], [], [], [], [], []
    f = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        area = tracker.update(frame)
        mask_path = dataset / "masks" / name / f"frame{f:06d}.png"
        if f % meta["mask_every"] == 0 and mask_path.exists():
            mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
            ax.append(crop_resize(frame, area, *ANATOMY_SIZE))
            crop = mask[area.y0:area.y1, area.x0:area.x1]
            ay.append(cv2.resize(crop, ANATOMY_SIZE[::-1], interpolation=cv2.INTER_NEAREST))
        if f % stride == 0:
            px.append(crop_resize(frame, area, *PHASE_SIZE))
            py.append(flags[f, 1])
            vx.append(crop_resize(frame, area, *VISIBILITY_SIZE))
            vy.append((flags[f, 2], flags[f, 3] | flags[f, 4]))
        f += 1
    cap.release()
    out = VideoSamples(name, np.array(ax), np.array(ay), np.array(px), np.array(py, np.int64),
                       np.array(vx), np.array(vy, np.float32))
    cache.parent.mkdir(exist_ok=True)
    np.savez(cache, ax=out.anatomy_x, ay=out.anatomy_y, px=out.phase_x, py=out.phase_y, vx=out.vis_x, vy=out.vis_y)
    return out
