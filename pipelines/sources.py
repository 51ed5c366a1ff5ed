"""Frame sources: recorded files, capture cards, network streams and image folders behind one
interface.

Every source is started and stopped explicitly (or used as a context manager), hands out
``Frame`` messages with ``read()`` and reports what happened to the feed (opened, lost,
frozen, failed, ended) as ``SourceEvent`` messages through ``drain_events()``, which never
blocks. Frames always come out as HxWx3 uint8 BGR, whatever the device delivers.

Live sources (capture devices, streams, and files played at their native rate) read in a
grabber thread that keeps only the newest frame: OpenCV's FFmpeg backend ignores
``CAP_PROP_BUFFERSIZE``, so a consumer slower than the feed would otherwise fall ever further
behind real time. Frames the consumer did not take in time are counted as dropped and show
as a jump in ``Frame.seq``. A live feed that stops delivering is reopened with exponential
backoff; a feed that keeps repeating the same picture (a hung tower or capture card) is
reported as frozen. A stream whose read hangs past its read timeout is reported lost at once,
by a watchdog, even while the read itself is still blocked (FFmpeg does not always give up).

Mistakes in what the user asked for (a missing file, a camera that does not exist, a URL
that never answers) raise ``InputError`` from ``start()`` with a one-line message that names
the input; trouble after the start only ever shows as events, never as an exception in the
consumer's loop.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from or_agent.pipelines.errors import InputError
from or_agent.pipelines.messages import Frame, SourceEvent

EVENT_QUEUE_LEN = 256  # events kept for a consumer that drains rarely; the oldest go first
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https", "rtmp")

# Containers' frame counts come from headers and can be off by a frame or two (edit lists,
# a last frame without a duration), so a file is only called truncated beyond this slack.
_FRAME_COUNT_SLACK = 2
# Frozen-feed signature: a 32x18 thumbnail; frames whose thumbnails differ by at most one
# grey level count as the same picture (a repeating frame buffer, or its re-encoding).
_SIGNATURE_SIZE = (32, 18)
_SAME_LEVEL = 1


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` the sources use; tests inject fakes of it."""

    def isOpened(self) -> bool: ...
    def read(self) -> tuple[bool, np.ndarray | None]: ...
    def get(self, prop_id: int) -> float: ...
    def set(self, prop_id: int, value: float) -> bool: ...
    def release(self) -> None: ...


CaptureFactory = Callable[[], Capture]  # opens (or fails to open) a fresh capture on each call


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts to reopen a lost live feed: ``initial_s`` doubling up to ``max_s``."""

    initial_s: float = 0.5
    max_s: float = 8.0

    def __post_init__(self):
        if not (self.initial_s > 0 and math.isfinite(self.initial_s)):
            raise ValueError(f"backoff initial delay must be positive, got {self.initial_s}")
        if not (self.max_s >= self.initial_s and math.isfinite(self.max_s)):
            raise ValueError(f"backoff maximum {self.max_s} must be at least the initial delay {self.initial_s}")

    def delays(self) -> Iterator[float]:
        delay = self.initial_s
        while True:
            yield delay
            delay = min(delay * 2, self.max_s)


def _read_bgr(cap) -> np.ndarray | None:
    """The capture's next frame as HxWx3 uint8 BGR, or None when it gives none (end, error, empty)."""
    try:
        ok, image = cap.read()
    except cv2.error:
        return None
    if not ok or image is None or image.size == 0:
        return None
    return _to_bgr(image)


def _to_bgr(image: np.ndarray) -> np.ndarray:
    """Any frame a capture or imread hands back, as HxWx3 uint8 BGR."""
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:  # 16-bit sensors and PNGs: keep the top byte
            image = (image >> 8).astype(np.uint8)
        else:
            image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.shape[2] == 3:
        return image
    raise ValueError(f"unsupported frame layout {image.shape}")


def _signature(image: np.ndarray) -> np.ndarray:
    # Stride down to about 256x144 before the area resize: a frozen feed repeats the picture
    # exactly, so sampling loses nothing that matters and keeps a 4K frame well under 1 ms.
    h, w = image.shape[:2]
    sampled = np.ascontiguousarray(image[:: max(1, h // 144), :: max(1, w // 256)])
    return cv2.resize(sampled, _SIGNATURE_SIZE, interpolation=cv2.INTER_AREA).astype(np.int16)


def _plausible_fps(fps: float) -> float | None:
    # Backends report 0 or NaN when they do not know, and RTSP often reports its 90 kHz clock.
    return float(fps) if math.isfinite(fps) and 0 < fps <= 1000 else None


class _FreezeDetector:
    """Says "frozen" once when consecutive frames stay the same picture for longer than
    ``freeze_after_s``, and "unfrozen" (with how long) when the picture changes again."""

    def __init__(self, name: str, freeze_after_s: float, emit: Callable[..., None]):
        self._name = name
        self._after_ns = int(freeze_after_s * 1e9)
        self._emit = emit
        self._last: np.ndarray | None = None
        self._run_start_ns = 0  # capture time of the first frame showing the current picture
        self._frozen = False

    def update(self, image: np.ndarray, capture_ns: int) -> None:
        sig = _signature(image)
        same = (self._last is not None and sig.shape == self._last.shape
                and int(np.abs(sig - self._last).max()) <= _SAME_LEVEL)
        self._last = sig
        if not same:
            if self._frozen:
                gap = (capture_ns - self._run_start_ns) / 1e9
                self._emit("unfrozen", f"{self._name}: picture moving again after {gap:.1f} s frozen", gap_s=gap)
                self._frozen = False
            self._run_start_ns = capture_ns
        elif not self._frozen and capture_ns - self._run_start_ns > self._after_ns:
            self._frozen = True
            self._emit("frozen", f"{self._name}: picture frozen (identical frames for over "
                                 f"{self._after_ns / 1e9:.1f} s)")


class _LiveGrabber:
    """Reads a capture in a daemon thread and keeps only the newest frame.

    Shared by the capture device, the network stream and the paced file. With ``reopen`` a
    failed read means the feed was lost: the capture is released and reopened with
    exponential backoff until a frame comes again ("disconnected", then "reconnected" with
    the gap). Without it a failed read is the end of the file and ``on_end`` is told how many
    frames were grabbed. With ``pace`` frames are held back until their media time has come,
    so a file plays as if it were live.

    With ``stall_after_s`` a watchdog thread says "disconnected" as soon as no frame has come
    for that long, while the read may still be blocked (a stream that stalls without closing
    its connection); the failed read that follows, if any, reopens the feed without saying it
    again, and the next frame, from the same connection or a new one, says "reconnected".
    Every "disconnected" is followed by exactly one "reconnected" once frames come again.
    """

    def __init__(self, name: str, capture: Capture, *, emit: Callable[..., None],
                 media_ms: Callable[[Capture, int, int], float],
                 reopen: Callable[[], Capture | None] | None = None, backoff: Backoff = Backoff(),
                 freeze_after_s: float | None = None, pace: bool = False,
                 first: tuple[np.ndarray, float, int] | None = None,
                 on_end: Callable[[int], None] | None = None, stall_after_s: float | None = None):
        self._name = name
        self._cap: Capture | None = capture
        self._emit = emit
        self._media_ms = media_ms  # (capture, seq, capture_ns) -> media timestamp
        self._reopen = reopen
        self._backoff = backoff
        self._freeze = _FreezeDetector(name, freeze_after_s, emit) if freeze_after_s else None
        self._pace = pace
        self._pending = first  # a frame read before the thread runs (at start, or on reconnect)
        self._on_end = on_end
        self._cond = threading.Condition()
        self._slot: Frame | None = None
        self._finished = False
        self._stop = threading.Event()
        self._grabbed = 0
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"or-agent grabber {name}", daemon=True)
        # Whether the feed is lost, shared by the reading thread and the watchdog: each says
        # "disconnected"/"reconnected" under this lock, so the two never repeat or reorder them.
        self._health = threading.Lock()
        self._lost_ns: int | None = None  # when the feed was said to be lost; None while it delivers
        self._last_frame_ns = 0  # when the last frame came (or the grabber started)
        self._stall_after_s = stall_after_s
        self._watchdog = (threading.Thread(target=self._watch, name=f"or-agent grabber {name} watchdog", daemon=True)
                          if stall_after_s else None)

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def ended(self) -> bool:
        with self._cond:
            return self._finished and self._slot is None

    def start(self) -> None:
        self._last_frame_ns = time.monotonic_ns()
        self._thread.start()
        if self._watchdog is not None:
            self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()  # wake a reader blocked in take()
        if self._watchdog is not None and self._watchdog.is_alive():
            self._watchdog.join()
        if self._thread.is_alive():
            # A blocked read or reopen returns within the capture's own timeout.
            self._thread.join()
        if self._cap is not None:  # the thread never ran
            self._cap.release()
            self._cap = None

    def take(self, timeout_s: float | None) -> Frame | None:
        deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while self._slot is None and not self._finished and not self._stop.is_set():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            frame, self._slot = self._slot, None
            return frame

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # the thread boundary: a traceback here would reach nobody
            self._emit("error", f"{self._name}: frame grabber failed: {exc}")
        finally:
            if self._cap is not None:
                self._cap.release()  # released by the thread that used it, never mid-read
                self._cap = None
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _read(self) -> tuple[np.ndarray, float, int] | None:
        if self._cap is None:
            return None
        image = _read_bgr(self._cap)
        if image is None:
            return None
        now = time.monotonic_ns()
        return image, self._media_ms(self._cap, self._grabbed, now), now

    def _loop(self) -> None:
        origin: tuple[int, float] | None = None  # (monotonic ns, media ms) of the first paced frame
        while not self._stop.is_set():
            got, self._pending = self._pending or self._read(), None
            if got is None:
                if self._reopen is None:
                    if self._on_end is not None:
                        self._on_end(self._grabbed)
                    return
                if not self._reconnect():
                    return
                continue
            image, media_ms, capture_ns = got
            self._delivering()
            if self._pace:
                if origin is None:
                    origin = (time.monotonic_ns(), media_ms)
                wait_s = (origin[0] + (media_ms - origin[1]) * 1e6 - time.monotonic_ns()) / 1e9
                # Decoding slower than real time just plays late; skipping would save nothing.
                if wait_s > 0 and self._stop.wait(wait_s):
                    return
                capture_ns = time.monotonic_ns()
            seq = self._grabbed
            self._grabbed += 1
            if self._freeze is not None:
                self._freeze.update(image, capture_ns)
            frame = Frame(seq, capture_ns, media_ms, image)
            with self._cond:
                if self._slot is not None:
                    self._dropped += 1  # the consumer did not take the previous one in time
                self._slot = frame
                self._cond.notify_all()

    def _delivering(self) -> None:
        """A frame came: the feed is alive (and back, if it was lost)."""
        with self._health:
            now = time.monotonic_ns()
            self._last_frame_ns = now
            if self._lost_ns is not None:
                gap = (now - self._lost_ns) / 1e9
                self._lost_ns = None
                self._emit("reconnected", f"{self._name}: feed back after {gap:.1f} s", gap_s=gap)

    def _watch(self) -> None:
        """The watchdog: the feed is lost once no frame came for ``stall_after_s``, blocked read or not."""
        assert self._stall_after_s is not None, "the watchdog runs only with a stall limit"
        stall_ns = int(self._stall_after_s * 1e9)
        while not self._stop.wait(min(0.1, self._stall_after_s / 4)):
            with self._health:
                idle_ns = time.monotonic_ns() - self._last_frame_ns
                if self._lost_ns is None and idle_ns > stall_ns:
                    self._lost_ns = time.monotonic_ns()
                    self._emit("disconnected", f"{self._name}: feed stalled, no frame for {idle_ns / 1e9:.1f} s "
                                               f"(read timeout {self._stall_after_s:g} s)")

    def _reconnect(self) -> bool:
        """Reopen until a frame comes back; False when stopped first."""
        assert self._reopen is not None, "only a grabber that can reopen its source reconnects"
        if self._cap is not None:
            self._cap.release()  # a V4L2 device stays busy until released
            self._cap = None
        first_delay = self._backoff.initial_s
        with self._health:
            if self._lost_ns is None:  # else the watchdog said so already, while the read hung
                self._lost_ns = time.monotonic_ns()
                self._emit("disconnected", f"{self._name}: feed lost, reopening (after {first_delay:g} s, "
                                           f"backing off to every {self._backoff.max_s:g} s)")
        for delay in self._backoff.delays():
            if self._stop.wait(delay):
                return False
            cap = self._reopen()
            if cap is None:
                continue
            self._cap = cap
            got = self._read()
            if got is None:  # opens but delivers nothing yet (e.g. a capture card without signal)
                cap.release()
                self._cap = None
                continue
            self._pending = got  # the loop takes it next, and says "reconnected"
            return True
        return False  # the delays never run out; here for the type checker


class FrameSource(ABC):
    """One video source. Start it, ``read()`` frames from one consumer thread, stop it.

    ``read(timeout_s)`` returns the next frame, or None when the source has ended for good
    (``ended`` is then True) or when ``timeout_s`` passed without a new frame (``ended`` False).
    """

    def __init__(self, name: str, live: bool):
        self._name = name
        self._live = live
        self._events: deque[SourceEvent] = deque(maxlen=EVENT_QUEUE_LEN)
        self._events_lock = threading.Lock()
        self._started = False
        self._stopped = False
        self._delivered = 0
        self._last_seq: int | None = None

    # -- what every source is -------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def live(self) -> bool:
        """Frames come on the source's clock; a consumer that is too slow loses frames."""
        return self._live

    @property
    def nominal_fps(self) -> float | None:
        return None

    @property
    def frames_delivered(self) -> int:
        return self._delivered

    @property
    def frames_dropped(self) -> int:
        return 0

    @property
    def ended(self) -> bool:
        return self._stopped or (self._started and self._is_ended())

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Open the source; raises ``InputError`` when it cannot be used. Idempotent."""
        if self._stopped:
            raise RuntimeError(f"{self._name}: a stopped source cannot be restarted; make a new one")
        if self._started:
            return
        self._open()
        self._started = True

    def stop(self) -> None:
        """Join the grabber thread and release the capture. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._started:
            self._close()

    def __enter__(self) -> FrameSource:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def read(self, timeout_s: float | None = None) -> Frame | None:
        if not self._started and not self._stopped:
            raise RuntimeError(f"{self._name}: read() before start()")
        if self._stopped:
            return None
        frame = self._read(timeout_s)
        if frame is not None:
            self._delivered += 1
            self._last_seq = frame.seq
        return frame

    def drain_events(self) -> list[SourceEvent]:
        with self._events_lock:
            events = list(self._events)
            self._events.clear()
        return events

    def _emit(self, kind: str, message: str, gap_s: float | None = None) -> None:
        event = SourceEvent(kind, self._name, message, time.monotonic_ns(), seq=self._last_seq, gap_s=gap_s)
        with self._events_lock:
            self._events.append(event)

    # -- what each kind provides ---------------------------------------------------------------

    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def _read(self, timeout_s: float | None) -> Frame | None: ...

    @abstractmethod
    def _is_ended(self) -> bool: ...


def _check_positive(name: str, what: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                                  and math.isfinite(value) and value > 0):
        raise InputError(f"{name}: {what} must be a positive number, got {value}")


# -- files -----------------------------------------------------------------------------------


def _check_readable_file(path: Path, name: str) -> None:
    if not path.exists():
        raise InputError(f"{name}: no such file or directory")
    if path.is_dir():
        raise InputError(f"{name}: is a directory, not a video file")
    if path.stat().st_size == 0:
        raise InputError(f"{name}: file is empty")
    if not os.access(path, os.R_OK):
        raise InputError(f"{name}: permission denied")


def _mp4_top_boxes(path: Path, limit: int = 1000) -> list[bytes] | None:
    """The top-level box types of an ISO-BMFF (MP4/MOV) file, or None if it is not one."""
    size = path.stat().st_size
    types: list[bytes] = []
    with path.open("rb") as f:
        pos = 0
        while pos + 8 <= size and len(types) < limit:
            f.seek(pos)
            head = f.read(16)
            box_size, box_type = struct.unpack(">I4s", head[:8])
            if not types and box_type != b"ftyp":
                return None
            if box_size == 1 and len(head) == 16:
                box_size = struct.unpack(">Q", head[8:16])[0]
            elif box_size == 0:
                box_size = size - pos
            types.append(box_type)
            if box_size < 8:
                break
            pos += box_size
    return types or None


def _undecodable_reason(path: Path) -> str:
    """A best guess at why FFmpeg would not open a file, for the error message."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
        boxes = _mp4_top_boxes(path)
    except (OSError, struct.error):
        return "unknown container or codec"
    if boxes is not None and b"moov" not in boxes and b"moof" not in boxes:
        return "MP4 without its 'moov' index: the recording was cut off before it was finalised"
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "it is a text file"
    if boxes is not None:
        return "unsupported codec, or a damaged MP4"
    return "unknown container or codec"


# How an unpaced file is opened. Unpaced, decoding is throughput work beside a pipeline whose threads keep
# every core busy: one decoder thread spends less CPU per frame than FFmpeg's pool (alone on idle cores the
# pool can decode a 1080p file faster; ``python -m bench.cpu_paths_bench``). Paced playback keeps the pool:
# it must keep up on its own.
UNPACED_DECODER_PARAMS = [cv2.CAP_PROP_N_THREADS, 1]


class VideoFileSource(FrameSource):
    """A recorded video file.

    Unpaced (default): every frame in order, as fast as the consumer reads; nothing is dropped
    and no thread runs. Paced: the file plays at its native frame rate as if it were live (a
    grabber thread, newest frame only, drops counted), for demos and latency tests.

    A file that stops decoding before its container's frame count ends with an "error" event
    naming the frame; a complete one with an "ended" event.
    """

    def __init__(self, path: str | os.PathLike, paced: bool = False, *, freeze_after_s: float = 2.0):
        super().__init__(str(path), live=paced)
        _check_positive(str(path), "freeze threshold", freeze_after_s)
        self._path = Path(path)
        self._paced = paced
        self._freeze_after_s = freeze_after_s
        self._cap: Capture | None = None
        self._grabber: _LiveGrabber | None = None
        self._fps: float | None = None
        self._frame_count = 0  # from the container; 0 when unknown
        self._first: tuple[np.ndarray, float] | None = None
        self._decoded = 0
        self._done = False

    @property
    def nominal_fps(self) -> float | None:
        return self._fps

    @property
    def frame_count(self) -> int | None:
        """What the container says; None when it does not say."""
        return self._frame_count or None

    @property
    def frames_dropped(self) -> int:
        return self._grabber.dropped if self._grabber is not None else 0

    def _open(self) -> None:
        _check_readable_file(self._path, self._name)
        cap = cv2.VideoCapture(str(self._path), cv2.CAP_FFMPEG, [] if self._paced else UNPACED_DECODER_PARAMS)
        try:
            if not cap.isOpened():
                raise InputError(f"{self._name}: not a video OpenCV can decode ({_undecodable_reason(self._path)})")
            self._fps = _plausible_fps(cap.get(cv2.CAP_PROP_FPS))
            count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
            self._frame_count = int(count) if math.isfinite(count) and count > 0 else 0
            first = self._decode(cap, 0)
            if first is None:
                raise InputError(f"{self._name}: not a video OpenCV can decode (no frame could be decoded)")
        except BaseException:
            cap.release()
            raise
        h, w = first[0].shape[:2]
        fps = f"{self._fps:g} fps" if self._fps else "unknown frame rate"
        frames = f"{self._frame_count} frames" if self._frame_count else "unknown length"
        self._emit("opened", f"{self._name}: opened, {w}x{h}, {fps}, {frames}"
                             f"{', paced at native rate' if self._paced else ''}")
        if self._paced:
            self._grabber = _LiveGrabber(
                self._name, cap, emit=self._emit, media_ms=lambda c, seq, _ns: self._media_ms(c, seq),
                freeze_after_s=self._freeze_after_s, pace=True, first=(*first, time.monotonic_ns()),
                on_end=self._finish)
            self._grabber.start()
        else:
            self._cap, self._first = cap, first

    def _close(self) -> None:
        if self._grabber is not None:
            self._grabber.stop()
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _media_ms(self, cap: Capture, seq: int) -> float:
        pos = cap.get(cv2.CAP_PROP_POS_MSEC)
        if not math.isfinite(pos) or (pos <= 0 and seq > 0):  # the backend does not know
            pos = seq * 1000.0 / (self._fps or 25.0)
        return float(pos)

    def _decode(self, cap: Capture, seq: int) -> tuple[np.ndarray, float] | None:
        image = _read_bgr(cap)
        return None if image is None else (image, self._media_ms(cap, seq))

    def _finish(self, decoded: int) -> None:
        """The decoder gave no more frames: the end, or a truncated/corrupt file."""
        if self._frame_count and decoded < self._frame_count - _FRAME_COUNT_SLACK:
            self._emit("error", f"{self._name}: decoding stopped at frame {decoded} of {self._frame_count} "
                                f"(file truncated or corrupt)")
        else:
            self._emit("ended", f"{self._name}: ended after {decoded} frames")

    def _read(self, timeout_s: float | None) -> Frame | None:
        if self._grabber is not None:
            return self._grabber.take(timeout_s)
        if self._done:
            return None
        # Unpaced frames are decoded on demand, so the timeout never matters here.
        got: tuple[np.ndarray, float] | None
        if self._first is not None:
            got, self._first = self._first, None
        else:
            got = None if self._cap is None else self._decode(self._cap, self._decoded)
        if got is None:
            self._done = True
            if self._cap is not None:
                self._cap.release()
            self._cap = None
            self._finish(self._decoded)
            return None
        seq = self._decoded
        self._decoded += 1
        return Frame(seq, time.monotonic_ns(), got[1], got[0])

    def _is_ended(self) -> bool:
        return self._grabber.ended if self._grabber is not None else self._done


_NATURAL = re.compile(r"(\d+)")


def _natural_key(name: str) -> list:
    # frame2.png before frame10.png, whether or not the numbers are zero-padded
    return [int(t) if t.isdigit() else t.lower() for t in _NATURAL.split(name)]


class ImageFolderSource(FrameSource):
    """The image files of one folder in natural order (frame2 before frame10), at ``fps``.

    Not recursive; hidden files are ignored. An image that cannot be decoded is reported with
    an "error" event and skipped; it counts as dropped, and its sequence number is skipped too,
    so ``seq`` stays the image's position in the folder.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 25.0):
        super().__init__(str(path), live=False)
        _check_positive(str(path), "fps", fps)
        self._path = Path(path)
        self._fps = float(fps)
        self._files: list[Path] = []
        self._next = 0
        self._skipped = 0
        self._done = False

    @property
    def nominal_fps(self) -> float | None:
        return self._fps

    @property
    def frames_dropped(self) -> int:
        return self._skipped

    def _open(self) -> None:
        if not self._path.exists():
            raise InputError(f"{self._name}: no such file or directory")
        if not self._path.is_dir():
            raise InputError(f"{self._name}: not a directory")
        try:
            entries = list(self._path.iterdir())
        except PermissionError:
            raise InputError(f"{self._name}: permission denied") from None
        files = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS
                 and not p.name.startswith(".") and p.is_file()]
        if not files:
            raise InputError(f"{self._name}: directory has no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self._files = sorted(files, key=lambda p: _natural_key(p.name))
        self._emit("opened", f"{self._name}: opened, {len(self._files)} images at {self._fps:g} fps")

    def _close(self) -> None:
        pass

    def _read(self, timeout_s: float | None) -> Frame | None:
        while self._next < len(self._files):
            index, path = self._next, self._files[self._next]
            self._next += 1
            try:
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # grey and 16-bit come back 8-bit BGR
            except cv2.error:
                image = None
            if image is None or image.size == 0:
                self._skipped += 1
                self._emit("error", f"{path}: cannot decode image (corrupt or unsupported), skipped")
                continue
            return Frame(index, time.monotonic_ns(), index * 1000.0 / self._fps, _to_bgr(image))
        if not self._done:
            self._done = True
            self._emit("ended", f"{self._name}: ended after {len(self._files)} images")
        return None

    def _is_ended(self) -> bool:
        return self._done


# -- live sources ----------------------------------------------------------------------------


class _LiveCaptureSource(FrameSource):
    """What capture devices and streams share: open at start, then a grabber that reopens."""

    def __init__(self, name: str, *, backoff: Backoff, freeze_after_s: float,
                 capture_factory: CaptureFactory | None, stall_after_s: float | None = None):
        super().__init__(name, live=True)
        _check_positive(name, "freeze threshold", freeze_after_s)
        self._backoff = backoff
        self._freeze_after_s = freeze_after_s
        self._stall_after_s = stall_after_s  # no frame for this long: lost, even while a read hangs
        self._factory = capture_factory
        self._grabber: _LiveGrabber | None = None
        self._fps: float | None = None
        self._opened_ns = 0

    @property
    def nominal_fps(self) -> float | None:
        return self._fps

    @property
    def frames_dropped(self) -> int:
        return self._grabber.dropped if self._grabber is not None else 0

    @abstractmethod
    def _new_capture(self) -> Capture:
        """A fresh capture of the device or URL (opened or not), with the settings applied."""

    @abstractmethod
    def _cannot_open(self, elapsed_s: float) -> InputError: ...

    def _try_open(self) -> Capture | None:
        """An opened, configured capture, or None."""
        try:
            cap = self._factory() if self._factory is not None else self._new_capture()
        except cv2.error:
            return None
        if not cap.isOpened():
            cap.release()
            return None
        self._configure(cap)
        return cap

    def _configure(self, cap: Capture) -> None:
        pass

    def _describe(self, cap: Capture) -> str:
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = f"{self._fps:g} fps" if self._fps else "unknown frame rate"
        return f"{w}x{h} at {fps}" if w > 0 and h > 0 else fps

    def _open(self) -> None:
        t0 = time.monotonic()
        cap = self._try_open()
        if cap is None:
            raise self._cannot_open(time.monotonic() - t0)
        self._opened_ns = time.monotonic_ns()
        self._fps = _plausible_fps(cap.get(cv2.CAP_PROP_FPS))
        self._emit("opened", f"{self._name}: opened, {self._describe(cap)}")
        # A first read that fails (a capture card without signal) is not an input mistake:
        # the grabber treats it as a lost feed and keeps trying.
        self._grabber = _LiveGrabber(
            self._name, cap, emit=self._emit, media_ms=lambda _c, _seq, ns: (ns - self._opened_ns) / 1e6,
            reopen=self._try_open, backoff=self._backoff, freeze_after_s=self._freeze_after_s,
            stall_after_s=self._stall_after_s)
        self._grabber.start()

    def _close(self) -> None:
        if self._grabber is not None:
            self._grabber.stop()

    def _read(self, timeout_s: float | None) -> Frame | None:
        return None if self._grabber is None else self._grabber.take(timeout_s)

    def _is_ended(self) -> bool:
        return self._grabber is None or self._grabber.ended


class CaptureDeviceSource(_LiveCaptureSource):
    """A V4L2 capture device (the tower's capture card, a USB camera) by index or path.

    A path such as ``/dev/v4l/by-id/...`` keeps naming the same card across reboots, which an
    index does not. ``width``, ``height`` and ``fps`` are requested; the "opened" event says
    what the device actually gives. ``fourcc`` (e.g. "MJPG") selects the pixel format, which
    many HDMI capture cards need for full resolution at full rate.
    """

    def __init__(self, device: int | str, width: int | None = None, height: int | None = None,
                 fps: float | None = None, *, fourcc: str | None = None, backoff: Backoff = Backoff(),
                 freeze_after_s: float = 2.0, capture_factory: CaptureFactory | None = None):
        if isinstance(device, str) and device.strip().isdigit():
            device = int(device)
        if isinstance(device, bool) or not isinstance(device, (int, str)) or (isinstance(device, int) and device < 0):
            raise InputError(f"camera {device!r}: not a device index (0, 1, ...) or path (/dev/videoN)")
        name = f"camera {device}" if isinstance(device, int) else device
        super().__init__(name, backoff=backoff, freeze_after_s=freeze_after_s, capture_factory=capture_factory)
        _check_positive(name, "width", width)
        _check_positive(name, "height", height)
        _check_positive(name, "fps", fps)
        if fourcc is not None and len(fourcc) != 4:
            raise InputError(f"{name}: fourcc must be 4 characters, got {fourcc!r}")
        self._device = device
        self._want = (width, height, fps)
        self._fourcc = fourcc

    def _new_capture(self) -> Capture:
        return cv2.VideoCapture(self._device, cv2.CAP_V4L2)

    def _configure(self, cap: Capture) -> None:
        width, height, fps = self._want
        if self._fourcc:  # before the size: the size on offer depends on the pixel format
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*self._fourcc))
        if width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        if height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        if fps:
            cap.set(cv2.CAP_PROP_FPS, fps)

    def _describe(self, cap: Capture) -> str:
        got = super()._describe(cap)
        width, height, fps = self._want
        if width or height or fps:
            asked = f"{width or '?'}x{height or '?'}" + (f" at {fps:g} fps" if fps else "")
            return f"{got} (asked {asked})"
        return got

    def _cannot_open(self, elapsed_s: float) -> InputError:
        return InputError(f"{self._name}: cannot open (no such device, or it is busy)")


def _redact(url: str) -> str:
    """The URL without its password, so it can go into events and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


class StreamSource(_LiveCaptureSource):
    """A network stream (rtsp, rtsps, http, https, rtmp) through FFmpeg, with open and read
    timeouts so that a silent server fails the start, or is noticed as lost, in bounded time.
    A stream that stalls is reported lost once no frame came for the read timeout, whether or
    not FFmpeg's read has given up by then.

    The name, and so every message, shows the URL with its password masked.
    """

    def __init__(self, url: str, open_timeout_s: float = 5.0, read_timeout_s: float = 5.0, *,
                 backoff: Backoff = Backoff(), freeze_after_s: float = 2.0,
                 capture_factory: CaptureFactory | None = None):
        name = _redact(url)
        scheme = urlsplit(url).scheme.lower() if "://" in url else ""
        if scheme not in STREAM_SCHEMES:
            raise InputError(f"{name}: not a stream URL (use {', '.join(STREAM_SCHEMES)})")
        _check_positive(name, "open timeout", open_timeout_s)
        _check_positive(name, "read timeout", read_timeout_s)
        super().__init__(name, backoff=backoff, freeze_after_s=freeze_after_s, capture_factory=capture_factory,
                         stall_after_s=float(read_timeout_s))
        self._url = url
        self._open_timeout_s = float(open_timeout_s)
        self._read_timeout_s = float(read_timeout_s)

    def _new_capture(self) -> Capture:
        return cv2.VideoCapture(self._url, cv2.CAP_FFMPEG, [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self._open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self._read_timeout_s * 1000),
        ])

    def _cannot_open(self, elapsed_s: float) -> InputError:
        # OpenCV only says "not opened"; how long it took tells a silent server from a refusal.
        if elapsed_s >= 0.9 * self._open_timeout_s:
            return InputError(f"{self._name}: no answer within {self._open_timeout_s:.1f} s")
        return InputError(f"{self._name}: cannot open stream (connection refused, wrong path, or not a video stream)")


# -- choosing a source -------------------------------------------------------------------------


def open_source(spec: str, *, paced: bool = False, width: int | None = None, height: int | None = None,
                fps: float | None = None, open_timeout_s: float = 5.0, read_timeout_s: float = 5.0) -> FrameSource:
    """The source a user's spec names, not yet started (``start()`` or ``with`` opens it).

    A digit string, ``/dev/video*`` or ``/dev/v4l/...`` is a capture device; an rtsp/rtsps/http/https/rtmp URL
    is a stream; an existing directory is an image folder (at ``fps``, default 25); anything
    else is a video file (``paced`` plays it at its native rate).
    """
    spec = str(spec).strip()
    if not spec:
        raise InputError("source '': empty (give a video file, image folder, camera index or stream URL)")
    if spec.isdigit() or spec.startswith(("/dev/video", "/dev/v4l/")):
        return CaptureDeviceSource(spec, width, height, fps)
    if "://" in spec:
        scheme = urlsplit(spec).scheme.lower()
        if scheme in STREAM_SCHEMES:
            return StreamSource(spec, open_timeout_s, read_timeout_s)
        raise InputError(f"{_redact(spec)}: unsupported URL scheme {scheme!r} (use {', '.join(STREAM_SCHEMES)})")
    if os.path.isdir(spec):
        return ImageFolderSource(spec, fps if fps is not None else 25.0)
    return VideoFileSource(spec, paced=paced)


VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".webm")


def is_video_name(path: Path) -> bool:
    """A video by its name (``VIDEO_SUFFIXES``), not a ``.part`` file still being written."""
    return path.suffix.lower() in VIDEO_SUFFIXES and ".part" not in path.name


def _holds_videos(folder: Path) -> bool:
    """Whether a folder (not a file) directly holds a video; one that cannot be read does not."""
    try:
        return folder.is_dir() and any(is_video_name(q) for q in folder.iterdir())
    except OSError:
        return False


def video_files(paths, must_exist: bool = True) -> list[Path]:
    """Video files named directly or found (sorted) in directories; unfinished ``.part`` files are
    skipped. With ``must_exist=False`` a missing file is kept, to be reported when its turn comes."""
    videos: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if is_video_name(q))
            if not found:
                cases = sum(1 for d in p.iterdir() if _holds_videos(d))
                hint = (f"; {cases} of its subfolders have some: for a folder of per-case folders, "
                        f"or-agent archive run {p} --out DIR") if cases else ""
                raise InputError(f"{p}: directory has no video files ({', '.join(VIDEO_SUFFIXES)}){hint}")
            videos += found
        elif p.is_file() or not must_exist:
            videos.append(p)
        else:
            raise InputError(f"{p}: no such video file or directory")
    return videos


class FirstFrames:
    """The first ``limit`` frames of another source, then the end: for benchmarks, acceptance
    runs and previews that play part of a recording. Delegates everything else."""

    def __init__(self, source: FrameSource, limit: int):
        if limit < 1:
            raise InputError(f"{source.name}: frame limit must be at least 1, got {limit}")
        self.source, self.limit = source, limit

    def __getattr__(self, name):
        return getattr(self.source, name)

    @property
    def ended(self) -> bool:
        return self.source.frames_delivered >= self.limit or self.source.ended

    def read(self, timeout_s: float | None = None) -> Frame | None:
        if self.source.frames_delivered >= self.limit:
            return None
        return self.source.read(timeout_s)
