"""The synthetic surgeries the reference models are trained, calibrated and measured on, by their
generator parameters, made on demand.

Datasets are written by the same generator as ``or-agent synth`` and cached by their parameters, so
a second run (training, qualification, the precision comparison, the benchmarks) reuses them. The
held-out split is what the reference models' figures are measured on; it is part of the product (the
default clip of ``or-agent qualify`` and ``calibrate compare``), so it lives here, not with training.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from or_agent.synth.dataset import SynthConfig, write_video
from or_agent.synth.render import GENERATOR_VERSION

TRAIN = SynthConfig(videos=12, seed=1, time_scale=25.0, mask_every=10)
HELD_OUT = SynthConfig(videos=3, seed=2, time_scale=25.0, mask_every=25)
# Neither trained nor measured on: for fitting calibrations (the phase model's temperature).
CALIBRATION = SynthConfig(videos=6, seed=3, time_scale=25.0, mask_every=25)


def _one(args):
    out, index, cfg = args
    return write_video(Path(out), index, cfg)


def ensure_dataset(root: str | Path, cfg: SynthConfig, workers: int = 2) -> Path:
    """The dataset directory for ``cfg`` under ``root``, generated if it is not complete."""
    out = Path(root) / f"synth-seed{cfg.seed}-n{cfg.videos}-x{cfg.time_scale:g}-m{cfg.mask_every}"
    stamp = out / "COMPLETE.json"
    wanted = {**asdict(cfg), "generator_version": GENERATOR_VERSION}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return out
    shutil.rmtree(out / "cache", ignore_errors=True)  # decoded arrays of an older rendering
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), cfg.first_index + k, cfg) for k in range(cfg.videos)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for meta in pool.map(_one, jobs):
            print(f"  generated {out.name}/{meta['video']}: {meta['frames']} frames", flush=True)
    stamp.write_text(json.dumps(wanted))
    return out


def video_names(dataset: Path) -> list[str]:
    return sorted(p.stem for p in dataset.glob("video*.json"))
