"""Recordings a browser plays: H.264 in MP4, encoded by PyAV (FFmpeg's libx264 in its wheel) on its own thread.

Frames are handed over as BGR arrays through a bounded queue, so the caller (replay's recorder, the
display's loop) overlaps with the encoder and waits only when the encoder falls a whole queue behind;
no frame is dropped. The file is written under a temporary name and renamed only when complete.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from or_agent.pipelines.errors import DependencyError, InputError, OrAgentError
from or_agent.pipelines.files import part_path
from or_agent.pipelines.sinks import QueuedSubscriber

# Fastest first: the encoder must keep up with replay on a 2-core box; a browser plays either.
H264_ENCODERS = ("libx264", "libopenh264")
DEFAULT_PRESET = "ultrafast"
DEFAULT_CRF = 23
MIN_VIDEO_HEIGHT = 16  # below this a reduced recording is unreadable
# Up to this height one encoder thread keeps well ahead of real time and spends no more CPU than x264's pool
# (less at 854x480; ``python -m bench.cpu_paths_bench``), leaving the cores to the pipeline's own threads;
# taller pictures get FFmpeg's automatic thread count.
ONE_ENCODER_THREAD_MAX_HEIGHT = 1080


def h264_encoder() -> str:
    """The H.264 encoder this PyAV has (its wheel bundles FFmpeg with libx264)."""
    try:
        import av
    except ImportError as exc:  # a runtime dependency; missing only in a broken install
        raise DependencyError("H.264 recordings need PyAV: pip install av") from exc
    for name in H264_ENCODERS:
        if name in av.codecs_available:
            return name
    raise DependencyError(f"this PyAV (FFmpeg {av.library_versions.get('libavcodec')}) has no H.264 encoder "
                          f"({' or '.join(H264_ENCODERS)})")


def video_size(width: int, height: int, max_height: int | None) -> tuple[int, int]:
    """The recording's picture size for a ``width`` x ``height`` source: scaled down (aspect kept,
    even width) when taller than ``max_height``, else the source's own size (padded to even sizes
    by the writer)."""
    if width < 1 or height < 1:
        raise ValueError(f"empty frame size {width}x{height}")
    if max_height is None or height <= max_height:
        return width, height
    if max_height < MIN_VIDEO_HEIGHT:
        raise InputError(f"video height {max_height} is below the minimum {MIN_VIDEO_HEIGHT}")
    h = max_height - max_height % 2
    w = max(2, int(round(width * h / height / 2)) * 2)
    return w, h


class H264Writer:
    """An MP4 file of H.264 video (yuv420p, ``+faststart`` so a browser starts playing before it has
    the end), written on its own thread.

    ``write(img, index)`` takes BGR frames of any size: each is scaled to the size fixed by the first
    one (``video_size`` with ``max_height``), and odd sizes are padded by repeating the last column or
    row, since 4:2:0 video has even sizes only: every source pixel is kept. ``index`` is the frame's
    number in media time: frames missing before it (a paced replay drops frames when it falls behind)
    are filled by repeating the last frame, so the file has a constant rate and the media's duration.
    ``close(commit=True)`` finishes the file and renames it onto ``path``; ``close(commit=False)``, or
    any failure, leaves nothing there.
    """

    def __init__(self, path: str | os.PathLike, fps: float, max_height: int | None = None,
                 preset: str = DEFAULT_PRESET, crf: int = DEFAULT_CRF, queue_frames: int = 8):
        if not fps > 0:
            raise InputError(f"{path}: frame rate must be positive, got {fps}")
        if max_height is not None and max_height < MIN_VIDEO_HEIGHT:
            raise InputError(f"video height {max_height} is below the minimum {MIN_VIDEO_HEIGHT}")
        self.path = Path(path)
        self.rate = Fraction(fps).limit_denominator(1001)
        self._time_base = 1 / self.rate  # computed once, not per frame
        self.max_height = max_height
        self.preset, self.crf = preset, crf
        self.encoder = h264_encoder()
        self.size: tuple[int, int] | None = None  # the picture (width, height), fixed by the first frame
        self.frames = 0  # written to the file, repeats included
        self._tmp = part_path(self.path)
        self._container: Any = None  # av's output container and stream, opened at the first frame
        self._stream: Any = None
        self._last: Any = None  # the last encoded picture, repeated for missing frames
        self._next_index = 0
        self._encoder = QueuedSubscriber(self._encode, maxsize=queue_frames, name=f"h264:{self.path.name}")
        self._started = self._closed = False

    def start(self) -> H264Writer:
        try:  # FFmpeg opens the file at the first frame, on the encoder's thread: find a bad path here
            self._tmp.open("wb").close()
        except OSError as exc:
            raise InputError(f"{self.path}: cannot write a video there: {exc.strerror or exc}") from exc
        self._encoder.start()
        self._started = True
        return self

    def __enter__(self) -> H264Writer:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(commit=exc_type is None)

    def write(self, img: np.ndarray, index: int | None = None) -> None:
        """Queue a BGR frame (``index``: its frame number in media time; by default the next one).
        Raises the encoder's failure, if it has failed."""
        if not self._started or self._closed:
            raise RuntimeError("H264Writer.write before start() or after close()")
        if self._encoder.error is not None:
            self._raise_encoder_error()
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected a BGR uint8 frame, got shape {img.shape} {img.dtype}")
        self._encoder((img, index))

    def close(self, commit: bool = True) -> None:
        """Finish the file and rename it onto ``path`` (``commit``), or remove what was written."""
        if self._closed:
            return
        self._closed = True
        ok = False
        try:
            if self._started:
                try:
                    self._encoder.stop()
                except OrAgentError:
                    raise
                except Exception:
                    self._raise_encoder_error()
            if commit and self._container is not None:
                for packet in self._stream.encode():  # flush the encoder's delayed frames
                    self._container.mux(packet)
            ok = True
        finally:
            if self._container is not None:
                try:
                    self._container.close()
                except Exception:
                    ok = False
                self._container = None
            if ok and commit and self.frames:
                os.replace(self._tmp, self.path)
            elif self._tmp.exists():
                self._tmp.unlink()

    def _raise_encoder_error(self):
        exc = self._encoder.error
        if isinstance(exc, OrAgentError):
            raise exc
        raise OrAgentError(f"{self.path}: the video encoder failed: {type(exc).__name__}: {exc}") from exc

    # --- on the encoder's thread ---

    def _open(self, width: int, height: int) -> None:
        import av

        self.size = video_size(width, height, self.max_height)
        w, h = self.size
        self._container = av.open(str(self._tmp), "w", format="mp4", options={"movflags": "+faststart"})
        stream = self._container.add_stream(self.encoder, rate=self.rate)
        stream.width, stream.height = w + w % 2, h + h % 2
        stream.pix_fmt = "yuv420p"
        # BT.601 limited range: what OpenCV's I420 conversion produces, and what players assume untagged
        stream.codec_context.color_range = 1
        if self.encoder == "libx264":
            stream.options = {"preset": self.preset, "crf": str(self.crf)}
        if h <= ONE_ENCODER_THREAD_MAX_HEIGHT:
            stream.codec_context.thread_count = 1
        self._stream = stream

    def _picture(self, img: np.ndarray):
        import av

        assert self.size is not None, "sized by _open"
        w, h = self.size
        if (img.shape[1], img.shape[0]) != (w, h):
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR)
        if w % 2 or h % 2:
            img = cv2.copyMakeBorder(img, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
        # OpenCV's conversion is several times faster than FFmpeg's swscale for this one step; its planes
        # are copied straight into the frame's (faster than ``VideoFrame.from_ndarray``: bench.cpu_paths_bench)
        yuv = cv2.cvtColor(img, cv2.COLOR_BGR2YUV_I420)
        picture = av.VideoFrame(w + w % 2, h + h % 2, "yuv420p")
        ph, pw = picture.height, picture.width
        chroma = yuv[ph:].reshape(2, ph // 2, pw // 2)  # I420: the U plane, then the V plane
        for plane, src in zip(picture.planes, (yuv[:ph], chroma[0], chroma[1])):
            rows = np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)  # rows padded to line_size
            np.copyto(rows[:src.shape[0], :src.shape[1]], src)
        return picture

    def _emit(self, picture) -> None:
        picture.pts = self._next_index
        picture.time_base = self._time_base
        for packet in self._stream.encode(picture):
            self._container.mux(packet)
        self._next_index += 1
        self.frames += 1

    def _encode(self, item: tuple[np.ndarray, int | None]) -> None:
        img, index = item
        if self._container is None:
            self._open(img.shape[1], img.shape[0])
        if index is not None and self._last is not None:
            while self._next_index < index:
                self._emit(self._last)
        picture = self._picture(img)
        self._emit(picture)
        self._last = picture
