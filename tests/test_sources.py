"""Frame sources: files, folders, devices and streams behind one interface; bad input is one clear
line, lost and frozen feeds are reported, and no thread outlives its source."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time

import cv2
import numpy as np
import pytest

from or_agent.pipelines.errors import InputError
from or_agent.pipelines.sources import Backoff, CaptureDeviceSource, ImageFolderSource, StreamSource, VideoFileSource, open_source

FPS = 25.0
W, H = 160, 120
BITS = 6  # the frame number, as black/white 16x16 squares along the top: survives lossy codecs


def _frame_image(i: int, w: int = W, h: int = H) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noise: every frame costs real bytes
    if w >= 16 * BITS and h >= 16:
        for b in range(BITS):
            img[:16, 16 * b:16 * b + 16] = 255 if (i >> b) & 1 else 0
    return img


def _frame_number(img: np.ndarray) -> int:
    return sum(1 << b for b in range(BITS) if img[4:12, 16 * b + 4:16 * b + 12].mean() > 128)


def _write_video(path, n: int, w: int = W, h: int = H, fourcc: str = "mp4v", backend=None):
    if backend is None:
        vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (w, h))
    else:
        vw = cv2.VideoWriter(str(path), backend, cv2.VideoWriter_fourcc(*fourcc), FPS, (w, h))
    assert vw.isOpened(), path
    for i in range(n):
        vw.write(_frame_image(i, w, h))
    vw.release()
    return path


def _boxes(data: bytes, start: int = 0, end: int | None = None):
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        yield kind, pos, size
        pos += size


def _faststart(data: bytes) -> bytes:
    """The MP4 with its 'moov' index moved before the media, as streaming-friendly writers do, so
    that a cut-off copy still opens and decodes up to the cut."""
    top = {kind: (pos, size) for kind, pos, size in _boxes(data)}
    moov_at, moov_size = top[b"moov"]
    moov = bytearray(data[moov_at:moov_at + moov_size])

    def shift_chunk_offsets(start, end):
        for kind, pos, size in _boxes(moov, start, end):
            if kind in (b"trak", b"mdia", b"minf", b"stbl"):
                shift_chunk_offsets(pos + 8, pos + size)
            elif kind == b"stco":
                (count,) = struct.unpack(">I", moov[pos + 12:pos + 16])
                for k in range(count):
                    at = pos + 16 + 4 * k
                    struct.pack_into(">I", moov, at, struct.unpack(">I", moov[at:at + 4])[0] + moov_size)

    shift_chunk_offsets(8, moov_size)
    rest = data[:moov_at] + data[moov_at + moov_size:]
    mdat_at = top[b"mdat"][0]
    return rest[:mdat_at] + bytes(moov) + rest[mdat_at:]


@pytest.fixture(scope="module")
def video30(tmp_path_factory):
    return _write_video(tmp_path_factory.mktemp("videos") / "v30.mp4", 30)


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and t.name.startswith("or-agent grabber")]
    assert not left, f"threads still running: {left}"


def _read_all(src, timeout_s: float = 2.0):
    frames = []
    while True:
        f = src.read(timeout_s)
        if f is None:
            assert src.ended, "read timed out before the source ended"
            return frames
        frames.append(f)


def _kinds(events):
    return [e.kind for e in events]


# -- files ---------------------------------------------------------------------------------------


def test_unpaced_file_gives_every_frame_in_order(video30):
    with VideoFileSource(video30) as src:
        assert not src.live and src.nominal_fps == FPS
        frames = _read_all(src)
        events = src.drain_events()
        assert src.frames_delivered == 30 and src.frames_dropped == 0
    assert [f.seq for f in frames] == list(range(30))
    assert [_frame_number(f.image) for f in frames] == list(range(30))
    media = [f.media_ms for f in frames]
    assert media[0] == 0 and all(b > a for a, b in zip(media, media[1:]))
    assert media[-1] == pytest.approx(29 * 40, abs=1)
    assert all(f.image.shape == (H, W, 3) and f.image.dtype == np.uint8 for f in frames)
    assert _kinds(events) == ["opened", "ended"]
    assert events[-1].seq == 29
    assert src.drain_events() == []


def test_paced_file_with_slow_consumer_drops_but_keeps_real_time(video30):
    period = 1 / FPS
    t0 = time.monotonic()
    with VideoFileSource(video30, paced=True) as src:
        assert src.live
        frames = []
        while (f := src.read(1.0)) is not None:
            frames.append(f)
            time.sleep(3 * period)
        wall = time.monotonic() - t0
        assert src.ended
        events = src.drain_events()
    seqs = [f.seq for f in frames]
    assert seqs == sorted(set(seqs)) and seqs[0] == 0 and seqs[-1] == 29
    assert [_frame_number(f.image) for f in frames] == seqs
    assert src.frames_dropped > 0
    assert src.frames_delivered + src.frames_dropped == 30
    assert 30 * period - 0.1 < wall < 30 * period + 0.6
    assert _kinds(events) == ["opened", "ended"]


def test_paced_file_with_fast_consumer_drops_almost_nothing(video30):
    t0 = time.monotonic()
    with VideoFileSource(video30, paced=True) as src:
        frames = _read_all(src)
    wall = time.monotonic() - t0
    assert src.frames_dropped <= 1
    assert len(frames) + src.frames_dropped == 30
    assert wall > 29 / FPS - 0.05  # paced: never faster than the file's own clock


def test_read_timeout_without_a_frame_is_not_the_end(video30):
    with VideoFileSource(video30, paced=True) as src:
        assert src.read(1.0).seq == 0
        assert src.read(0.0) is None  # frame 1 is not due yet
        assert not src.ended
    assert src.ended and src.read() is None


def test_truncated_mp4_ends_with_an_error_event(tmp_path):
    data = _write_video(tmp_path / "full.mp4", 50).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(_faststart(data)[: int(len(data) * 0.6)])
    for paced in (False, True):
        with VideoFileSource(cut, paced=paced) as src:
            frames = _read_all(src)
            events = src.drain_events()
        assert 0 < len(frames) < 48
        assert events[-1].kind == "error" and "ended" not in _kinds(events)
        assert events[-1].message == (f"{cut}: decoding stopped at frame {src.frames_delivered + src.frames_dropped}"
                                      f" of 50 (file truncated or corrupt)")


def test_truncated_avi_ends_with_an_error_event(tmp_path):
    data = _write_video(tmp_path / "full.avi", 40, fourcc="MJPG").read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with VideoFileSource(cut) as src:
        frames = _read_all(src)
        events = src.drain_events()
    assert 0 < len(frames) < 38
    assert events[-1].kind == "error" and f"stopped at frame {len(frames)} of 40" in events[-1].message


def test_mp4_cut_before_its_index_was_written_is_named(tmp_path):
    data = _write_video(tmp_path / "full.mp4", 20).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])  # OpenCV writes the index last
    with pytest.raises(InputError) as err:
        VideoFileSource(cut).start()
    assert str(err.value) == (f"{cut}: not a video OpenCV can decode (MP4 without its 'moov' index: "
                              f"the recording was cut off before it was finalised)")


@pytest.mark.parametrize("size", [(1, 1), (721, 479), (3840, 2160)])
def test_odd_tiny_and_4k_sizes_decode_as_they_are(tmp_path, size):
    w, h = size
    # OpenCV's own MJPEG writer keeps odd sizes (FFmpeg's encoders round them down to even)
    path = _write_video(tmp_path / f"v{w}x{h}.avi", 3, w, h, "MJPG", backend=cv2.CAP_OPENCV_MJPEG)
    with VideoFileSource(path) as src:
        frames = _read_all(src)
    assert [f.image.shape for f in frames] == [(h, w, 3)] * 3
    assert [f.size for f in frames] == [(w, h)] * 3


# -- bad input -------------------------------------------------------------------------------------


def _start_error(src) -> str:
    with pytest.raises(InputError) as err:
        src.start()
    src.stop()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_files_are_one_clear_line(tmp_path):
    missing = tmp_path / "nope.mp4"
    assert _start_error(open_source(str(missing))) == f"{missing}: no such file or directory"

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "notes.txt").write_text("not an image")
    assert _start_error(open_source(str(empty_dir))) == (
        f"{empty_dir}: directory has no image files (.png, .jpg, .jpeg, .bmp, .tif, .tiff)")

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert _start_error(open_source(str(empty))) == f"{empty}: file is empty"

    text = tmp_path / "text.mp4"
    text.write_text("this is not a video\n" * 20)
    assert _start_error(open_source(str(text))) == f"{text}: not a video OpenCV can decode (it is a text file)"

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert _start_error(open_source(str(garbage))) == f"{garbage}: not a video OpenCV can decode (unknown container or codec)"

    assert _start_error(VideoFileSource(tmp_path)) == f"{tmp_path}: is a directory, not a video file"


def test_missing_camera_is_one_clear_line():
    if os.path.exists("/dev/video7"):
        pytest.skip("this machine has a /dev/video7")
    t0 = time.monotonic()
    assert _start_error(open_source("7")) == "camera 7: cannot open (no such device, or it is busy)"
    assert _start_error(open_source("/dev/video7")) == "/dev/video7: cannot open (no such device, or it is busy)"
    assert time.monotonic() - t0 < 10  # a hang bound: no retry loop on an absent device


def test_bad_specs_and_parameters_are_one_clear_line():
    with pytest.raises(InputError, match=r"^ftp://127.0.0.1/x: unsupported URL scheme 'ftp' \(use rtsp, rtsps"):
        open_source("ftp://127.0.0.1/x")
    with pytest.raises(InputError, match=r"^source '': empty"):
        open_source("  ")
    with pytest.raises(InputError, match=r"^camera 0: fps must be a positive number, got -5$"):
        open_source("0", fps=-5)
    with pytest.raises(InputError, match=r"^rtsp://127.0.0.1:9/x: open timeout must be a positive number, got 0$"):
        open_source("rtsp://127.0.0.1:9/x", open_timeout_s=0)


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never says a word."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    accepted, done = [], threading.Event()

    def accept():
        while not done.is_set():
            try:
                accepted.append(server.accept()[0])
            except (TimeoutError, OSError):
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    done.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_stream_that_never_answers_fails_start_within_the_open_timeout(silent_server, scheme):
    url = f"{scheme}://127.0.0.1:{silent_server}/x"
    src = open_source(url, open_timeout_s=1.0, read_timeout_s=1.0)
    t0 = time.monotonic()
    assert _start_error(src) == f"{url}: no answer within 1.0 s"
    assert time.monotonic() - t0 < 1.0 + 5  # the open timeout, not the read timeout or a hang


def test_refused_stream_and_passwords_stay_out_of_messages(silent_server):
    # bind then close a socket: a port on 127.0.0.1 that refuses connections
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    src = StreamSource(f"rtsp://admin:secret@127.0.0.1:{port}/x", open_timeout_s=1.0)
    assert src.name == f"rtsp://admin:***@127.0.0.1:{port}/x"
    message = _start_error(src)
    assert message == (f"rtsp://admin:***@127.0.0.1:{port}/x: cannot open stream "
                       f"(connection refused, wrong path, or not a video stream)")


# -- live feeds: reconnection and freezing, with fake captures -----------------------------------


class FakeCapture:
    """Plays a script: a list of images (or None for a failed read), one every ``period_s``."""

    def __init__(self, script, period_s: float = 0.005, opened: bool = True):
        self._script = list(script)
        self._period_s = period_s
        self._opened = opened
        self.released = False

    def isOpened(self):
        return self._opened and not self.released

    def read(self):
        time.sleep(self._period_s)
        if not self._script:
            return False, None
        image = self._script.pop(0)
        return (image is not None), image

    def get(self, prop_id):
        return {cv2.CAP_PROP_FRAME_WIDTH: W, cv2.CAP_PROP_FRAME_HEIGHT: H, cv2.CAP_PROP_FPS: 200.0}.get(prop_id, 0.0)

    def set(self, prop_id, value):
        return True

    def release(self):
        self.released = True


class FakeFactory:
    """Hands out the captures given, in turn; then unopened ones."""

    def __init__(self, *captures):
        self.captures = list(captures)
        self.made = []

    def __call__(self):
        cap = self.captures.pop(0) if self.captures else FakeCapture([], opened=False)
        self.made.append(cap)
        return cap


def _changing(n, start=0):
    return [_frame_image(i) for i in range(start, start + n)]


def test_lost_feed_reconnects_with_backoff_and_frames_resume():
    factory = FakeFactory(
        FakeCapture(_changing(5) + [None]),  # delivers, then the cable is pulled
        FakeCapture([], opened=False),  # still unplugged on the first retries
        FakeCapture([], opened=False),
        FakeCapture([None]),  # opens but gives nothing: not back yet
        FakeCapture(_changing(400, start=5)),  # back
    )
    src = CaptureDeviceSource(3, 1280, 720, 30, backoff=Backoff(0.02, 0.08), capture_factory=factory)
    frames = []
    with src:
        deadline = time.monotonic() + 5
        while len(frames) < 15 and time.monotonic() < deadline:
            if (f := src.read(1.0)) is not None:
                frames.append(f)
        assert not src.ended
        events = src.drain_events()
    assert src.ended
    assert all(cap.released for cap in factory.made)
    assert _kinds(events) == ["opened", "disconnected", "reconnected"]
    assert events[0].message == "camera 3: opened, 160x120 at 200 fps (asked 1280x720 at 30 fps)"
    gap = events[2].gap_s
    # waits 0.02 + 0.04 + 0.08 (+0.08 for the opened-but-silent one) before the feed comes back
    assert gap is not None and 0.14 <= gap < 2
    assert len(frames) >= 15
    seqs = [f.seq for f in frames]
    assert seqs == sorted(set(seqs))  # seq keeps counting across the reconnection
    numbers = [_frame_number(f.image) for f in frames]
    assert numbers == sorted(numbers) and max(numbers) > 5  # frames after the reconnection
    media = [f.media_ms for f in frames]
    assert all(b > a for a, b in zip(media, media[1:]))  # ms since open, across the gap too


def test_stream_reconnects_through_the_same_logic():
    factory = FakeFactory(FakeCapture(_changing(3) + [None]), FakeCapture(_changing(100, start=3)))
    with StreamSource("rtsp://127.0.0.1:8554/tower", backoff=Backoff(0.01, 0.02), capture_factory=factory) as src:
        got = []
        while len(got) < 10:
            got.append(src.read(2.0))
        events = src.drain_events()
    assert None not in got
    assert _kinds(events) == ["opened", "disconnected", "reconnected"]
    assert events[0].message.startswith("rtsp://127.0.0.1:8554/tower: opened")


def test_frozen_feed_is_reported_once_then_unfrozen():
    still = _frame_image(0)
    script = _changing(10) + [still.copy() for _ in range(120)] + _changing(200, start=11)  # 5 ms apart
    factory = FakeFactory(FakeCapture(script))
    with CaptureDeviceSource(0, freeze_after_s=0.2, capture_factory=factory) as src:
        deadline = time.monotonic() + 3
        events = []
        while "unfrozen" not in _kinds(events) and time.monotonic() < deadline:
            src.read(0.5)
            events += src.drain_events()
    assert _kinds(events) == ["opened", "frozen", "unfrozen"]
    assert 0.3 < events[2].gap_s < 1.5


def test_live_frames_come_out_bgr_whatever_the_device_gives():
    grey = np.full((H, W), 90, np.uint8)
    bgra = np.dstack([_frame_image(1), np.full((H, W), 255, np.uint8)])
    factory = FakeFactory(FakeCapture([grey, bgra], period_s=0.02))
    with CaptureDeviceSource("/dev/video0", capture_factory=factory) as src:
        a, b = src.read(2.0), src.read(2.0)
    assert a.image.shape == b.image.shape == (H, W, 3)
    assert (a.image == 90).all()
    assert np.array_equal(b.image, _frame_image(1))


def test_slow_consumer_of_a_live_feed_gets_the_newest_frame():
    factory = FakeFactory(FakeCapture(_changing(300), period_s=0.002))
    with CaptureDeviceSource(1, capture_factory=factory) as src:
        src.read(1.0)
        time.sleep(0.2)
        newest = src.read(1.0)
    assert newest.seq > 20  # not the frame after the first: the older ones were dropped
    assert src.frames_dropped >= newest.seq - 2


def test_stop_is_idempotent_and_wakes_a_blocked_reader():
    factory = FakeFactory(FakeCapture([None]), *[FakeCapture([], opened=False)] * 50)
    src = CaptureDeviceSource(2, backoff=Backoff(0.05, 0.1), capture_factory=factory)
    src.start()
    src.start()
    result = []
    reader = threading.Thread(target=lambda: result.append(src.read()))  # no timeout: waits for ever
    reader.start()
    time.sleep(0.2)
    src.stop()
    reader.join(2)
    assert not reader.is_alive() and result == [None] and src.ended
    src.stop()
    with pytest.raises(RuntimeError):
        src.start()


class HangingCapture(FakeCapture):
    """Plays ``script``, then hangs in ``read()`` until ``resume`` is set (a stream whose read does not
    give up at its timeout), then plays ``then``."""

    def __init__(self, script, then, resume: threading.Event):
        super().__init__(script)
        self._then, self._resume = list(then), resume
        self.hanging = threading.Event()

    def read(self):
        if self._script:
            return super().read()
        if self._then and not self._resume.is_set():
            self.hanging.set()
            self._resume.wait(30)  # a hang bound, so that a failing test still ends
            self.hanging.clear()
            self._script, self._then = self._then, []
        return super().read()


def _until(src, done, timeout_s: float, what: str):
    """Read frames and collect events until ``done(events)``; fail naming ``what`` after the timeout."""
    events = []
    deadline = time.monotonic() + timeout_s
    while not done(events):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}; events: {_kinds(events)}"
        src.read(0.1)
        events += src.drain_events()
    return events


def _frames_within(src, n: int, timeout_s: float) -> int:
    got, deadline = 0, time.monotonic() + timeout_s
    while got < n and time.monotonic() < deadline:
        got += src.read(0.5) is not None
    return got


def test_a_read_that_hangs_past_the_read_timeout_is_reported_lost_while_it_hangs():
    resume = threading.Event()
    cap = HangingCapture(_changing(5), then=_changing(300, start=5), resume=resume)
    src = StreamSource("http://127.0.0.1:8080/tower.mjpg", read_timeout_s=0.3, backoff=Backoff(0.05, 0.1),
                       capture_factory=FakeFactory(cap))
    try:
        with src:
            events = _until(src, lambda ev: "disconnected" in _kinds(ev), 10, "the hung read to be reported")
            assert cap.hanging.is_set(), "reported while the read is still blocked, not after it returned"
            resume.set()
            events += _until(src, lambda ev: "reconnected" in _kinds(ev), 10, "frames to come back")
            assert _frames_within(src, 5, 10) == 5
    finally:
        resume.set()
    assert _kinds(events) == ["opened", "disconnected", "reconnected"]
    assert events[1].message.startswith("http://127.0.0.1:8080/tower.mjpg: feed stalled, no frame for ")
    assert events[1].message.endswith(" s (read timeout 0.3 s)")
    assert events[2].gap_s is not None and events[2].gap_s > 0


# -- a real HTTP stream --------------------------------------------------------------------------


class MjpegServer:
    """A real HTTP server on 127.0.0.1 serving an MJPEG stream (multipart/x-mixed-replace, as IP cameras
    and video encoders do), changing frames at ``FPS`` on every connection. ``stall()`` makes it go
    silent without closing anything (a hung encoder: open connections get nothing more, new ones get
    the response headers and then nothing); ``resume()`` lets every connection carry on."""

    def __init__(self):
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self._flowing, self._done = threading.Event(), threading.Event()
        self._flowing.set()
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="mjpeg server", daemon=True)]
        self._threads[0].start()
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}/live.mjpg"

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._done.set()
        self._flowing.set()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(10)
        self._server.close()

    def _accept(self) -> None:
        while not self._done.is_set():
            try:
                conn = self._server.accept()[0]
            except OSError:  # the accept timeout, or the server closed
                continue
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name="mjpeg connection", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5.0)
            conn.recv(4096)  # the request; the answer is the same whatever was asked
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n"
                         b"Cache-Control: no-cache\r\n\r\n")
            i = 0
            while not self._done.is_set():
                if not self._flowing.wait(0.05):
                    continue
                jpeg = cv2.imencode(".jpg", _frame_image(i))[1].tobytes()
                conn.sendall(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
                             + jpeg + b"\r\n")
                i += 1
                self._done.wait(1 / FPS)
        except OSError:
            pass  # the client went away (it reconnects on a new connection)
        finally:
            conn.close()


@pytest.fixture
def mjpeg_server():
    server = MjpegServer()
    yield server
    server.close()


def test_a_stalled_http_stream_is_lost_while_it_stalls_and_back_when_it_flows(mjpeg_server):
    src = StreamSource(mjpeg_server.url, open_timeout_s=2.0, read_timeout_s=1.0, backoff=Backoff(0.1, 0.5))
    with src:
        assert _frames_within(src, 5, 20) == 5
        mjpeg_server.stall()
        events = _until(src, lambda ev: "disconnected" in _kinds(ev), 20, "the stalled stream to be reported lost")
        assert mjpeg_server.stalled  # said while the stream stalls, not once it is back
        mjpeg_server.resume()
        events += _until(src, lambda ev: "reconnected" in _kinds(ev), 30, "the stream to come back")
        assert _frames_within(src, 5, 20) == 5
        events += src.drain_events()
    assert _kinds(events) == ["opened", "disconnected", "reconnected"]
    assert events[0].message.startswith(f"{mjpeg_server.url}: opened, 160x120")


# -- image folders -----------------------------------------------------------------------------------


def test_image_folder_in_natural_order_with_grey_and_corrupt_images(tmp_path):
    for i in (1, 2, 10):
        cv2.imwrite(str(tmp_path / f"frame{i}.png"), _frame_image(i))
    grey = cv2.cvtColor(_frame_image(3), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(tmp_path / "frame3.png"), grey)  # grayscale
    (tmp_path / "frame4.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # corrupt
    cv2.imwrite(str(tmp_path / "frame5.jpg"), _frame_image(5))
    (tmp_path / "readme.txt").write_text("ignored")
    with open_source(str(tmp_path), fps=10) as src:
        assert src.nominal_fps == 10 and not src.live
        frames = _read_all(src)
        events = src.drain_events()
    assert [f.seq for f in frames] == [0, 1, 2, 4, 5]  # frame4.png (index 3) skipped
    assert [f.media_ms for f in frames] == [0, 100, 200, 400, 500]
    assert [_frame_number(f.image) for f in frames] == [1, 2, 3, 5, 10]
    assert frames[2].image.shape == (H, W, 3) and all(np.array_equal(frames[2].image[..., c], grey) for c in range(3))
    assert src.frames_delivered == 5 and src.frames_dropped == 1
    assert _kinds(events) == ["opened", "error", "ended"]
    assert events[1].message == f"{tmp_path / 'frame4.png'}: cannot decode image (corrupt or unsupported), skipped"


def test_open_source_picks_the_kind(tmp_path, video30):
    assert isinstance(open_source("0"), CaptureDeviceSource)
    assert isinstance(open_source("/dev/video2"), CaptureDeviceSource)
    assert open_source("/dev/v4l/by-id/usb-capture-video-index0").name == "/dev/v4l/by-id/usb-capture-video-index0"
    for url in ("rtsp://127.0.0.1/a", "rtsps://127.0.0.1/a", "http://127.0.0.1/a", "HTTPS://127.0.0.1/a",
                "rtmp://127.0.0.1/a"):
        assert isinstance(open_source(url), StreamSource)
    assert isinstance(open_source(str(tmp_path)), ImageFolderSource)
    paced = open_source(str(video30), paced=True)
    assert isinstance(paced, VideoFileSource) and paced.live
