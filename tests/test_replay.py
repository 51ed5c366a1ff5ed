"""``or-agent replay`` end to end: outputs, figures against ground truth, and bad input."""

import csv
import json
import shutil
import sys

import cv2
import numpy as np
import pytest

from or_agent.pipelines.video_out import h264_encoder
from tests.conftest import run_cli


def _file(path, data):
    path.write_bytes(data)
    return path


def _write_video(path, w, h, n=10, fps=25, grey=False):
    # OpenCV's own MJPEG writer keeps odd sizes exactly (FFmpeg's would round them down).
    # (it cannot write grey frames, so those go through FFmpeg at an even size).
    if grey:
        wr = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h), False)
    else:
        wr = cv2.VideoWriter(str(path), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h), True)
    for i in range(n):
        img = np.full((h, w) if grey else (h, w, 3), (i * 20) % 255, np.uint8)
        wr.write(img)
    wr.release()
    return path


def test_replay_writes_every_output_with_figures(held_out_video, tmp_path):
    small_dataset = held_out_video
    out = tmp_path / "out"
    proc = run_cli("replay", str(small_dataset / "video01.mp4"), "--out", str(out), check=True)
    d = out / "video01"
    for name in ("annotated.mp4", "timeline.csv", "timeline.json", "phase_ribbon.png", "report.html", "summary.json"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    assert not list(out.rglob("*.part*"))
    s = json.loads((d / "summary.json").read_text())
    meta = json.loads((small_dataset / "video01.json").read_text())
    assert s["frames"] == meta["frames"] and s["complete"]
    ph = s["phase_metrics"]  # labels found next to the video (video01-phase.txt)
    assert ph["strict"]["accuracy"] > 0.9 and ph["official"]["accuracy"] >= ph["strict"]["accuracy"]
    assert list(ph) == ["labels", "strict", "official"] and ph["official"]["window_s"] == 10.0
    # phases the video does not have are undefined in the official figures (null), never 0
    absent = [n for n, m in ph["official"]["per_phase"].items() if m["frames"] == 0]
    assert all(ph["official"]["per_phase"][n]["jaccard"] is None for n in absent)
    assert set(ph["strict"]["per_phase"]["CalotTriangleDissection"]) == {"precision", "recall", "f1", "jaccard", "frames"}
    an = s["anatomy_metrics"]  # masks found in masks/video01/
    assert an["frames"] == len(list((small_dataset / "masks" / "video01").glob("*.png")))
    assert an["miou"] > 0.75 and 0 <= an["per_class"]["Liver"]["dice"] <= 1
    cap = cv2.VideoCapture(str(d / "annotated.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == meta["frames"]
    cap.release()
    rows = (d / "timeline.csv").read_text().splitlines()
    assert rows[0].startswith("frame,time_s,phase,phase_id,confidence") and rows[0].endswith("true_phase")
    assert len(rows) > meta["frames"] / 5 * 0.8
    # the synthetic set has no familiarity check: the overlay pauses only out of the body, and says so
    table = list(csv.DictReader(rows))
    assert any(r["out_of_body"] == "1" for r in table)
    assert all(r["ai_paused"] == ("camera out of body" if r["out_of_body"] == "1" else "") for r in table)
    assert s["paused_s"] == {"camera out of body": round(s["out_of_body_frames"] / s["fps"], 3), "unfamiliar scene": 0.0}
    assert "phase accuracy" in proc.stdout and "1 of 1 videos replayed" in proc.stdout
    html = (d / "report.html").read_text()
    assert "phase_ribbon.png" in html and "Jaccard (official)" in html and "Mean IoU" in html


def test_opencv_and_ffmpeg_do_not_print_their_own_lines_beside_ours(tmp_path):
    import os
    import subprocess

    bad = tmp_path / "bad.mp4"
    bad.write_text("this is not a video\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}  # as a user's shell has it
    proc = subprocess.run([sys.executable, "-m", "or_agent.agent.cli", "replay", str(bad), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert f"FAILED {bad}: {bad}: not a video OpenCV can decode (it is a text file)" in proc.stdout
    # OpenCV's "[ WARN:0@1.3] global cap.cpp:212 open VIDEOIO(FFMPEG): ..." and FFmpeg's "[mov,mp4,... @ 0x...]"
    assert "WARN" not in proc.stderr and "cap.cpp" not in proc.stderr and " @ 0x" not in proc.stderr, proc.stderr


def test_one_bad_video_is_reported_and_the_rest_continue(small_dataset, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(small_dataset / "video01.mp4", folder / "good.mp4")
    (folder / "bad.mp4").write_text("this is not a video\n")
    proc = run_cli("replay", str(folder), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert f"FAILED {folder / 'bad.mp4'}: {folder / 'bad.mp4'}: not a video OpenCV can decode" in proc.stdout
    assert "ok     " in proc.stdout and "1 of 2 videos replayed, 1 failed" in proc.stdout
    assert (tmp_path / "out" / "good" / "report.html").is_file()
    assert not (tmp_path / "out" / "bad").exists()
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing.mp4", "{p}: no such file or directory"),
    (lambda d: _file(d / "empty.mp4", b""), "{p}: file is empty"),
    (lambda d: _file(d / "notes.mp4", b"hello, this is text\n"), "{p}: not a video OpenCV can decode"),
    (lambda d: _file(d / "noise.mp4", bytes(range(256)) * 64), "{p}: not a video OpenCV can decode"),
])
def test_bad_files_fail_with_one_line(tmp_path, make, expected):
    p = make(tmp_path)
    proc = run_cli("replay", str(p), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert expected.format(p=p) in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_directory_without_videos(tmp_path):
    (tmp_path / "in").mkdir()
    proc = run_cli("replay", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"or-agent: error: {tmp_path / 'in'}: directory has no video files")
    assert "archive run" not in proc.stderr


def test_a_masks_folder_that_is_not_there_is_named(small_dataset, tmp_path):
    proc = run_cli("replay", str(small_dataset / "video01.mp4"), "--out", str(tmp_path / "out"),
                   "--masks", str(tmp_path / "nothere"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"or-agent: error: {tmp_path / 'nothere'}: no such masks folder (--masks: a folder of "
                                   "frameNNNNNN.png masks, or of one such folder per video, named as the video)")
    assert not (tmp_path / "out").exists()


def test_a_folder_of_case_folders_is_pointed_to_archive_run(tmp_path):
    for case in ("case-a", "case-b"):
        (tmp_path / "in" / case).mkdir(parents=True)
        (tmp_path / "in" / case / "video.mp4").write_bytes(b"")
    (tmp_path / "in" / "notes").mkdir()
    proc = run_cli("replay", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"or-agent: error: {tmp_path / 'in'}: directory has no video files (.mp4, .avi, .mkv, .mov, .m4v, .mpg, .mpeg, "
        f".webm); 2 of its subfolders have some: for a folder of per-case folders, or-agent archive run "
        f"{tmp_path / 'in'} --out DIR")


def test_truncated_video_is_replayed_up_to_the_damage_and_flagged(small_dataset, tmp_path):
    data = (small_dataset / "video01.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    proc = run_cli("replay", str(cut), "--out", str(tmp_path / "out"))
    out = proc.stdout
    assert "Traceback" not in out + proc.stderr
    if proc.returncode == 0:  # decodable head: replayed and marked incomplete
        s = json.loads((tmp_path / "out" / "cut" / "summary.json").read_text())
        assert not s["complete"] and any(e["kind"] == "error" for e in s["events"]) and "INCOMPLETE" in out
    else:  # the index was lost with the tail: refused with a named reason
        assert f"FAILED {cut}: {cut}:" in out


@pytest.mark.parametrize("w, h, grey, stored", [(1, 1, False, (2, 2)), (721, 479, False, (722, 480)),
                                                (320, 240, True, (320, 240)), (3840, 2160, False, (1280, 720))])
def test_odd_sizes_are_handled(tmp_path, w, h, grey, stored):
    """H.264 (4:2:0) has even sizes: an odd one is padded by a pixel, every source pixel kept; a source
    taller than --video-height (720 by default) is recorded scaled down."""
    v = _write_video(tmp_path / f"v{w}x{h}.avi", w, h, n=4 if w > 2000 else 12, grey=grey)
    proc = run_cli("replay", str(v), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads((tmp_path / "out" / v.stem / "summary.json").read_text())
    assert s["frames"] == (4 if w > 2000 else 12)
    assert s["annotated_video"] == {"file": "annotated.mp4", "codec": "h264", "encoder": h264_encoder(),
                                    "size": list(stored) if w > 2000 else [w, h], "frames": s["frames"]}
    assert [p.name for p in (tmp_path / "out" / v.stem).glob("annotated.*")] == ["annotated.mp4"]
    cap = cv2.VideoCapture(str(tmp_path / "out" / v.stem / "annotated.mp4"))
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == stored
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == s["frames"]


def test_video_none_writes_no_video_and_every_other_output(small_dataset, tmp_path):
    proc = run_cli("replay", str(small_dataset / "video01.mp4"), "--out", str(tmp_path / "out"), "--video", "none",
                   check=True)
    d = tmp_path / "out" / "video01"
    assert sorted(p.name for p in d.iterdir()) == ["alerts.csv", "phase_ribbon.png", "report.html", "summary.json",
                                                   "timeline.csv", "timeline.json"]
    s = json.loads((d / "summary.json").read_text())
    assert s["annotated_video"] is None and s["replay_options"]["video"] == "none" and s["complete"]
    assert "<video" not in (d / "report.html").read_text() and "1 of 1 videos replayed" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--video-height", "8"], "or-agent: error: --video-height must be at least 16, got 8"),
    (["--video-height", "tall"], "or-agent: error: --video-height must be a number of pixels or 'source', got 'tall'"),
])
def test_bad_video_options_are_one_line_errors(small_dataset, tmp_path, args, message):
    proc = run_cli("replay", str(small_dataset / "video01.mp4"), "--out", str(tmp_path / "out"), *args)
    assert proc.returncode == 2 and proc.stderr.strip() == message
    assert not (tmp_path / "out").exists()


def test_labels_for_many_videos_is_refused(small_dataset, tmp_path):
    proc = run_cli("replay", str(small_dataset / "video01.mp4"), str(small_dataset / "video01.mp4"),
                   "--labels", str(small_dataset / "video01-phase.txt"), "--out", str(tmp_path))
    assert proc.returncode == 2 and "--labels names one phase file" in proc.stderr


@pytest.mark.real_data
def test_replay_runs_on_the_real_clips(real_data, tmp_path):
    clip = real_data / "cholec80-video01-clip" / "video01_0000-0249.mp4"
    if not clip.exists():
        pytest.skip(f"{clip} absent")
    proc = run_cli("replay", str(clip), "--labels", str(clip.with_name("video01_0000-0249-phase.csv")),
                   "--out", str(tmp_path), check=True)
    s = json.loads((tmp_path / clip.stem / "summary.json").read_text())
    assert s["frames"] == 250 and s["complete"] and "phase_metrics" in s
    assert "ok     " in proc.stdout


def test_an_unpaced_replay_runs_opencv_on_one_thread_and_restores_the_setting():
    from or_agent.agent.offline.replay import opencv_single_threaded

    before = cv2.getNumThreads()
    with opencv_single_threaded():
        assert cv2.getNumThreads() == 1
    assert cv2.getNumThreads() == before
    with pytest.raises(RuntimeError, match="inside"), opencv_single_threaded():
        raise RuntimeError("inside")
    assert cv2.getNumThreads() == before


def test_an_unreadable_subfolder_does_not_turn_the_hint_into_a_traceback(tmp_path, monkeypatch):
    from pathlib import Path

    from or_agent.pipelines.errors import InputError
    from or_agent.pipelines.sources import video_files

    (tmp_path / "in" / "case-a").mkdir(parents=True)
    (tmp_path / "in" / "case-a" / "video.mp4").write_bytes(b"")
    (tmp_path / "in" / "locked").mkdir()
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(InputError, match=r"; 1 of its subfolders have some: for a folder of per-case folders"):
        video_files([tmp_path / "in"])


def test_a_bad_rules_file_is_one_error_before_any_video_and_leaves_no_output_folder(small_dataset, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text("[[rules]]\nid = 'x'\nkind = 'no_such_kind'\n")
    proc = run_cli("replay", str(small_dataset / "video01.mp4"), "--out", str(tmp_path / "out" / "run"),
                   "--rules", str(rules))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"or-agent: error: {rules}: rules.x: severity: missing"
    assert "replayed" not in proc.stdout and not (tmp_path / "out").exists()
