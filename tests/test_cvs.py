"""The Critical View of Safety from a class map: measurements on maps with known structures, and the
per-criterion logistic regression on data with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from or_agent.pipelines.cvs import CRITERIA, FEATURES, CvsAssessor, cvs_measurements, fit_assessor

CLASSES = ("Background", "Cystic Plate", "Hepatocystic Triangle", "Cystic Artery", "Cystic Duct", "Gallbladder", "Tool")


def _map() -> np.ndarray:
    m = np.zeros((100, 200), np.uint8)
    m[10:60, 120:190] = CLASSES.index("Gallbladder")
    m[40:45, 20:100] = CLASSES.index("Cystic Duct")  # 5 px tall bar
    m[60:63, 20:100] = CLASSES.index("Cystic Artery")  # 15 px below the duct
    m[70:72, 5:9] = CLASSES.index("Cystic Artery")  # a second piece of 8 cells: below MIN_PIECE
    m[80:95, 150:190] = CLASSES.index("Cystic Plate")
    return m


def test_measurements_of_known_structures():
    ms = cvs_measurements(_map(), CLASSES)
    assert set(ms) == set(FEATURES)
    assert ms["area_gallbladder"] == pytest.approx(50 * 70 / 20000)
    assert ms["seen_cystic_duct"] == 1.0 and ms["pieces_cystic_duct"] == 1.0
    assert ms["pieces_cystic_artery"] == 1.0  # the 8-cell speck (0.04 % of the map) is noise
    assert ms["seen_hepatocystic_triangle"] == 0.0 and ms["area_hepatocystic_triangle"] == 0.0
    # 16 px apart, by the rules engine's fast 3x3 distance transform (within 5 %)
    assert ms["artery_duct_distance"] == pytest.approx(16 / np.hypot(100, 200), rel=0.05)
    assert ms["both_tubular_seen_apart"] == 1.0


def test_pieces_and_areas_are_those_of_the_whole_map():
    """Pieces are labelled inside each structure's bounding box: the same counts as labelling the whole map,
    pieces touching the map's edges, joined only diagonally, or split by another class included."""
    import cv2

    def plain(m, name):
        mask = (m == CLASSES.index(name)).astype(np.uint8)
        _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        return int((stats[1:, cv2.CC_STAT_AREA] / m.size >= 0.0005).sum()), mask.sum() / m.size

    rng = np.random.default_rng(4)
    maps = [(rng.random((90, 160)) * k).astype(np.uint8) for k in (2, 4, 7)]
    edges = np.zeros((60, 80), np.uint8)
    edges[0:3, 0:80] = edges[57:60, 70:80] = edges[30:33, 0:2] = CLASSES.index("Cystic Duct")
    edges[10, 10] = edges[11, 11] = edges[12, 12] = CLASSES.index("Cystic Artery")  # one piece, diagonally
    maps += [edges, _map()]
    for m in maps:
        ms = cvs_measurements(m, CLASSES)
        for name in CLASSES[1:6]:
            key = name.lower().replace(" ", "_")
            pieces, area = plain(m, name)
            assert ms[f"pieces_{key}"] == pieces and ms[f"area_{key}"] == pytest.approx(area, abs=1e-12), name
    assert cvs_measurements(edges, CLASSES)["pieces_cystic_duct"] == 3


def test_a_missing_structure_class_is_named():
    with pytest.raises(ValueError, match="the segmentation model has no class 'Cystic Plate'"):
        cvs_measurements(np.zeros((4, 4), np.uint8), ("Background", "Gallbladder"))


def test_the_fit_recovers_a_rule_and_round_trips_through_its_manifest_block():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (400, len(FEATURES)))
    seen = FEATURES.index("both_tubular_seen_apart")
    plate = FEATURES.index("area_cystic_plate")
    x[:, seen] = rng.integers(0, 2, 400)
    y = np.stack([x[:, seen] > 0.5, x[:, plate] > 0.8, x[:, plate] > 0.8], 1).astype(float)  # few positives for C2/C3
    a = fit_assessor(x, y)
    got = np.array([[a.probabilities(dict(zip(FEATURES, row)))[c] for c in CRITERIA] for row in x]) >= 0.5
    truth = y > 0.5
    for c in range(3):
        balanced = 0.5 * (got[truth[:, c], c].mean() + (~got[~truth[:, c], c]).mean())
        assert balanced > 0.9, (CRITERIA[c], balanced)
    again = CvsAssessor.from_dict(a.as_dict())
    assert again == a


def test_a_malformed_block_is_refused():
    with pytest.raises(ValueError, match="cvs: weights need 3 rows"):
        CvsAssessor(("area_gallbladder",), (0.0,), (1.0,), ((1.0,),), (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="cvs: unknown feature 'colour'"):
        CvsAssessor(("colour",), (0.0,), (1.0,), ((1.0,),) * 3, (0.0,) * 3)


def _result(cvs, oob=False):
    from or_agent.pipelines.messages import FrameResult, SegmentationEstimate, VisibilityEstimate
    from or_agent.pipelines.preprocess import ContentArea

    cmap = _map()
    n = len(CLASSES)
    anatomy = SegmentationEstimate(cmap, ContentArea.whole_frame(200, 100), (1.0 / n,) * n, (0.9,) * n, cvs,
                                   "anatomy-endoscapes", CLASSES)
    return FrameResult.of([VisibilityEstimate(0.9 if oob else 0.1, 0.1), anatomy], seq=3, media_ms=120.0, frame_size=(200, 100),
                          marks_ns={"capture": 0, "preprocess": 0, "inference": 0, "postprocess": 0},
                          polygons={"anatomy-endoscapes": {5: [np.array([[0, 0], [9, 0], [9, 9]])]}})


def test_the_cvs_goes_on_the_wire_with_the_model_and_set_and_the_display_draws_it():
    from or_agent.agent.display import draw_classifications
    from or_agent.agent.wire import overlay_to_pb

    cvs = (("cvs_two_structures", 0.8), ("cvs_hepatocystic_triangle", 0.2), ("cvs_cystic_plate", 0.5))
    msg = overlay_to_pb(_result(cvs), [], [], True, model_set="endoscapes")
    assert msg.model_set == "endoscapes" and [r.model for r in msg.anatomy] == ["anatomy-endoscapes"]
    (c,) = msg.classifications
    assert (c.model, c.name) == ("anatomy-endoscapes", "critical_view_of_safety")
    assert [(lab.label, round(lab.probability, 3)) for lab in c.labels] == [(k, v) for k, v in cvs]
    img = np.zeros((480, 854, 3), np.uint8)
    draw_classifications(img, msg)
    assert img[440:, :400].any() and not img[:300].any()  # one line, bottom left
    # out of body nothing is classified, as nothing is drawn
    assert not overlay_to_pb(_result(cvs, oob=True), [], [], True).classifications
    assert not overlay_to_pb(_result(()), [], [], True).classifications
