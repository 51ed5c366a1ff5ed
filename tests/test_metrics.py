import numpy as np
import pytest

from or_agent.pipelines.metrics import confusion, mean_iou_present, per_class_dice, per_class_iou, phase_scores, recall, relax_boundaries


def test_iou_and_dice_on_known_masks():
    t = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    p = np.array([[0, 1, 1, 1], [0, 0, 1, 2]])
    conf = confusion(t, p, 3)
    iou = per_class_iou(conf)
    assert iou[0] == pytest.approx(3 / 4) and iou[1] == pytest.approx(3 / 5) and iou[2] == 0.0
    assert per_class_dice(conf)[1] == pytest.approx(2 * 3 / (4 + 4))
    assert mean_iou_present(conf) == pytest.approx((3 / 4 + 3 / 5) / 2)  # class 2 is absent from the truth


def test_phase_scores_per_phase():
    names = ("A", "B", "C")
    t = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    p = np.array([0, 0, 1, 1, 1, 1, 2, 0])
    s = phase_scores(t, p, names)
    assert s["accuracy"] == pytest.approx(6 / 8)
    assert s["per_phase"]["B"] == {"precision": 0.75, "recall": 1.0, "f1": pytest.approx(0.8571, abs=1e-4),
                                   "jaccard": 0.75, "frames": 3}


def test_relaxed_boundary_forgives_only_neighbouring_phases_near_a_change():
    t = np.array([0] * 10 + [1] * 10)
    p = t.copy()
    p[8:10] = 1  # early switch, within the window: forgiven
    p[12] = 2  # a third phase near the boundary: not forgiven
    p[19] = 0  # far from the boundary (window 3): not forgiven
    r = relax_boundaries(t, p, window=3)
    assert list(r[8:10]) == [0, 0] and r[12] == 2 and r[19] == 0


def test_recall():
    assert recall([1, 1, 0, 1], [1, 0, 0, 1]) == pytest.approx(2 / 3)


def test_phase_scores_count_no_prediction_as_wrong():
    s = phase_scores(np.array([0, 0, 1, 1]), np.array([-1, 0, 1, 1]), ("A", "B"))
    assert s["accuracy"] == 0.75 and s["per_phase"]["A"]["recall"] == 0.5 and s["per_phase"]["A"]["precision"] == 1.0


def test_balanced_accuracy_and_average_precision_on_known_cases():
    from or_agent.pipelines.metrics import average_precision, balanced_accuracy

    truth = np.array([1, 1, 0, 0, 0, 0], bool)
    assert balanced_accuracy(truth, np.array([1, 0, 0, 0, 0, 0], bool)) == 0.75
    assert balanced_accuracy(truth, np.zeros(6, bool)) == 0.5  # the majority baseline
    assert np.isnan(balanced_accuracy(np.zeros(6, bool), np.zeros(6, bool)))
    assert average_precision(truth, np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.4])) == 1.0
    # positives ranked 1st and 3rd: precisions 1 and 2/3
    assert average_precision(truth, np.array([0.9, 0.5, 0.6, 0.2, 0.1, 0.0])) == pytest.approx((1 + 2 / 3) / 2)
