import numpy as np
import pytest

from or_agent.pipelines.manifest import find_model
from or_agent.pipelines.messages import FrameResult, PhaseEstimate, SegmentationEstimate, VisibilityEstimate
from or_agent.pipelines.overlay import AlertBanner, OverlayRenderer
from or_agent.pipelines.preprocess import ContentArea
from tests.conftest import ROOT

MARKS = {"capture": 0, "preprocess": 1, "inference": 2, "postprocess": 3}


def _result(oob=False, anatomy=None):
    phase = PhaseEstimate(1, "CalotTriangleDissection", 0.9, (0.05, 0.9, 0.01, 0.01, 0.01, 0.01, 0.01), 1, 75.0)
    return FrameResult(seq=3, media_ms=120.0, frame_size=(320, 240), marks_ns=MARKS,
                       visibility=VisibilityEstimate(0.9 if oob else 0.01, 0.01), phase=phase,
                       segmentations=(anatomy,) if anatomy is not None else ())


def test_anatomy_drawn_in_manifest_colour_where_the_class_is():
    labels = find_model("segmentation", ROOT / "models" / "synthetic").labels
    img = np.full((240, 320, 3), 100, np.uint8)
    cmap = np.zeros((60, 80), np.uint8)
    cmap[:, 40:] = 2  # liver on the right half
    est = SegmentationEstimate(cmap, ContentArea.whole_frame(320, 240), (0.5, 0, 0.5) + (0,) * 10, (1, 0, 1) + (0,) * 10)
    out = OverlayRenderer(labels, alpha=0.5).draw(img, _result(anatomy=est))
    liver_bgr = np.array(labels[2].color[::-1])
    right = out[120:200, 200:300].reshape(-1, 3).mean(0)
    left = out[120:200, 20:120].reshape(-1, 3).mean(0)
    assert np.allclose(right, 0.5 * 100 + 0.5 * liver_bgr, atol=3)
    assert np.allclose(left, 100, atol=1), "background class is not painted"
    assert (out[5:40, :200] != 100).any(), "phase banner drawn at the top"


def test_out_of_body_frame_is_redacted_and_paused():
    img = np.full((240, 320, 3), 200, np.uint8)
    out = OverlayRenderer(find_model("segmentation", ROOT / "models" / "synthetic").labels).draw(img, _result(oob=True))
    assert (out[20:60] == 0).all() and (out[200:220] == 0).all(), "the room is blacked out, not dimmed"
    yellow = (out[..., 2] > 200) & (out[..., 1] > 180) & (out[..., 0] < 60)
    assert yellow.sum() > 200, "AI PAUSED is written in large yellow letters"


def test_no_result_and_stale_results_pause_too():
    r = OverlayRenderer(find_model("segmentation", ROOT / "models" / "synthetic").labels)
    img = np.full((240, 320, 3), 200, np.uint8)
    assert r.draw(img, None).mean() < 150
    assert r.draw(img, _result(), paused_reason="results stale").mean() < 150


def test_alert_banner_in_severity_colour():
    r = OverlayRenderer(find_model("segmentation", ROOT / "models" / "synthetic").labels)
    out = r.draw(np.zeros((240, 320, 3), np.uint8), _result(), alerts=[AlertBanner("critical", "bleeding")])
    assert (np.abs(out[-12].astype(int) - (20, 20, 210)).sum(1) < 10).mean() > 0.5


def test_polygons_are_in_frame_coordinates_and_rasterise_back():
    from or_agent.pipelines.masks import rasterise, segmentation_polygons

    cmap = np.zeros((64, 112), np.uint8)
    cmap[10:40, 20:60] = 2
    cmap[45:60, 70:100] = 8
    area = ContentArea(cx=400, cy=240, radius=300, x0=120, y0=0, x1=680, y1=480)  # crop 560x480
    est = SegmentationEstimate(cmap, area, (0.0,) * 13, (0.0,) * 13)
    polys = segmentation_polygons(est)
    assert set(polys) == {2, 8}
    xs, ys = polys[2][0][:, 0], polys[2][0][:, 1]
    assert xs.min() >= 120 + 20 * 5 - 3 and xs.max() <= 120 + 60 * 5 + 3  # 560/112 = 5 px per model px
    assert ys.min() >= 10 * 7.5 - 4 and ys.max() <= 40 * 7.5 + 4
    back = rasterise(polys, 800, 480)
    truth = np.zeros((480, 800), np.uint8)
    truth[75:300, 220:420] = 2
    inter = ((back == 2) & (truth == 2)).sum()
    assert inter / ((back == 2) | (truth == 2)).sum() > 0.95


def test_the_agents_own_alert_banners_stay_on_the_picture_most_severe_at_the_bottom():
    from or_agent.pipelines.overlay import SEVERITY_COLOURS, alert_rows_fit, draw_alert_banners

    img = np.zeros((480, 854, 3), np.uint8)
    alerts = [AlertBanner("info", f"note {k} " + "x" * 200) for k in range(11)] + [AlertBanner("critical", "hook near duct")]
    draw_alert_banners(img, alerts)
    fit = alert_rows_fit(480)
    banded = [y for y in range(480) if (img[y, 850] != 0).any()]  # the banners' right edge, row by row
    assert banded and min(banded) >= 480 * (1 - 0.4) - 1, "the banners take at most 40 % of the height"
    assert tuple(int(v) for v in img[470, 850]) == SEVERITY_COLOURS["critical"], "the critical alert is the bottom row"
    assert fit < len(alerts)  # so the rest were summed up, not drawn off the top


def test_a_region_below_the_models_draw_confidence_is_neither_drawn_nor_outlined_nor_sent():
    """The endoscapes set draws a class only where its mean probability is at least 0.75: on val that
    keeps 88 % of the regions that are mostly right and drops 73 % of those mostly wrong."""
    import json

    from or_agent.agent.wire import overlay_to_pb
    from or_agent.pipelines.masks import segmentation_polygons

    labels = find_model("segmentation", ROOT / "models" / "synthetic").labels
    img = np.full((240, 320, 3), 100, np.uint8)
    cmap = np.zeros((60, 80), np.uint8)
    cmap[:, 40:] = 2  # liver on the right half, sure
    cmap[:, :20] = 3  # another class on the left quarter, unsure
    conf = (1, 0, 0.9, 0.6) + (0,) * 9
    est = SegmentationEstimate(cmap, ContentArea.whole_frame(320, 240), (0.25, 0, 0.5, 0.25) + (0,) * 9, conf,
                               model="anatomy", names=tuple(lab.name for lab in labels), draw_min_confidence=0.75)
    assert [c for c in range(4) if est.drawn(c)] == [2]
    out = OverlayRenderer(labels, alpha=0.5).draw(img, _result(anatomy=est))
    assert np.allclose(out[120:200, 10:60].reshape(-1, 3).mean(0), 100, atol=1), "the unsure class is not painted"
    assert not np.allclose(out[120:200, 200:300].reshape(-1, 3).mean(0), 100, atol=1), "the sure one is"
    polys = segmentation_polygons(est)
    assert set(polys) == {2}
    r = _result(anatomy=est)
    r = FrameResult(**{**r.__dict__, "polygons": {"anatomy": polys}})
    msg = overlay_to_pb(r, [], [], True)
    assert [a.class_id for a in msg.anatomy] == [2]
    # the gate is the model's own, from its manifest, and checked there
    manifest = json.loads((ROOT / "models" / "endoscapes" / "anatomy" / "manifest.json").read_text())
    assert manifest["draw_min_confidence"] == 0.75
    from types import SimpleNamespace

    from or_agent.pipelines.errors import ModelError
    from or_agent.pipelines.stages import draw_min_confidence

    for bad in (1.5, "high", True):
        with pytest.raises(ModelError, match=rf"m.json: draw_min_confidence must be a number in \[0, 1\), got {bad!r}"):
            draw_min_confidence(SimpleNamespace(extra={"draw_min_confidence": bad}, path="m.json"))
    with pytest.raises(ValueError, match=r"draw_min_confidence must be in \[0, 1\), got 1.5"):
        SegmentationEstimate(cmap, est.area, est.area_fraction, conf, draw_min_confidence=1.5)


@pytest.mark.parametrize("size, area", [((320, 240), None), ((640, 360), (100, 20, 500, 340)), ((333, 211), (7, 5, 330, 200))])
def test_regions_are_blended_and_outlined_exactly_as_the_rules_say(size, area):
    """The renderer scales colour and masks up packed into one plane; the result must be, pixel for pixel,
    the rules written out plainly: a drawn class's pixels blended with its colour, its boundary pixels (3x3
    morphological gradient at the map's size, scaled up by nearest neighbour) in its colour, the rest as
    they were."""
    import cv2

    labels = find_model("segmentation", ROOT / "models" / "synthetic").labels
    rng = np.random.default_rng(7)
    w, h = size
    img = rng.integers(0, 256, (h, w, 3), np.uint8)
    cmap = cv2.resize(rng.integers(0, 13, (9, 14)).astype(np.uint8), (112, 64), interpolation=cv2.INTER_NEAREST)
    confidence = tuple(0.3 if c == 5 else 0.9 for c in range(13))  # class 5 below the draw threshold
    crop = ContentArea.whole_frame(w, h) if area is None else ContentArea(w / 2, h / 2, w, *area)
    est = SegmentationEstimate(cmap, crop, (1 / 13,) * 13, confidence, draw_min_confidence=0.5)
    result = FrameResult(seq=1, media_ms=40.0, frame_size=(w, h), marks_ns=MARKS,
                         visibility=VisibilityEstimate(0.01, 0.01), phase=None, segmentations=(est,))
    out = OverlayRenderer(labels, alpha=0.4, min_label_fraction=2.0).draw(img, result)  # no labels written

    x0, y0, x1, y1 = crop.x0, crop.y0, crop.x1, crop.y1
    lut = np.zeros((256, 3), np.uint8)
    for lab in labels:
        lut[lab.id] = lab.color[::-1]
    drawn = np.array([c != 0 and c != 5 for c in range(256)])
    edge_small = (cv2.morphologyEx(cmap, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0) & drawn[cmap]
    big = cv2.resize(cmap, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)
    edge = cv2.resize(edge_small.astype(np.uint8), (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST) > 0
    roi = img[y0:y1, x0:x1]
    colour = lut[big]
    expected = img.copy()
    blended = cv2.addWeighted(roi, 0.6, colour, 0.4, 0.0)
    expected[y0:y1, x0:x1] = np.where(drawn[big][..., None], blended, roi)
    expected[y0:y1, x0:x1][edge] = colour[edge]
    assert np.array_equal(out, expected)
