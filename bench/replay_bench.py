"""Replay speed against real time and against decoding alone, with the annotated video off and on.

    python -m bench.replay_bench [--seconds S] [--video-height N] [--repeat N] [VIDEO...]

For a synthetic 1920x1080 and a synthetic 854x480 surgery (made by the synth generator, ``--seconds``
long), the real clips in ``../shared/data/real/`` when present, and any VIDEO given, prints:
  decode only (OpenCV, the same decoder the replay uses);
  replay, unpaced, ``--video none``;
  replay, unpaced, the annotated H.264 video at ``--video-height`` (default 720) and at the source's size;
each as fps, as a ratio to real time (the goal: >= 1.5 x at 1080p, >= 4 x at 854x480 with the video
on) and as a ratio to decode only, with the CPU each thread spent per frame (``bench.common.ThreadCpu``:
the stage threads by name, the decoder's, encoder's and libraries' own pools as ``native pools``). A
replay's rate is its frames over its wall time, writing every output included, the models loaded once
beforehand. With ``--repeat N`` every measurement runs N times,
round after round, and the median is printed with the spread (machines shared with other jobs vary).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from bench.common import ThreadCpu, models_option, row, select_models

REAL_CLIPS = ("cholec80-video01-clip/video01_0000-0249.mp4",
              "cholect50-clips/sim0.975_group_22_VID05_1858_and_VID08_1331_a.mp4")
GOALS = {1080: 1.5, 480: 4.0}  # the real-time goals with the annotated video on, by source height


def decode_fps(path: Path) -> tuple[float, int, float, tuple[int, int]]:
    """(frames per second decoded, frames, the file's fps, (width, height))."""
    from or_agent.pipelines.sources import UNPACED_DECODER_PARAMS

    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, UNPACED_DECODER_PARAMS)  # as replay opens a file
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    size = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    n, t0 = 0, time.perf_counter()
    while cap.read()[0]:
        n += 1
    elapsed = time.perf_counter() - t0
    cap.release()
    return n / elapsed, n, fps, size


def replay_fps(path: Path, models, out: Path, video_out: str, video_height: int | None) -> tuple[float, dict[str, float]]:
    """(frames per second, CPU milliseconds per frame by thread name) of one unpaced replay."""
    from or_agent.agent.offline.replay import ReplayInputs, replay_one

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    with ThreadCpu() as cpu, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        s = replay_one(ReplayInputs(path, None, None), out, models, False, None, path.name,
                       video_out=video_out, video_height=video_height).summary  # (the progress bar is silenced)
    elapsed = time.perf_counter() - t0
    return s["frames"] / elapsed, {name: 1000 * sec / s["frames"] for name, sec in cpu.seconds.items()}


def thread_line(per_round: list[dict[str, float]]) -> str:
    """The median CPU ms per frame of each thread over the rounds, largest first, and their sum."""
    names = sorted({n for r in per_round for n in r})
    med = {n: float(np.median([r.get(n, 0.0) for r in per_round])) for n in names}
    parts = [f"{n} {v:.1f}" for n, v in sorted(med.items(), key=lambda kv: -kv[1]) if v >= 0.05]
    return f"    CPU ms per frame by thread: {', '.join(parts)}; all {sum(med.values()):.1f}"


def spread(values: list[float]) -> str:
    """How far repeated measurements lay apart (nothing for one)."""
    return f"   (median of {len(values)}: {min(values):.1f}-{max(values):.1f} fps)" if len(values) > 1 else ""


def synthetic(tmp: Path, width: int, height: int, seconds: float) -> Path:
    from or_agent.synth.dataset import SynthConfig, write_dataset

    # a ~35 min surgery compressed to about ``seconds``
    folder = tmp / f"synth{width}x{height}"
    write_dataset(folder, SynthConfig(videos=1, seed=3, time_scale=2100.0 / seconds, width=width, height=height,
                                      mask_every=10_000))
    return folder / "video01.mp4"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("videos", nargs="*", metavar="VIDEO", help="more videos to measure")
    ap.add_argument("--seconds", type=float, default=12.0, help="length of each synthetic video (default 12)")
    ap.add_argument("--video-height", type=int, default=720, help="reduced recording height measured (default 720)")
    ap.add_argument("--no-synthetic", action="store_true", help="measure only the real clips and VIDEOs")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of every measurement; the median is printed with the spread (default 1)")
    models_option(ap)
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat: at least 1 round, got {args.repeat}")
    print(select_models(args))
    from or_agent.agent.session import LoadedModels
    from or_agent.pipelines.video_out import h264_encoder

    tmp = Path(tempfile.mkdtemp(prefix="or-agent-replay-bench-"))
    try:
        videos = [Path(v) for v in args.videos]
        real = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
        videos += [real / c for c in REAL_CLIPS if (real / c).is_file()]
        if not args.no_synthetic:
            print(f"making synthetic {args.seconds:g} s surgeries at 1920x1080 and 854x480 ...", flush=True)
            videos = [synthetic(tmp, 1920, 1080, args.seconds), synthetic(tmp, 854, 480, args.seconds)] + videos
        models = LoadedModels(None, live_session=False)
        print(f"replay benchmark: {os.cpu_count()} cores, H.264 encoder {h264_encoder()}, unpaced, "
              "rates over wall time with every output written")
        try:
            for v in videos:
                # Round after round, each measurement once per round: the machine's slow spells fall on all
                # of them alike, and the median of each is printed beside its spread.
                rates: dict[str, list[float]] = {"decode only": []}
                threads: dict[str, list[dict[str, float]]] = {}
                for _ in range(args.repeat):
                    decode, n, fps, (w, h) = decode_fps(v)
                    rates["decode only"].append(decode)
                    runs = [("replay, --video none", "none", None),
                            (f"replay, annotated video at <= {args.video_height} px", "annotated", args.video_height)]
                    if h > args.video_height:
                        runs.append(("replay, annotated video at source size", "annotated", None))
                    for label, video_out, height in runs:
                        rate, cpu = replay_fps(v, models, tmp / "out", video_out, height)
                        rates.setdefault(label, []).append(rate)
                        threads.setdefault(label, []).append(cpu)
                decode = float(np.median(rates["decode only"]))
                print(f"{v.name}: {w}x{h}, {n} frames at {fps:g} fps ({n / fps:.1f} s)")
                print(row("decode only", decode, "fps", fps, "real time") + spread(rates["decode only"]))
                for label, _, _ in runs:
                    r = float(np.median(rates[label]))
                    print(row(label, r, "fps", fps, "real time") + f"   {r / decode:5.2f} x decode only"
                          + spread(rates[label]))
                    print(thread_line(threads[label]))
                goal = GOALS.get(h)
                if goal:
                    print(f"  goal with the annotated video on: >= {goal:g} x real time")
        finally:
            models.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
