"""The real Cholec80/CholecT50 clips in ../shared/data/real decode and the models run on them.

The footage is not redistributed with the project: these tests skip where it is absent."""

import cv2
import pytest

from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
from or_agent.pipelines.manifest import find_model
from or_agent.pipelines.preprocess import ContentAreaTracker, detect_content_area
from or_agent.pipelines.stages import SegmentationStage, VisibilityStage
from tests.conftest import ROOT

pytestmark = pytest.mark.real_data


def clips(real):
    found = sorted(real.glob("cholect50-clips/*.mp4")) + sorted(real.glob("cholec80-video01-clip/*.mp4"))
    if not found:
        pytest.skip(f"no real clips under {real}")
    return found


def test_real_clips_decode_completely(real_data):
    for path in clips(real_data):
        cap = cv2.VideoCapture(str(path))
        assert cap.isOpened(), path
        declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        n = 0
        while cap.grab():
            n += 1
        cap.release()
        assert n == declared and n in (250, 800), path.name


def test_content_area_found_on_real_frames(real_data):
    for path in clips(real_data):
        cap = cv2.VideoCapture(str(path))
        _ok, frame = cap.read()
        cap.release()
        area = detect_content_area(frame)
        h, w = frame.shape[:2]
        assert area is not None
        # Real scopes: a circle 0.5-1.0 of the frame wide (clipped top and bottom), centred within 10 %.
        assert 0.25 * w < area.radius < 0.5 * w, (path.name, area)
        assert abs(area.cx - w / 2) < 0.1 * w and abs(area.cy - h / 2) < 0.15 * h


def test_anatomy_and_visibility_run_on_real_clips(real_data):
    anatomy = SegmentationStage(OnnxRuntimeBackend(find_model("segmentation", ROOT / "models" / "synthetic")))
    vis = VisibilityStage(OnnxRuntimeBackend(find_model("visibility", ROOT / "models" / "synthetic")))
    for path in clips(real_data):
        cap = cv2.VideoCapture(str(path))
        tracker = ContentAreaTracker()
        in_body = 0
        for i in range(0, 200, 40):
            cap.set(cv2.CAP_PROP_POS_FRAMES, i)
            ok, frame = cap.read()
            assert ok
            area = tracker.update(frame)
            est = anatomy(frame, area)
            assert est.class_map.shape == (256, 448) and est.class_map.max() < 13
            assert abs(sum(est.area_fraction) - 1.0) < 1e-6
            in_body += not vis(frame, area).out_of_body
        cap.release()
        assert in_body >= 1, f"{path.name}: every sampled real in-body frame called out of body"


def test_real_frames_and_labels(real_data):
    frames = sorted(real_data.glob("cholec80-video01-frames/*.png"))
    if not frames:
        pytest.skip("no real frames")
    img = cv2.imread(str(frames[0]))
    assert img.shape == (360, 640, 3)
    area = detect_content_area(img)
    assert area is not None and area.x1 - area.x0 > 300
