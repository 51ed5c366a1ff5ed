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
6. A model input's normalisation, 256x448: ``normalise`` (plane by plane) against OpenCV's
   ``blobFromImageWithParams`` (the same numbers to the bit); median wall time per call, measured first.
7. The synthetic set's anatomy model on ONNX Runtime (one thread): its final x2 upsampling done by OpenCV
   (``final_upsampling_split``) against the whole graph in ONNX Runtime; median wall time per call.
8. The anatomy class map and the overlay's parts, each against what it replaced (one OpenCV thread, as replay
   runs them; the same outputs asserted; logits as smooth as a model's): a class written by a minimum and a maximum against a masked copy
   of a filled plane; pixels per class by OpenCV's histogram against ``np.bincount``; the overlay's colours
   by a one-channel look-up per plane against one three-channel look-up; colour and drawing masks scaled to
   a 752x480 crop as one packed 32-bit plane against three nearest-neighbour resizes; the paused frame's
   band cached per size against drawn each time; median wall time per call.
9. A whole unpaced replay with the annotated video (a synthetic 854x480 surgery, the default model set):
   OpenCV on one thread (``opencv_single_threaded``, as replay runs) against its own thread pool; CPU per
   frame summed over the threads (``replay_bench.replay_fps``) and frames per second, rounds alternating,
   medians.

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


def _normalise_ms() -> tuple[float, float]:
    """(``normalise``, ``blobFromImageWithParams``) median ms, before the other measurements: blobFromImage's
    time depends on whether the allocator hands its 1.4 MB output out of fresh pages (page faults) or from
    memory that an earlier, larger buffer left behind, as this benchmark's big test frames would; measured
    first, it sees fresh pages."""
    from or_agent.pipelines.preprocess import InputSpec, normalise

    spec = InputSpec(256, 448, "RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    small = np.random.default_rng(2).integers(0, 256, (256, 448, 3), dtype=np.uint8)
    params = cv2.dnn.Image2BlobParams()
    params.scalefactor = tuple(1.0 / (255.0 * v) for v in spec.std) + (0.0,)
    params.mean = tuple(255.0 * v for v in spec.mean) + (0.0,)
    params.size, params.swapRB, params.ddepth = (448, 256), True, cv2.CV_32F
    assert np.array_equal(normalise(small, spec), cv2.dnn.blobFromImageWithParams(small, params))
    return median_ms(lambda: normalise(small, spec), 100), median_ms(lambda: cv2.dnn.blobFromImageWithParams(small, params), 100)


def _anatomy_split(frame: np.ndarray) -> None:
    import onnxruntime as ort

    from or_agent.agent.offline.replay import opencv_single_threaded
    from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
    from or_agent.pipelines.manifest import Task
    from or_agent.pipelines.model_set import load_model_set
    from or_agent.pipelines.preprocess import normalise

    manifest = next(m for m in load_model_set(None).models if m.task == Task.SEGMENTATION)
    split = OnnxRuntimeBackend(manifest)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    whole = ort.InferenceSession(str(manifest.model_path), opts, providers=["CPUExecutionProvider"])
    spec = manifest.input_spec
    x = normalise(cv2.resize(frame, (spec.width, spec.height), interpolation=cv2.INTER_AREA), spec)
    feed, name = {manifest.input.name: x}, manifest.outputs[0].name
    differs = float(np.abs(split.run(feed)[name] - whole.run([name], feed)[0]).max())
    with opencv_single_threaded():  # as replay runs it
        ours, ref = median_ms(lambda: split.run(feed), 30), median_ms(lambda: whole.run([name], feed), 30)
    print(row("final upsampling by OpenCV", ours, "ms", ref, "whole graph") + f"   (whole {ref:.2f} ms; "
          f"largest logit difference {differs:.1e})")


def _masked_copy_argmax(logits: np.ndarray) -> np.ndarray:
    """The class map as ``class_argmax`` computed it before: each class written by a masked copy of a plane
    filled with its id."""
    best = np.array(logits[0], np.float32, order="C")
    class_map = np.zeros(best.shape, np.uint8)
    fill = np.empty_like(class_map)
    for c in range(1, logits.shape[0]):
        higher = cv2.compare(logits[c], best, cv2.CMP_GT)
        cv2.max(logits[c], best, dst=best)
        fill.fill(c)
        cv2.copyTo(fill, higher, class_map)
    return class_map


def _overlay_parts(logits: np.ndarray) -> None:
    from or_agent.pipelines.overlay import OverlayRenderer
    from or_agent.pipelines.postprocess import class_argmax, class_counts

    cmap = class_argmax(logits)
    assert np.array_equal(cmap, _masked_copy_argmax(logits))
    ours, ref = median_ms(lambda: class_argmax(logits), 50), median_ms(lambda: _masked_copy_argmax(logits), 50)
    print(row("class argmax, a class by min and max", ours, "ms", ref, "masked copy") + f"   (masked copy {ref:.2f} ms)")

    assert np.array_equal(class_counts(cmap, 13), np.bincount(cmap.ravel(), minlength=13))
    ours = median_ms(lambda: class_counts(cmap, 13), 200)
    ref = median_ms(lambda: np.bincount(cmap.ravel(), minlength=13), 200)
    print(row("pixels per class, OpenCV's histogram", ours, "ms", ref, "np.bincount") + f"   (bincount {ref:.2f} ms)")

    lut = np.random.default_rng(2).integers(0, 256, (256, 3)).astype(np.uint8)
    tables = [np.ascontiguousarray(lut[:, i]) for i in range(3)]
    planes = cv2.merge([cv2.LUT(cmap, t) for t in tables])
    assert np.array_equal(planes, cv2.LUT(cv2.merge([cmap] * 3), lut.reshape(256, 1, 3)))
    ours = median_ms(lambda: cv2.merge([cv2.LUT(cmap, t) for t in tables]), 200)
    ref = median_ms(lambda: cv2.LUT(cv2.merge([cmap] * 3), lut.reshape(256, 1, 3)), 200)
    print(row("overlay colours, a look-up per plane", ours, "ms", ref, "3-channel look-up") + f"   (3-channel {ref:.2f} ms)")

    # scaled up to an 854x480 frame's 752x480 content crop: colour and how each pixel is drawn, packed
    how = (cmap % 3).astype(np.uint8)
    size = (752, 480)

    def packed():
        small = cv2.merge([*cv2.split(planes), how])
        big = cv2.resize(small.view(np.int32).reshape(small.shape[:2]), size, interpolation=cv2.INTER_NEAREST)
        big = big.view(np.uint8).reshape(size[1], size[0], 4)
        level = cv2.extractChannel(big, 3)
        return (cv2.cvtColor(big, cv2.COLOR_BGRA2BGR), cv2.threshold(level, 0, 255, cv2.THRESH_BINARY)[1],
                cv2.threshold(level, 1, 255, cv2.THRESH_BINARY)[1])

    def three():
        shown, edges = cv2.compare(how, 0, cv2.CMP_GT), cv2.compare(how, 2, cv2.CMP_EQ)
        return tuple(cv2.resize(a, size, interpolation=cv2.INTER_NEAREST) for a in (planes, shown, edges))

    assert all(np.array_equal(a, b) for a, b in zip(packed(), three()))
    ours, ref = median_ms(packed, 100), median_ms(three, 100)
    print(row("overlay scaled up, one packed resize", ours, "ms", ref, "three resizes") + f"   (three {ref:.2f} ms)")

    renderer, frame = OverlayRenderer([]), np.zeros((480, 854, 3), np.uint8)

    def stripes_each_time():
        h, w = frame.shape[:2]
        stripe = min(max(6, h // 60), max(1, h // 4))
        out = frame.copy()
        for y0, y1 in ((0, stripe), (h - stripe, h)):
            band = out[y0:y1]
            xs = np.arange(w)[None, :] + np.arange(band.shape[0])[:, None]
            band[(xs // (2 * stripe)) % 2 == 0] = (0, 210, 255)
            band[(xs // (2 * stripe)) % 2 == 1] = (0, 0, 0)
        return out

    def stripes_cached():
        out, band = frame.copy(), renderer._stripes(*frame.shape[:2])
        out[:band.shape[0]] = band
        out[frame.shape[0] - band.shape[0]:] = band
        return out

    assert np.array_equal(stripes_cached(), stripes_each_time())
    ours, ref = median_ms(stripes_cached, 200), median_ms(stripes_each_time, 200)
    print(row("paused band, 854x480, cached per size", ours, "ms", ref, "drawn each time") + f"   (each time {ref:.2f} ms)")


def _replay_threads(tmp: Path, rounds: int) -> None:
    import contextlib

    from bench.replay_bench import replay_fps, synthetic
    from or_agent.agent.offline import replay
    from or_agent.agent.session import LoadedModels

    video = synthetic(tmp, 854, 480, 10.0)
    models = LoadedModels(None, live_session=False)
    measured: dict[str, list[tuple[float, float]]] = {"one": [], "pool": []}
    single = replay.opencv_single_threaded
    try:
        for _ in range(rounds):
            for label in measured:
                # the pool: the replay's own setting replaced by one that leaves OpenCV's as it is
                replay.opencv_single_threaded = single if label == "one" else contextlib.nullcontext
                fps, by_thread = replay_fps(video, models, tmp / "replay-out", "annotated", None)
                measured[label].append((sum(by_thread.values()), fps))
    finally:
        replay.opencv_single_threaded = single
        models.close()
    (one_cpu, one_fps), (pool_cpu, pool_fps) = (np.median(measured[k], axis=0) for k in ("one", "pool"))
    print(row("OpenCV on one thread, CPU per frame", one_cpu, "ms", pool_cpu, "OpenCV's pool")
          + f"   (pool {pool_cpu:.2f} ms; {one_fps:.1f} against {pool_fps:.1f} fps)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=150, help="frames per test video (default 150)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the whole replay (default 3)")
    args = ap.parse_args(argv)
    if args.frames < 10:
        ap.error(f"--frames: at least 10, got {args.frames}")
    if args.rounds < 1:
        ap.error(f"--rounds: at least 1, got {args.rounds}")
    from or_agent.agent.offline.replay import opencv_single_threaded
    from or_agent.pipelines.postprocess import class_argmax
    from or_agent.pipelines.preprocess import crop_resize, detect_content_area
    from or_agent.pipelines.sources import UNPACED_DECODER_PARAMS
    from or_agent.pipelines.video_out import H264Writer

    norm_ours, norm_ref = _normalise_ms()
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

        print("6. normalising a 256x448 model input (median ms per call; measured first, see _normalise_ms)")
        print(row("plane by plane", norm_ours, "ms", norm_ref, "blobFromImage") + f"   (blobFromImage {norm_ref:.2f} ms)")

        print("7. the synthetic anatomy model, ONNX Runtime on one thread (median ms per call)")
        _anatomy_split(img)

        print("8. the anatomy class map and the overlay's parts (median ms per call, the same outputs asserted)")
        # logits as smooth as a model's (blurred noise, regions of one class), not the noise of section 1
        noise = np.random.default_rng(0).standard_normal((13 * 128, 224)).astype(np.float32)
        smooth = cv2.resize(cv2.GaussianBlur(noise, (0, 0), 3) * 5, (448, 13 * 256)).reshape(13, 256, 448)
        with opencv_single_threaded():  # as replay runs them
            _overlay_parts(smooth)

        print(f"9. a whole replay, synthetic 854x480 surgery, annotated video ({args.rounds} rounds, medians)")
        _replay_threads(tmp, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
