"""The synthetic surgery generator: deterministic, and its ground truth matches its pixels."""

import csv
import json

import cv2
import numpy as np
import pytest

from or_agent.pipelines.errors import InputError
from or_agent.pipelines.preprocess import detect_content_area
from or_agent.pipelines.surgery import PHASE_DURATIONS, PHASE_ID, PHASE_TRANSITIONS, PHASES, TOOLS, Anatomy
from or_agent.synth.dataset import SynthConfig, read_phase_file
from or_agent.synth.render import SurgeryRenderer
from or_agent.synth.timeline import sample_duration_s, sample_phase_order, sample_timeline


def test_phase_orders_follow_real_transitions_only():
    rng = np.random.default_rng(0)
    seen_start = set()
    for _ in range(300):
        order = sample_phase_order(rng)
        seen_start.add(order[0])
        assert order[-1] == "GallbladderRetraction"
        for a, b in zip(order, order[1:]):
            assert (a, b) in PHASE_TRANSITIONS, f"{a} -> {b} never happens in Cholec80"
    assert seen_start == {"Preparation", "CalotTriangleDissection"}


def test_durations_follow_real_median_and_p90():
    rng = np.random.default_rng(1)
    for phase, stats in PHASE_DURATIONS.items():
        d = np.array([sample_duration_s(phase, rng) for _ in range(4000)])
        assert abs(np.median(d) / stats.median_s - 1) < 0.08, phase
        assert abs(np.percentile(d, 90) / stats.p90_s - 1) < 0.12, phase
        assert d.max() <= stats.max_s


def test_time_scale_divides_durations():
    a = sample_timeline(np.random.default_rng(3), time_scale=10)
    b = sample_timeline(np.random.default_rng(3), time_scale=20)
    assert [s.phase for s in a.segments] == [s.phase for s in b.segments]
    assert abs(a.frames / b.frames - 2) < 0.1


def test_rendering_is_deterministic_for_a_seed():
    tl = sample_timeline(np.random.default_rng(11), time_scale=80)
    frames = [0, tl.frames // 3, tl.frames - 1]
    r1, r2 = SurgeryRenderer(tl, seed=4), SurgeryRenderer(tl, seed=4)
    for f in frames:
        a, b = r1.render(f), r2.render(f)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    other = SurgeryRenderer(tl, seed=5).render(frames[1])
    assert not np.array_equal(other.image, r1.render(frames[1]).image)


def test_labels_match_rendered_pixels():
    tl = sample_timeline(np.random.default_rng(2), time_scale=60)
    r = SurgeryRenderer(tl, seed=9)
    yy, xx = np.mgrid[0:r.height, 0:r.width]
    outside = np.hypot(xx - r.fov.cx, yy - r.fov.cy) > r.fov.radius + 1
    checked_tools = 0
    for f in range(0, tl.frames, 37):
        fr = r.render(f)
        # Outside the endoscope's circle: black pixels and the background class, nothing else.
        assert (fr.labels[outside] == Anatomy.BACKGROUND).all()
        assert fr.image[outside].max() == 0
        if fr.out_of_body:
            assert (fr.labels == Anatomy.BACKGROUND).all(), "the room scene must carry no tissue label"
            continue
        inside = ~outside & (np.hypot(xx - r.fov.cx, yy - r.fov.cy) < r.fov.radius - 2)
        assert (fr.labels[inside] != Anatomy.BACKGROUND).all()
        # Instrument pixels look like instruments: no tissue-red hue dominates them.
        tool = (fr.labels == Anatomy.GRASPER) | (fr.labels == Anatomy.L_HOOK)
        if tool.sum() > 500 and not (fr.smoke or fr.blur):
            core = cv2.erode(tool.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            px = fr.image[core].astype(int)
            redness = px[:, 2] - (px[:, 0] + px[:, 1]) / 2
            assert np.median(redness) < 25
            checked_tools += 1
        # The phase and the instruments follow the timeline.
        phase, _ = tl.phase_at(f)
        assert fr.phase == phase
    assert checked_tools > 3


def test_phase_cues_are_in_the_frames():
    """Scene content depends on phase: the hook in dissection, the gallbladder gone after packaging."""
    rng = np.random.default_rng(21)
    tl = sample_timeline(rng, time_scale=40)
    r = SurgeryRenderer(tl, seed=21)
    for seg in tl.segments:
        mid = (seg.start + seg.end) // 2
        if tl.active("out_of_body", mid):
            continue
        fr = r.render(mid)
        name = PHASES[seg.phase]
        if name in ("CalotTriangleDissection", "GallbladderDissection"):
            assert fr.tools[TOOLS.index("Hook")] and (fr.labels == Anatomy.L_HOOK).any()
        if name == "ClippingCutting":
            assert fr.tools[TOOLS.index("Clipper")] or fr.tools[TOOLS.index("Scissors")]
        if name == "CleaningCoagulation":
            assert fr.tools[TOOLS.index("Irrigator")]
            assert not (fr.labels == Anatomy.GALLBLADDER).any()
        if name == "GallbladderRetraction":
            assert fr.tools[TOOLS.index("SpecimenBag")]
            assert not (fr.labels == Anatomy.GALLBLADDER).any()


def test_dataset_files_are_consistent(small_dataset):
    meta = json.loads((small_dataset / "video01.json").read_text())
    n = meta["frames"]
    phases = read_phase_file(small_dataset / "video01-phase.txt")
    assert len(phases) == n
    for seg in meta["segments"]:
        assert (phases[seg["start"]:seg["end"]] == PHASE_ID[seg["phase"]]).all()
    cap = cv2.VideoCapture(str(small_dataset / "video01.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == n
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (854, 480)
    ok, first = cap.read()
    cap.release()
    assert ok
    with open(small_dataset / "video01-flags.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n and list(rows[0]) == ["frame", "phase", "out_of_body", "smoke", "blur", "bleeding"]
    masks = sorted((small_dataset / "masks" / "video01").glob("*.png"))
    assert len(masks) == (n + 9) // 10
    for path in masks[::5]:
        f = int(path.stem[5:])
        m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert m.shape == (480, 854) and m.dtype == np.uint8 and m.max() <= 12
        if rows[f]["out_of_body"] == "1":
            assert m.max() == 0
        assert int(rows[f]["phase"]) == phases[f]
    tools = (small_dataset / "video01-tool.txt").read_text().splitlines()
    assert tools[0].split("\t") == ["Frame", *TOOLS] and len(tools) == 1 + (n + 24) // 25
    assert not list(small_dataset.rglob("*.part*")), "no temporary file may survive"
    # The endoscope circle found in the decoded video is the one the generator drew.
    area = detect_content_area(first)
    fov = meta["field_of_view"]
    assert abs(area.cx - fov["cx"]) < 6 and abs(area.cy - fov["cy"]) < 10 and abs(area.radius - fov["radius"]) < 8


def test_flags_follow_events(small_dataset):
    meta = json.loads((small_dataset / "video01.json").read_text())
    with open(small_dataset / "video01-flags.csv") as fh:
        rows = list(csv.DictReader(fh))
    oob = np.array([r["out_of_body"] == "1" for r in rows])
    expected = np.zeros(len(rows), bool)
    for e in meta["events"]:
        if e["kind"] == "out_of_body":
            expected[e["start"]:e["end"]] = True
    assert np.array_equal(oob, expected) and oob.any()


@pytest.mark.parametrize("kwargs, message", [
    ({"videos": 0}, "--videos must be at least 1"),
    ({"mask_every": 0}, "--mask-every must be at least 1"),
    ({"width": 10}, "frame size 10x480 outside"),
    ({"time_scale": -1}, "must be positive"),
])
def test_bad_generator_settings_are_named(kwargs, message):
    with pytest.raises(InputError, match=message):
        SynthConfig(**kwargs)


def test_phase_file_reader_names_bad_lines(tmp_path):
    p = tmp_path / "x-phase.txt"
    p.write_text("Frame\tPhase\n0\tPreparation\n1\tLunch\n")
    with pytest.raises(InputError, match=r"x-phase.txt:3: expected"):
        read_phase_file(p)
    p.write_text("hello\n")
    with pytest.raises(InputError, match="not a phase label file"):
        read_phase_file(p)
