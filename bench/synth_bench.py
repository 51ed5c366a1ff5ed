"""Synthetic surgery generator throughput at 854x480 on one core.

    python -m bench.synth_bench [--frames N]

Prints frames rendered per second beside the goal (100 fps) and beside the cost of the one
unavoidable step, encoding the same frames to MPEG-4, measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

from bench.common import pin_one_core, rate, row
from or_agent.synth.render import SurgeryRenderer
from or_agent.synth.timeline import sample_timeline

GOAL_FPS = 100.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1500)
    args = ap.parse_args(argv)
    where = pin_one_core()
    tl = sample_timeline(np.random.default_rng(42), time_scale=20)
    renderer = SurgeryRenderer(tl, seed=43)
    n = min(args.frames, tl.frames)
    # Spread the frames over the whole surgery (every phase), in runs of consecutive frames
    # as a video is rendered.
    starts = np.linspace(0, tl.frames - 50, max(1, n // 50)).astype(int)
    frames = [s + k for s in starts for k in range(50)][:n]
    render_fps = rate(lambda i: renderer.render(frames[i]), len(frames))
    images = [renderer.render(f).image for f in frames[:200]]
    with tempfile.TemporaryDirectory() as tmp:
        w = cv2.VideoWriter(str(Path(tmp) / "x.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 25, (854, 480))
        encode_fps = rate(lambda i: w.write(images[i % len(images)]), len(frames))
        w.release()
        w = cv2.VideoWriter(str(Path(tmp) / "y.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 25, (854, 480))

        def both(i):
            w.write(renderer.render(frames[i]).image)

        both_fps = rate(both, len(frames))
        w.release()
    print(f"synthetic generator, 854x480, {len(frames)} frames over {len(tl.segments)} phases, {where}")
    print(row("render (frame + labels)", render_fps, "fps", GOAL_FPS, "goal 100 fps"))
    print(row("render + MPEG-4 encode (what `synth` does)", both_fps, "fps", GOAL_FPS, "goal 100 fps"))
    print(row("MPEG-4 encode alone (reference)", encode_fps, "fps"))
    print(row("render time per frame / encode time per frame", encode_fps / render_fps, "x"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
