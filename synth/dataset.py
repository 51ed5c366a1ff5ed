"""Writing synthetic surgeries in the real datasets' formats.

Per video ``NN`` (two digits, as Cholec80 names them):

- ``videoNN.mp4``            the video (MPEG-4 Part 2, the widest codec the OpenCV wheel writes)
- ``videoNN-phase.txt``      Cholec80 phase annotation, ``Frame<TAB>Phase`` for every frame
- ``videoNN-tool.txt``       Cholec80 tool annotation, one row per second
- ``videoNN-flags.csv``      per frame: phase id, out_of_body, smoke, blur, bleeding
- ``videoNN.json``           the field of view, timeline, events and the seed that made it
- ``masks/videoNN/frameNNNNNN.png``  CholecSeg8k class ids for every ``mask_every``-th frame

Every file is written under a temporary name and renamed when complete, so an interrupted
run leaves no half-written file that looks finished.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from or_agent.pipelines.errors import InputError
from or_agent.pipelines.files import atomic_path, atomic_write_text, make_output_dir
from or_agent.pipelines.surgery import PHASES, TOOLS
from or_agent.synth.render import GENERATOR_VERSION, SurgeryRenderer
from or_agent.synth.timeline import sample_timeline


@dataclass(frozen=True)
class SynthConfig:
    videos: int = 1
    seed: int = 0
    time_scale: float = 20.0
    width: int = 854
    height: int = 480
    fps: float = 25.0
    mask_every: int = 25
    first_index: int = 1

    def __post_init__(self):
        if self.videos < 1:
            raise InputError(f"--videos must be at least 1, got {self.videos}")
        if self.mask_every < 1:
            raise InputError(f"--mask-every must be at least 1, got {self.mask_every}")
        if not (64 <= self.width <= 7680 and 64 <= self.height <= 4320):
            raise InputError(f"frame size {self.width}x{self.height} outside 64x64..7680x4320")
        if self.time_scale <= 0 or self.fps <= 0:
            raise InputError("--time-scale and --fps must be positive")

    def video_seed(self, index: int) -> int:
        return self.seed * 100_003 + index


ProgressFn = Callable[[int, int, int, int], None]  # (video number, of videos, frame, of frames)


def phase_file_text(phases: np.ndarray) -> str:
    lines = ["Frame\tPhase"] + [f"{i}\t{PHASES[p]}" for i, p in enumerate(phases)]
    return "\n".join(lines) + "\n"


def read_phase_file(path: str | os.PathLike) -> np.ndarray:
    """Phase ids per frame from a Cholec80 ``Frame<TAB>Phase`` file, or a CSV whose first column
    is the frame number and which has a ``phase`` column (as the real clips' labels do)."""
    path = Path(path)
    try:
        rows = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read phase labels ({getattr(exc, 'strerror', None) or exc})") from None
    ids = {name: i for i, name in enumerate(PHASES)}
    if rows and rows[0].split() == ["Frame", "Phase"]:
        sep, col = None, 1
    elif rows and "phase" in [c.strip().lower() for c in rows[0].split(",")]:
        sep, col = ",", [c.strip().lower() for c in rows[0].split(",")].index("phase")
    else:
        raise InputError(f"{path}: not a phase label file (first line must be 'Frame<TAB>Phase', or a CSV header with a 'phase' column)")
    out = []
    for n, row in enumerate(rows[1:], start=2):
        parts = [c.strip() for c in row.split(sep)] if sep else row.split()
        if not parts or parts == [""]:
            continue
        if len(parts) <= col or parts[col] not in ids or not parts[0].isdigit():
            raise InputError(f"{path}:{n}: expected '<frame>' and a Cholec80 phase name, got {row!r}")
        if int(parts[0]) != len(out):
            raise InputError(f"{path}:{n}: frame {parts[0]} out of order (expected {len(out)})")
        out.append(ids[parts[col]])
    return np.array(out, np.int64)


def render_video(renderer: SurgeryRenderer, video_path: Path, mask_dir: Path, mask_every: int,
                 progress: Callable[[int], None] | None = None) -> list[tuple]:
    """Render every frame into the video and masks; return the per-frame flag rows."""
    tl = renderer.timeline
    mask_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with atomic_path(video_path) as tmp_video:
        writer = cv2.VideoWriter(str(tmp_video), cv2.VideoWriter_fourcc(*"mp4v"), tl.fps,
                                 (renderer.width, renderer.height))
        if not writer.isOpened():
            raise InputError(f"{video_path}: cannot open a video writer (mp4v) there")
        try:
            for f in range(tl.frames):
                fr = renderer.render(f)
                writer.write(fr.image)
                if f % mask_every == 0:
                    with atomic_path(mask_dir / f"frame{f:06d}.png") as tmp:
                        cv2.imwrite(str(tmp), fr.labels)
                rows.append((f, fr.phase, int(fr.out_of_body), int(fr.smoke), int(fr.blur), int(fr.bleeding), fr.tools))
                if progress is not None:
                    progress(f)
        finally:
            writer.release()
    return rows


def write_video(out: Path, index: int, cfg: SynthConfig, progress: Callable[[int, int], None] | None = None) -> dict:
    seed = cfg.video_seed(index)
    rng = np.random.default_rng(seed)
    tl = sample_timeline(rng, fps=cfg.fps, time_scale=cfg.time_scale)
    renderer = SurgeryRenderer(tl, seed=seed + 1, width=cfg.width, height=cfg.height)
    name = f"video{index:02d}"
    rows = render_video(renderer, out / f"{name}.mp4", out / "masks" / name, cfg.mask_every,
                        None if progress is None else (lambda f: progress(f, tl.frames)))
    atomic_write_text(out / f"{name}-phase.txt", phase_file_text(tl.phase_per_frame()))
    fps_int = max(1, int(round(cfg.fps)))
    tool_lines = ["Frame\t" + "\t".join(TOOLS)]
    tool_lines += [f"{r[0]}\t" + "\t".join(str(int(t)) for t in r[6]) for r in rows if r[0] % fps_int == 0]
    atomic_write_text(out / f"{name}-tool.txt", "\n".join(tool_lines) + "\n")
    flag_lines = ["frame,phase,out_of_body,smoke,blur,bleeding"] + [",".join(str(v) for v in r[:6]) for r in rows]
    atomic_write_text(out / f"{name}-flags.csv", "\n".join(flag_lines) + "\n")
    meta = {
        "video": f"{name}.mp4",
        "generator": "or-agent synth",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "fps": cfg.fps,
        "width": cfg.width,
        "height": cfg.height,
        "frames": tl.frames,
        "time_scale": cfg.time_scale,
        "mask_every": cfg.mask_every,
        "field_of_view": asdict(renderer.fov),
        "segments": [{"phase": PHASES[s.phase], "start": s.start, "end": s.end} for s in tl.segments],
        "events": [asdict(e) for e in tl.events],
    }
    atomic_write_text(out / f"{name}.json", json.dumps(meta, indent=1) + "\n")
    return meta


def write_dataset(out_dir: str | os.PathLike, cfg: SynthConfig, progress: ProgressFn | None = None) -> list[dict]:
    out = make_output_dir(out_dir)
    metas = []
    for k in range(cfg.videos):
        index = cfg.first_index + k
        cb = None if progress is None else (lambda f, n, k=k: progress(k + 1, cfg.videos, f, n))
        metas.append(write_video(out, index, cfg, cb))
    return metas


def render_only_rate(cfg: SynthConfig, frames: int = 500) -> float:
    """Frames rendered per second (no encoding), for the benchmark."""
    seed = cfg.video_seed(cfg.first_index)
    tl = sample_timeline(np.random.default_rng(seed), fps=cfg.fps, time_scale=cfg.time_scale)
    renderer = SurgeryRenderer(tl, seed=seed + 1, width=cfg.width, height=cfg.height)
    n = min(frames, tl.frames)
    t0 = time.perf_counter()
    for f in range(n):
        renderer.render(f)
    return n / (time.perf_counter() - t0)
