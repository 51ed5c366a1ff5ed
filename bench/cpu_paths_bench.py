"""The CPU paths replay spends its frames on, each beside what it replaced, as a ratio.

    python -m bench.cpu_paths_bench [--frames N]

1. The anatomy class map: ``class_argmax`` (a running maximum in OpenCV) against numpy's ``argmax(0)``,
   13 classes at 256x448 (the synthetic set's anatomy output); median wall time per call.
2. A model input a larger one divides by whole factors: the 64x112 visibility input made from the
   256x448 anatomy input (as ``HostFramePath`` does) against its own INTER_AREA resize of the content
   crop, from 854x480 and 1920x1080 frames; median wall time per call.
3. Decoding an H.264 file unpaced: one decoder thread (``UNPACED_DECODER_PARAMS``, as replay opens a file)
   against FFmpeg's own thread pool; process CPU time per frame, and wall time.
4. Encoding the recording: x264 (the recordings' preset and CRF) on one thread against its own pool, at
   854x480 and 1280x720; process CPU time per frame.
5. The picture handed to the encoder: the colour planes copied into an ``av.VideoFrame``
   (``H264Writer._picture``) against ``VideoFrame.from_ndarray``; median wall time per call.

Every figure is measured in this run; the test videos are made here (PyAV, smooth moving noise).
Nothing else should run on the machine meanwhile: CPU time counts every thread of this process.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from bench.common import median_ms, row


def _frames(width: int, height: int, n: int) -> list[np.ndarray]:
    """Smooth noise drifting across a dark endoscope circle: a picture codecs treat like footage."""
    rng = np.random.default_rng(0)
    field = cv2.GaussianBlur(rng.integers(0, 256, (height, width * 2, 3), dtype=np.uint8), (0, 0), 4)
    out = []
    for i in range(n):
        f = np.ascontiguousarray(field[:, i * 4 % width: i * 4 % width + width])
        cv2.circle(f, (width // 2, height // 2), int(height * 0.75), (0, 0, 0), int(height * 0.4))
        out.append(f)
    return out


def _encode_cpu_ms(frames: list[np.ndarray], path: Path, threads: int | None) -> float:
    """Process CPU ms per frame for x264 with the recordings' settings; ``threads`` None: FFmpeg's pool."""
    import av

    from or_agent.pipelines.video_out import DEFAULT_CRF, DEFAULT_PRESET

    h, w = frames[0].shape[:2]
    yuv = [cv2.cvtColor(f, cv2.COLOR_BGR2YUV_I420) for f in frames]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": DEFAULT_PRESET, "crf": str(DEFAULT_CRF)}
        if threads is not None:
            s.codec_context.thread_count = threads
        c0 = time.process_time()
        for i, y in enumerate(yuv):
            picture = av.VideoFrame.from_ndarray(y, format="yuv420p")
            picture.pts, picture.time_base = i, Fraction(1, 25)
            for packet in s.encode(picture):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
        return 1000 * (time.process_time() - c0) / len(frames)


def _decode(path: Path, params: list[int]) -> tuple[float, float]:
    """(process CPU ms, wall ms) per frame decoding the whole file."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, params)
    n, c0, t0 = 0, time.process_time(), time.perf_counter()
    while cap.read()[0]:
        n += 1
    cap.release()
    return 1000 * (time.process_time() - c0) / n, 1000 * (time.perf_counter() - t0) / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=150, help="frames per test video (default 150)")
    args = ap.parse_args(argv)
    if args.frames < 10:
        ap.error(f"--frames: at least 10, got {args.frames}")
    from or_agent.pipelines.postprocess import class_argmax
    from or_agent.pipelines.preprocess import crop_resize, detect_content_area
    from or_agent.pipelines.sources import UNPACED_DECODER_PARAMS
    from or_agent.pipelines.video_out import H264Writer

    tmp = Path(tempfile.mkdtemp(prefix="or-agent-cpu-paths-"))
    try:
        print("1. anatomy class map, 13 classes at 256x448 (median ms per call)")
        logits = (np.random.default_rng(1).standard_normal((13, 256, 448)) * 3).astype(np.float32)
        ours, ref = median_ms(lambda: class_argmax(logits), 50), median_ms(lambda: logits.argmax(0).astype(np.uint8), 50)
        print(row("class_argmax (OpenCV running maximum)", ours, "ms", ref, "numpy argmax(0)") + f"   (numpy {ref:.2f} ms)")

        print("2. the 64x112 visibility input (median ms per call)")
        for width, height in ((854, 480), (1920, 1080)):
            frame = _frames(width, height, 1)[0]
            area = detect_content_area(frame)
            anatomy = crop_resize(frame, area, 256, 448)  # made anyway for the anatomy model
            derived = median_ms(lambda a=anatomy: cv2.resize(a, (112, 64), interpolation=cv2.INTER_AREA), 30)
            direct = median_ms(lambda f=frame, c=area: crop_resize(f, c, 64, 112), 30)
            print(row(f"from the 256x448 input, {width}x{height} frame", derived, "ms", direct, "resized from the crop")
                  + f"   (from the crop {direct:.2f} ms)")

        print("3. decoding H.264 unpaced (per frame)")
        for width, height in ((854, 480), (1920, 1080)):
            video = tmp / f"v{height}.mp4"
            with H264Writer(video, 25.0) as w:
                for f in _frames(width, height, args.frames):
                    w.write(f)
            one_cpu, one_wall = _decode(video, UNPACED_DECODER_PARAMS)
            pool_cpu, pool_wall = _decode(video, [])
            print(row(f"one decoder thread, {width}x{height}, CPU", one_cpu, "ms", pool_cpu, "FFmpeg's pool")
                  + f"   (pool {pool_cpu:.2f} ms; wall {one_wall:.2f} against {pool_wall:.2f} ms)")

        print("4. encoding the recording, x264 (process CPU per frame)")
        for width, height in ((854, 480), (1280, 720)):
            frames = _frames(width, height, args.frames)
            one = _encode_cpu_ms(frames, tmp / "e1.mp4", 1)
            pool = _encode_cpu_ms(frames, tmp / "e0.mp4", None)
            print(row(f"one encoder thread, {width}x{height}", one, "ms", pool, "x264's pool") + f"   (pool {pool:.2f} ms)")

        print("5. the picture handed to the encoder, 854x480 (median ms per call)")
        import av

        writer = H264Writer(tmp / "p.mp4", 25.0)
        writer.size = (854, 480)
        img = _frames(854, 480, 1)[0]
        ours = median_ms(lambda: writer._picture(img), 100)
        ref = median_ms(lambda: av.VideoFrame.from_ndarray(cv2.cvtColor(img, cv2.COLOR_BGR2YUV_I420), format="yuv420p"), 100)
        print(row("planes copied into the frame", ours, "ms", ref, "from_ndarray") + f"   (from_ndarray {ref:.2f} ms)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
