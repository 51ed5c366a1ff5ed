"""Frozen EfficientNet-Lite0 features of every real frame, several views each, cached.

    python -m or_agent.models.training.real_phase.features --views 6      # ~7 min on one core (1391 frames x 6 views)

View 0 is the agent's crop as is, view 1 its mirror image, views 2.. random augmentations
(``encoder.augment``, seed = view number). Writes ``.cache/real-phase/feats-<size>.npz`` with,
per source and tap, an array [views, N, D].
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from or_agent.models.training.real_phase.data import CACHE, load_all
from or_agent.models.training.real_phase.encoder import augment, extract, load_lite0, torch_setup

SOURCES = ("val", "clips", "video01", "endoscapes")


def views_of(images: np.ndarray, view: int) -> np.ndarray:
    if view == 0:
        return images
    if view == 1:
        return np.ascontiguousarray(images[:, :, ::-1])
    rng = np.random.default_rng(1000 + view)
    return np.stack([augment(rng, im) for im in images])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    ap.add_argument("--views", type=int, default=6)
    args = ap.parse_args(argv)
    torch_setup()
    H, W = args.size
    t0 = time.time()
    sets = load_all(H, W, SOURCES)
    print(f"frames ready ({time.time() - t0:.0f} s): " + ", ".join(f"{k} {len(v.images)}" for k, v in sets.items()), flush=True)
    net = load_lite0(H, W)
    out = {}
    for name, fs in sets.items():
        per_tap: dict[str, list] = {}
        for view in range(args.views):
            for k, v in extract(net, views_of(fs.images, view), H, W).items():
                per_tap.setdefault(k, []).append(v)
            print(f"  {name} view {view} ({time.time() - t0:.0f} s)", flush=True)
        for k, v in per_tap.items():
            out[f"{name}/{k}"] = np.stack(v)
    np.savez(CACHE / f"feats-{H}x{W}.npz", **out)
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
