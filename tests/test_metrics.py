import numpy as np
import pytest

from or_agent.pipelines.metrics import (
    confusion,
    figure,
    mean_iou_present,
    mean_over_videos,
    official_phase_scores,
    per_class_dice,
    per_class_iou,
    phase_scores,
    recall,
    rounded_figures,
)
from or_agent.pipelines.surgery import PHASES


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


def test_recall():
    assert recall([1, 1, 0, 1], [1, 0, 0, 1]) == pytest.approx(2 / 3)


def test_phase_scores_count_no_prediction_as_wrong():
    s = phase_scores(np.array([0, 0, 1, 1]), np.array([-1, 0, 1, 1]), ("A", "B"))
    assert s["accuracy"] == 0.75 and s["per_phase"]["A"]["recall"] == 0.5 and s["per_phase"]["A"]["precision"] == 1.0


def test_strict_scores_leave_undefined_figures_undefined():
    # B is never predicted (precision undefined), C is predicted but absent from the truth (recall undefined)
    s = phase_scores(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 2]), ("A", "B", "C"))
    assert s["per_phase"]["B"] == {"precision": None, "recall": 0.0, "f1": None, "jaccard": 0.0, "frames": 2}
    assert s["per_phase"]["C"] == {"precision": 0.0, "recall": None, "f1": None, "jaccard": 0.0, "frames": 0}


# Cholec80 phase ids, in its order
PREP, CALOT, CLIP, GB_DISS, PACK, CLEAN, RETRACT = range(7)


def _official(truth, pred, times=None):
    truth, pred = np.array(truth), np.array(pred)
    return official_phase_scores(truth, pred, np.arange(len(truth), dtype=float) if times is None else times, PHASES)


def test_official_forgives_a_late_and_an_early_transition_in_the_first_and_last_10_s():
    # 1 frame per second: Preparation for 20 s (frames 0-19), then Calot triangle dissection (20-39)
    truth = [PREP] * 20 + [CALOT] * 20
    pred = list(truth)
    pred[5] = CALOT  # the next phase, but not in Preparation's last 10 s (10-19): wrong
    pred[15:20] = [CALOT] * 5  # the next phase in Preparation's last 10 s, an early transition: forgiven
    pred[20:23] = [PREP] * 3  # the previous phase in Calot's first 10 s (20-29), a late transition: forgiven
    pred[25] = CLIP  # the next phase, at the start: wrong
    pred[35] = PREP  # the previous phase after the first 10 s: wrong
    pred[38] = CLIP  # the next phase in Calot's last 10 s (30-39): forgiven, though the truth never goes there
    s = _official(truth, pred)
    # wrong: frames 5, 25 and 35; strictly also 15-19, 20-22 and 38
    assert s["accuracy"] == 37 / 40 and phase_scores(np.array(truth), np.array(pred), PHASES)["accuracy"] == 28 / 40
    # Evaluate.m as written forgives by position in the segment's *first* 10 frames the frames whose mirror in
    # its last 10 was +1: frame 5 (mirror of 15) would pass and 15-19 would not. The documented intent is kept.
    # Preparation: 20 true frames; predicted 18 (0-4, 6-14, 20-22, 35); union 24 (0-19, 20-22, 35);
    # right in the union 22 (all of 0-19 but frame 5, and the forgiven 20-22): Jaccard 22/24.
    # Precision 22/18 and recall 22/20 exceed 1 (forgiven frames of the other phase count) and are clipped.
    assert s["per_phase"]["Preparation"] == {"precision": 1.0, "recall": 1.0, "jaccard": 22 / 24, "frames": 20}
    # Calot: 20 true; union 26 (20-39, 5, 15-19); right 23 (18 of 20-39, and the forgiven 15-19)
    assert s["per_phase"]["CalotTriangleDissection"]["jaccard"] == 23 / 26
    # ClippingCutting is predicted (frames 25 and 38) but absent from the truth: undefined, not 0
    assert s["per_phase"]["ClippingCutting"] == {"precision": None, "recall": None, "jaccard": None, "frames": 0}
    assert s["per_phase"]["GallbladderRetraction"] == {"precision": None, "recall": None, "jaccard": None, "frames": 0}
    assert s["window_s"] == 10.0


def test_official_does_not_forgive_the_previous_phase_at_the_end_nor_the_next_at_the_start():
    # Calot 0-14, ClippingCutting 15-29 at 1 fps
    truth = [CALOT] * 15 + [CLIP] * 15
    pred = [CALOT] * 15 + [CLIP] * 10 + [CALOT] * 5
    pred[2] = CLIP  # the next phase before Calot's last 10 s (5-14): wrong
    # frames 25-29: the previous phase in Clipping's last 10 s: wrong (only its first 10 s forgive -1)
    s = _official(truth, pred)
    assert s["accuracy"] == 24 / 30  # nothing forgiven: as strict
    # Calot: 15 true, 19 predicted (14 + 25-29), union 20, right 14
    assert s["per_phase"]["CalotTriangleDissection"] == {"precision": 14 / 19, "recall": 14 / 15, "jaccard": 14 / 20,
                                                         "frames": 15}
    # Clipping: 15 true, 11 predicted (2, 15-24), union 16, right 10
    assert s["per_phase"]["ClippingCutting"] == {"precision": 10 / 11, "recall": 10 / 15, "jaccard": 10 / 16, "frames": 15}


def test_official_extra_forgiveness_of_the_last_phases():
    # 15 s each at 1 fps: gallbladder dissection 0-14, packaging 15-29, cleaning 30-44, retraction 45-59
    truth = [GB_DISS] * 15 + [PACK] * 15 + [CLEAN] * 15 + [RETRACT] * 15
    pred = list(truth)
    pred[12] = CLEAN  # +2 in dissection's last 10 s (5-14): forgiven (4 and 5 may be followed by 6 or 7)
    pred[13] = RETRACT  # +3: wrong
    pred[16] = CLIP  # -2 in packaging's first 10 s (15-24): wrong (4 and 5 forgive only -1 at the start)
    pred[17] = GB_DISS  # -1 there: forgiven
    pred[28] = RETRACT  # +2 in packaging's last 10 s (20-29): forgiven
    pred[31] = GB_DISS  # -2 in cleaning's first 10 s (30-39): forgiven (6 and 7 may come in either order)
    pred[43] = RETRACT  # +1 in cleaning's last 10 s: forgiven
    pred[46] = PACK  # -2 in retraction's first 10 s (45-54): forgiven
    pred[47] = GB_DISS  # -3: wrong
    pred[58] = CLEAN  # -1 in retraction's last 10 s but not its first: wrong
    s = _official(truth, pred)
    assert s["accuracy"] == 56 / 60  # wrong: 13, 16, 47, 58
    # dissection: 15 true; predicted 16 (0-11, 14, 17, 31, 47); union 18; right 16 (all but 13 and 47)
    assert s["per_phase"]["GallbladderDissection"] == {"precision": 1.0, "recall": 1.0, "jaccard": 16 / 18, "frames": 15}
    # the general phases forgive neither +2 at the end nor -2 at the start: Calot 0-9, Clipping 10-19
    truth = [CALOT] * 10 + [CLIP] * 10
    pred = list(truth)
    pred[8] = GB_DISS  # +2 at Calot's end
    pred[11] = PREP  # -2 at Clipping's start
    assert _official(truth, pred)["accuracy"] == 18 / 20


def test_official_on_a_phase_shorter_than_the_window():
    # Clipping lasts 4 s (frames 12-15): all of it is its first and its last 10 s
    truth = [CALOT] * 12 + [CLIP] * 4 + [GB_DISS] * 14
    pred = list(truth)
    pred[12:14] = [CALOT, CALOT]  # late: forgiven
    pred[15] = GB_DISS  # early: forgiven
    s = _official(truth, pred)
    assert s["accuracy"] == 1.0 and phase_scores(np.array(truth), np.array(pred), PHASES)["accuracy"] == 27 / 30
    # Clipping: 4 true, 1 predicted, union 4, all 4 right; precision 4/1 clipped to 1
    assert s["per_phase"]["ClippingCutting"] == {"precision": 1.0, "recall": 1.0, "jaccard": 1.0, "frames": 4}


def test_official_precision_is_undefined_for_a_phase_never_predicted():
    # Preparation 0-9, Calot 10-39, and the model says Preparation throughout
    truth = [PREP] * 10 + [CALOT] * 30
    s = _official(truth, [PREP] * 40)
    # Calot's first 10 s (10-19) are forgiven: right 10 of its 30 frames; never predicted Calot
    assert s["per_phase"]["CalotTriangleDissection"] == {"precision": None, "recall": 10 / 30, "jaccard": 10 / 30,
                                                         "frames": 30}
    # Preparation: union 40, right 20 (its own 10 and Calot's forgiven 10); recall 20/10 clipped
    assert s["per_phase"]["Preparation"] == {"precision": 0.5, "recall": 1.0, "jaccard": 0.5, "frames": 10}
    assert s["accuracy"] == 0.5


def test_official_window_is_in_seconds_of_each_frames_time():
    # key frames at irregular times: Preparation at 0, 4, 6, 12, 16 s, Calot at 20, 27, 30, 45, 60 s
    times = np.array([0, 4, 6, 12, 16, 20, 27, 30, 45, 60], float)
    truth = [PREP] * 5 + [CALOT] * 5
    pred = [PREP, PREP, CALOT, CALOT, CALOT, PREP, PREP, PREP, CALOT, CALOT]
    # Preparation's last 10 s are after 16 - 10 = 6 s: 12 and 16 forgiven, 6 not (exactly 10 s before the end);
    # Calot's first 10 s are before 20 + 10 = 30 s: 20 and 27 forgiven, 30 not
    s = _official(truth, pred, times)
    assert s["accuracy"] == 8 / 10 and phase_scores(np.array(truth), np.array(pred), PHASES)["accuracy"] == 4 / 10
    # at 25 fps the window is 250 frames, as Evaluate.m's 10 * fps: 251 late frames, 250 forgiven
    truth = [PREP] * 300 + [CALOT] * 300
    pred = [PREP] * 551 + [CALOT] * 49
    assert _official(truth, pred, np.arange(600) / 25)["accuracy"] == 599 / 600


def test_official_counts_no_prediction_as_wrong_even_at_a_boundary():
    truth = [PREP] * 10 + [CALOT] * 10
    pred = [-1] * 3 + [PREP] * 7 + [-1] * 2 + [CALOT] * 8
    assert _official(truth, pred)["accuracy"] == 15 / 20


def test_official_refuses_what_it_does_not_define():
    with pytest.raises(ValueError, match="^the official evaluation is defined for the Cholec80 phases; 'A' is not one$"):
        official_phase_scores(np.array([0, 1]), np.array([0, 1]), np.array([0.0, 1.0]), ("A", "B"))
    with pytest.raises(ValueError, match="^the official evaluation needs the samples in time order$"):
        official_phase_scores(np.array([0, 1]), np.array([0, 1]), np.array([1.0, 0.0]), PHASES)


def test_mean_over_videos_as_main_m():
    one = _official([CALOT] * 15 + [CLIP] * 15, [CALOT] * 2 + [CLIP] + [CALOT] * 12 + [CLIP] * 10 + [CALOT] * 5)
    two = _official([PREP] * 10 + [CALOT] * 30, [PREP] * 40)
    m = mean_over_videos([one, two])
    assert m["videos"] == 2 and m["accuracy"] == pytest.approx((24 / 30 + 0.5) / 2)
    # per phase over the videos where it is defined: Preparation only in video two, Clipping only in one (its
    # None in video two is left out, not counted as 0); Calot's precision is undefined in video two
    assert m["per_phase"]["Preparation"] == {"frames": 10, "precision": 0.5, "recall": 1.0, "jaccard": 0.5}
    assert m["per_phase"]["ClippingCutting"] == {"frames": 15, "precision": 10 / 11, "recall": 10 / 15, "jaccard": 10 / 16}
    calot = m["per_phase"]["CalotTriangleDissection"]
    assert calot["precision"] == 14 / 19 and calot["recall"] == pytest.approx((14 / 15 + 1 / 3) / 2)
    assert calot["jaccard"] == pytest.approx((14 / 20 + 1 / 3) / 2)
    assert m["per_phase"]["GallbladderRetraction"] == {"frames": 0, "precision": None, "recall": None, "jaccard": None}
    # then the mean over the phases that have one
    assert m["jaccard"] == pytest.approx((0.5 + (14 / 20 + 1 / 3) / 2 + 10 / 16) / 3)
    assert m["precision"] == pytest.approx((0.5 + 14 / 19 + 10 / 11) / 3)


def test_one_rounding_rule_and_undefined_is_null():
    import json

    assert figure(2 / 3) == 0.6667 and figure(None) is None and figure(float("nan")) is None
    s = rounded_figures(_official([PREP] * 10 + [CALOT] * 30, [PREP] * 40))
    assert s["per_phase"]["CalotTriangleDissection"] == {"precision": None, "recall": 0.3333, "jaccard": 0.3333, "frames": 30}
    assert '"precision": null' in json.dumps(s)


def test_balanced_accuracy_and_average_precision_on_known_cases():
    from or_agent.pipelines.metrics import average_precision, balanced_accuracy

    truth = np.array([1, 1, 0, 0, 0, 0], bool)
    assert balanced_accuracy(truth, np.array([1, 0, 0, 0, 0, 0], bool)) == 0.75
    assert balanced_accuracy(truth, np.zeros(6, bool)) == 0.5  # the majority baseline
    assert np.isnan(balanced_accuracy(np.zeros(6, bool), np.zeros(6, bool)))
    assert average_precision(truth, np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.4])) == 1.0
    # positives ranked 1st and 3rd: precisions 1 and 2/3
    assert average_precision(truth, np.array([0.9, 0.5, 0.6, 0.2, 0.1, 0.0])) == pytest.approx((1 + 2 / 3) / 2)
