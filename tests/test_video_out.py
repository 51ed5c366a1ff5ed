"""The H.264 MP4 writer: codec, frame count and duration read back, odd sizes, media time kept, atomic output."""

from fractions import Fraction

import numpy as np
import pytest

from or_agent.pipelines.errors import InputError, OrAgentError
from or_agent.pipelines.video_out import H264Writer, h264_encoder, video_size

av = pytest.importorskip("av")


def _read(path):
    """(codec name, width, height, frames decoded, duration in seconds, per-frame mean grey levels)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(s)]
        duration = float(s.duration * s.time_base)
        return s.codec_context.name, s.width, s.height, len(frames), duration, [float(f.mean()) for f in frames]


def test_the_wheel_has_an_h264_encoder():
    assert h264_encoder() in ("libx264", "libopenh264")


def test_writes_h264_with_every_frame_and_the_duration(tmp_path):
    path = tmp_path / "v.mp4"
    with H264Writer(path, 25.0) as w:
        for i in range(30):
            w.write(np.full((96, 128, 3), 8 * i, np.uint8))
    codec, width, height, n, duration, means = _read(path)
    assert (codec, width, height, n) == ("h264", 128, 96, 30)
    assert duration == pytest.approx(30 / 25, abs=1e-6)
    assert [round(m / 8) for m in means] == list(range(30))  # in order, levels kept (BT.601 limited range)
    assert w.frames == 30 and w.size == (128, 96)
    assert not list(tmp_path.glob("*.part*"))


def test_the_index_is_before_the_media_so_a_browser_plays_before_the_end(tmp_path):
    path = tmp_path / "v.mp4"
    with H264Writer(path, 25.0) as w:
        for i in range(10):
            w.write(np.full((64, 64, 3), 20 * i, np.uint8))
    data = path.read_bytes()
    assert 0 < data.find(b"moov") < data.find(b"mdat")


def test_missing_frames_repeat_the_last_so_the_recording_keeps_media_time(tmp_path):
    """A paced replay that falls behind drops frames: each is filled by the frame before it."""
    path = tmp_path / "v.mp4"
    with H264Writer(path, 25.0) as w:
        for seq in (0, 1, 5, 6, 9):
            w.write(np.full((48, 64, 3), 10 * seq, np.uint8), seq)
    assert w.frames == 10
    _, _, _, n, duration, means = _read(path)
    assert n == 10 and duration == pytest.approx(0.4, abs=1e-6)
    assert [round(m / 10) for m in means] == [0, 1, 1, 1, 1, 5, 6, 6, 6, 9]


@pytest.mark.parametrize("w, h, stored", [(1, 1, (2, 2)), (721, 479, (722, 480)), (64, 33, (64, 34))])
def test_odd_sizes_are_padded_keeping_every_pixel(tmp_path, w, h, stored):
    path = tmp_path / "odd.mp4"
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : max(1, w // 2)] = 200
    with H264Writer(path, 30.0) as wr:
        for _ in range(3):
            wr.write(img)
    with av.open(str(path)) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="bgr24")
    assert (frame.shape[1], frame.shape[0]) == stored
    assert np.abs(frame[:h, :w].astype(int) - img).mean() < 6  # the source's pixels, up to compression
    assert np.abs(frame[-1, -1].astype(int) - img[-1, -1]).max() < 30  # the padding repeats the edge


def test_frames_are_scaled_to_the_height_asked_for(tmp_path):
    assert video_size(1920, 1080, 720) == (1280, 720)
    assert video_size(854, 480, 720) == (854, 480)
    assert video_size(3840, 2160, None) == (3840, 2160)
    assert video_size(721, 479, 240) == (362, 240)
    path = tmp_path / "v.mp4"
    with H264Writer(path, 25.0, max_height=120) as w:
        for _ in range(4):
            w.write(np.full((360, 640, 3), 90, np.uint8))
    assert _read(path)[1:4] == (214, 120, 4) and w.size == (214, 120)


def test_a_frame_rate_like_ntsc_keeps_its_exact_rate(tmp_path):
    path = tmp_path / "v.mp4"
    with H264Writer(path, 30000 / 1001) as w:
        for _ in range(30):
            w.write(np.zeros((32, 32, 3), np.uint8))
    with av.open(str(path)) as c:
        assert c.streams.video[0].average_rate == Fraction(30000, 1001)


def test_a_failure_leaves_no_file(tmp_path):
    path = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError, match="the caller failed"):
        with H264Writer(path, 25.0) as w:
            for i in range(5):
                w.write(np.full((32, 32, 3), i, np.uint8))
            raise RuntimeError("the caller failed")
    assert list(tmp_path.iterdir()) == []


def test_an_encoder_failure_is_one_error_and_leaves_no_file(tmp_path):
    path = tmp_path / "v.mp4"
    w = H264Writer(path, 25.0)

    def disk_full(img):
        raise OSError(28, "No space left on device")

    w._picture = disk_full
    w.start().write(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(OrAgentError, match=r"v\.mp4: the video encoder failed: OSError: \[Errno 28\] No space left on device$"):
        w.close(commit=True)
    assert list(tmp_path.iterdir()) == []


def test_nothing_written_means_no_file(tmp_path):
    H264Writer(tmp_path / "v.mp4", 25.0).start().close(commit=True)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match=r"^" + str(tmp_path / "no" / "v.mp4") + ": cannot write a video there: "):
        H264Writer(tmp_path / "no" / "v.mp4", 25.0).start()
    with pytest.raises(InputError, match=r"frame rate must be positive, got 0"):
        H264Writer(tmp_path / "v.mp4", 0)
    with pytest.raises(InputError, match=r"^video height 8 is below the minimum 16$"):
        H264Writer(tmp_path / "v.mp4", 25.0, max_height=8)
    w = H264Writer(tmp_path / "v.mp4", 25.0).start()
    with pytest.raises(ValueError, match="expected a BGR uint8 frame"):
        w.write(np.zeros((8, 8), np.uint8))
    w.close(commit=False)
    assert list(tmp_path.iterdir()) == []


def test_colours_survive_the_plane_copy_where_rows_are_padded(tmp_path):
    # 854 px rows are padded to 864 bytes in FFmpeg's luma plane (427 to 432 in chroma): each plane's
    # rows must land where its line size says, or colours and edges smear across the picture
    path = tmp_path / "colour.mp4"
    img = np.zeros((480, 854, 3), np.uint8)
    img[:, :300] = (40, 40, 220)  # red (BGR)
    img[:, 300:600] = (60, 200, 60)  # green
    img[:, 600:] = (220, 80, 30)  # blue
    img[:240, :] //= 2  # a darker top half: the rows must not shift either
    with H264Writer(path, 25.0) as w:
        for _ in range(3):
            w.write(img)
    with av.open(str(path)) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="bgr24")
    for y, x in ((120, 150), (360, 150), (120, 450), (360, 450), (120, 720), (360, 840)):
        assert np.abs(frame[y, x].astype(int) - img[y, x]).max() < 12, (y, x, frame[y, x], img[y, x])
