"""The causal phase filter: an HMM forward filter that never locks in, needs no forced start, steps by the
media time between steps, and is configured from the phase model's manifest."""

import json
import math
import shutil

import numpy as np
import pytest

from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
from or_agent.pipelines.errors import ManifestError
from or_agent.pipelines.manifest import load_manifest
from or_agent.pipelines.phase_filter import (
    BELIEF_FLOOR,
    UNSEEN_PER_S,
    PhaseFilter,
    PhaseHMM,
    cholec80_transitions,
    phase_filter_from,
)
from or_agent.pipelines.stages import PhaseStage
from or_agent.pipelines.surgery import PHASE_ID, PHASES
from tests.conftest import ROOT

CALOT, CLIPPING, GB_DISSECTION = PHASE_ID["CalotTriangleDissection"], PHASE_ID["ClippingCutting"], PHASE_ID["GallbladderDissection"]
CLEANING, RETRACTION, PREPARATION = PHASE_ID["CleaningCoagulation"], PHASE_ID["GallbladderRetraction"], PHASE_ID["Preparation"]
RATE_HZ = 5.0
DT = 1 / RATE_HZ


def evidence(phase: int, p: float = 0.99) -> np.ndarray:
    """The model's probabilities: ``p`` on ``phase``, the rest spread evenly."""
    v = np.full(7, (1 - p) / 6)
    v[phase] = p
    return v


def real_time_filter() -> PhaseFilter:
    return PhaseFilter(PhaseHMM(cholec80_transitions()))


def test_the_cholec80_matrix_follows_the_median_durations_and_the_transition_counts():
    a = cholec80_transitions()
    assert np.allclose(a.sum(1), 1.0, atol=1e-12) and (a > 0).all()
    # Calot triangle dissection: median 826 s, every video moves on to clipping
    assert a[CALOT, CLIPPING] == pytest.approx(1 - 0.5 ** (1 / 826), rel=1e-12)
    # Retraction (median 63 s) is the last phase of 77 of 80 videos; 3 go back to cleaning
    assert a[RETRACTION, CLEANING] == pytest.approx((1 - 0.5 ** (1 / 63)) * 3 / 80, rel=1e-12)
    # a move never seen in Cholec80 keeps the small unseen probability
    assert a[CLEANING, CALOT] == UNSEEN_PER_S and a[CALOT, PREPARATION] == UNSEEN_PER_S
    assert a[CALOT, CALOT] == pytest.approx(0.5 ** (1 / 826) - 5 * UNSEEN_PER_S, rel=1e-12)


def test_no_lock_in_after_a_short_wrong_phase():
    """0.4 s (2 steps at 5 Hz) of confident CleaningCoagulation, then 10 minutes of 0.99 Calot."""
    f = real_time_filter()
    shown = [f.update(evidence(CLEANING), 0.0 if k == 0 else DT).phase for k in range(2)]
    assert shown == [CLEANING, CLEANING]
    calot = [f.update(evidence(CALOT), DT) for _ in range(int(600 * RATE_HZ))]
    # After the wrong steps every other phase's belief sits at the floor; each Calot step multiplies Calot's
    # belief against Cleaning's by the likelihood ratio 0.99 / (0.01 / 6) = 594 (a 0.2 s step of a per-second
    # matrix moves less than 1e-5 of the mass), so Calot leads on the first step k with floor * 594**k > 1.
    ratio = 0.99 / (0.01 / 6)
    expected = math.ceil(math.log(1 / BELIEF_FLOOR) / math.log(ratio))
    assert expected == 2
    switched = next(k for k, r in enumerate(calot, start=1) if r.phase == CALOT)
    assert switched == expected  # 0.4 s after the evidence turned
    assert all(r.phase == CALOT for r in calot[switched - 1:])
    assert calot[-1].confidence > 0.999 and calot[-1].steps_in_phase == len(calot) - switched


def test_started_mid_case_reaches_the_phase_the_evidence_shows():
    """No forced start: the first step is in the middle of gallbladder dissection, with a weak model."""
    f = real_time_filter()
    rng = np.random.default_rng(3)
    shown = []
    for k in range(50):
        p = evidence(GB_DISSECTION, 0.45) + rng.uniform(0, 0.1, 7)  # noisy, but pointing at dissection
        shown.append(f.update(p / p.sum(), 0.0 if k == 0 else DT).phase)
    assert shown[0] == GB_DISSECTION and set(shown) == {GB_DISSECTION}
    assert PREPARATION not in shown


def test_a_single_odd_frame_does_not_flip_an_established_phase():
    for odd in (CLIPPING, RETRACTION):  # the next phase (a real move) and a phase far ahead (never seen from Calot)
        f = real_time_filter()
        seq = [evidence(CALOT, 0.9)] * int(60 * RATE_HZ) + [evidence(odd, 0.99)] + [evidence(CALOT, 0.9)] * 20
        shown = f.run(seq, np.arange(len(seq)) * DT)
        assert set(shown.tolist()) == {CALOT}, PHASES[odd]


def test_the_normal_forward_course_is_followed_with_a_short_lag():
    # Preparation to retraction, with a backward move Cholec80 has (cleaning back to packaging)
    course = [PREPARATION, CALOT, CLIPPING, GB_DISSECTION, PHASE_ID["GallbladderPackaging"], CLEANING,
              PHASE_ID["GallbladderPackaging"], RETRACTION]
    steps_per_phase = int(40 * RATE_HZ)
    rng = np.random.default_rng(0)
    seq, truth = [], []
    for phase in course:
        for _ in range(steps_per_phase):
            p = evidence(phase, 0.7) + rng.uniform(0, 0.1, 7)
            seq.append(p / p.sum())
            truth.append(phase)
    shown = real_time_filter().run(seq, np.arange(len(seq)) * DT)
    changes = [k for k in range(1, len(shown)) if shown[k] != shown[k - 1]]
    assert [int(shown[0])] + [int(shown[k]) for k in changes] == course
    for k, true_change in zip(changes, range(steps_per_phase, len(seq), steps_per_phase)):
        assert 0 <= k - true_change <= 5, (k, true_change)  # within a second of the change
    assert np.mean(shown == np.array(truth)) > 0.98


def test_the_step_matrix_is_the_per_second_matrix_to_the_power_of_the_seconds():
    a = cholec80_transitions()
    hmm = PhaseHMM(a)
    assert np.array_equal(hmm.step_matrix(0.0), np.eye(7))
    assert np.allclose(hmm.step_matrix(1.0), a, atol=1e-12)
    half = hmm.step_matrix(0.5)
    assert np.allclose(half @ half, a, atol=1e-12)
    assert np.allclose(hmm.step_matrix(30.0), np.linalg.matrix_power(a, 30), atol=1e-10)  # a 30 s gap
    assert np.allclose(hmm.step_matrix(0.2), np.linalg.matrix_power(hmm.step_matrix(0.04), 5), atol=1e-12)
    for dt in (0.2, 0.5, 30.0, 3600.0):
        m = hmm.step_matrix(dt)
        assert (m >= 0).all() and np.allclose(m.sum(1), 1.0, atol=1e-12)
    # time_scale: a second of a 25x compressed video is 25 real seconds
    assert np.allclose(PhaseHMM(a, time_scale=25).step_matrix(1.0), np.linalg.matrix_power(a, 25), atol=1e-10)


def test_dt_zero_applies_only_the_evidence_and_negative_dt_is_refused():
    hmm = PhaseHMM(cholec80_transitions(), floor=0.0)
    first = hmm.update(evidence(CALOT, 0.6), 0.0)
    assert np.allclose(first, evidence(CALOT, 0.6))  # uniform start, no step: the evidence itself
    second = hmm.update(evidence(CALOT, 0.6), 0.0)
    want = evidence(CALOT, 0.6) ** 2
    assert np.allclose(second, want / want.sum())
    with pytest.raises(ValueError, match=r"^a step cannot go back in time: dt_s = -0.1$"):
        hmm.update(evidence(CALOT), -0.1)


def test_a_step_without_evidence_moves_the_belief_by_the_transitions_alone():
    hmm = PhaseHMM(cholec80_transitions())
    for _ in range(20):
        hmm.update(evidence(CALOT), DT)
    before = hmm.belief.copy()
    moved = hmm.update(None, 60.0)  # a minute with no evidence to trust
    expected = np.maximum(before @ hmm.step_matrix(60.0), BELIEF_FLOOR)
    assert moved == pytest.approx(expected / expected.sum(), abs=1e-12)
    assert np.argmax(moved) == CALOT and moved[CLIPPING] > before[CLIPPING]  # only time moves it, a little, forward
    f = real_time_filter()
    f.update(evidence(CALOT), 0.0)
    assert f.update(None, DT).phase == CALOT and f.update(None, DT).steps_in_phase == 2


def test_a_long_gap_lets_the_evidence_move_on_faster():
    """After a 30 s gap the next phase is likelier than after 0.2 s: the same weak evidence moves it sooner."""
    def steps_to_clipping(gap_s):
        f = real_time_filter()
        for k in range(int(120 * RATE_HZ)):
            f.update(evidence(CALOT, 0.9), 0.0 if k == 0 else DT)
        for k in range(1, 50):
            if f.update(evidence(CLIPPING, 0.6), gap_s if k == 1 else DT).phase == CLIPPING:
                return k
        return None

    assert steps_to_clipping(30.0) < steps_to_clipping(DT)


def test_class_prior_and_likelihood_power_shape_the_evidence():
    prior = np.array([0.05, 0.5, 0.1, 0.2, 0.05, 0.05, 0.05])
    p = np.array([0.1, 0.4, 0.1, 0.1, 0.1, 0.1, 0.1])
    got = PhaseHMM(cholec80_transitions(), class_prior=prior, power=0.5, floor=0.0).update(p, 0.0)
    want = (p / prior) ** 0.5
    assert np.allclose(got, want / want.sum())
    assert int(np.argmax(got)) != CALOT  # Calot's 0.4 is below its training frequency: weak evidence for it


def test_the_synthetic_phase_model_runs_its_filter_on_compressed_time():
    stage = PhaseStage(OnnxRuntimeBackend(load_manifest(ROOT / "models" / "synthetic" / "phase")))
    assert stage.filter.hmm.time_scale == 25.0
    assert np.allclose(stage.filter.hmm.transitions, cholec80_transitions())


def test_a_manifest_hmm_block_is_used_as_given():
    a = cholec80_transitions() * 0.5 + np.eye(7) * 0.5  # another valid per-second matrix
    prior = [0.1, 0.3, 0.1, 0.3, 0.05, 0.1, 0.05]
    f = phase_filter_from({"kind": "hmm", "transitions_per_s": a.tolist(), "unseen_per_s": 1e-5, "class_prior": prior,
                           "likelihood_power": 0.7, "time_scale": 2, "source": "counted from labels"}, "m: temporal_filter")
    assert np.allclose(f.hmm.transitions, a) and f.hmm.power == 0.7 and f.hmm.time_scale == 2.0
    assert np.allclose(f.hmm.class_prior, prior)
    zeros = np.eye(7)  # never leaves any phase: unseen_per_s fills every move, taken from staying
    g = phase_filter_from({"kind": "hmm", "transitions_per_s": zeros.tolist(), "unseen_per_s": 1e-4}, "m: temporal_filter")
    assert np.allclose(np.diag(g.hmm.transitions), 1 - 6e-4) and g.hmm.transitions[0, 6] == 1e-4


def _rows(a):
    return np.asarray(a).tolist()


GOOD = cholec80_transitions()
NOT_STOCHASTIC = GOOD.copy()
NOT_STOCHASTIC[3, 3] -= 0.1
NEGATIVE = GOOD.copy()
NEGATIVE[2, 5], NEGATIVE[2, 2] = -0.01, NEGATIVE[2, 2] + 0.01 + UNSEEN_PER_S
TOO_FAST = GOOD.copy()
TOO_FAST[1, 1], TOO_FAST[1, 2] = 0.4, TOO_FAST[1, 2] + TOO_FAST[1, 1] - 0.4
W = "models/x/phase/manifest.json: temporal_filter"


@pytest.mark.parametrize("block, message", [
    ({"kind": "ema"}, f"{W}.kind: must be \"hmm\" (or absent: the real Cholec80 statistics), got 'ema'"),
    ({"kind": "hmm"}, f"{W}.transitions_per_s: missing (needed by kind \"hmm\")"),
    ({"kind": "hmm", "transitions_per_s": _rows(GOOD)[:6]},
     f"{W}.transitions_per_s: must be 7 rows of 7 numbers (phases in the model's label order)"),
    ({"kind": "hmm", "transitions_per_s": [r[:6] for r in _rows(GOOD)]},
     f"{W}.transitions_per_s: must be 7 rows of 7 numbers (phases in the model's label order)"),
    ({"kind": "hmm", "transitions_per_s": _rows(NOT_STOCHASTIC)},
     f"{W}.transitions_per_s: row 3 sums to 0.9, not 1 (each row is the next second's distribution)"),
    ({"kind": "hmm", "transitions_per_s": _rows(NEGATIVE)}, f"{W}.transitions_per_s: negative probability at row 2, column 5"),
    ({"kind": "hmm", "transitions_per_s": _rows(TOO_FAST)},
     f"{W}.transitions_per_s: row 1 stays with probability 0.4: a per-second matrix stays above 0.5 (each phase lasts seconds)"),
    ({"transitions_per_s": _rows(GOOD)}, f"{W}.transitions_per_s: given without kind \"hmm\""),
    ({"class_prior": [0.2] * 7}, f"{W}.class_prior: sums to 1.4, not 1"),
    ({"class_prior": [0.5, 0.5, 0, 0, 0, 0, 0]},
     f"{W}.class_prior: must be 7 positive numbers (the training class frequencies)"),
    ({"time_scale": 0}, f"{W}.time_scale: must be a positive number, got 0"),
    ({"likelihood_power": "1"}, f"{W}.likelihood_power: must be a positive number, got '1'"),
    ({"unseen_per_s": 0.1}, f"{W}.unseen_per_s: must be at most 0.01 (a transition never seen), got 0.1"),
    ({"smoothing": 0.5, "hold_steps": 2},
     f"{W}.smoothing: a key of the former exponential-average filter; the phase filter is an HMM now (keys: kind, "
     "transitions_per_s, unseen_per_s, class_prior, likelihood_power, time_scale)"),
    ([1, 2], f"{W}: must be an object"),
])
def test_bad_temporal_filter_blocks_are_refused_with_one_line(block, message):
    with pytest.raises(ManifestError) as err:
        phase_filter_from(block, W)
    assert str(err.value) == message


def test_a_bad_block_in_a_phase_models_manifest_stops_the_stage(tmp_path):
    shutil.copytree(ROOT / "models" / "synthetic" / "phase", tmp_path / "phase")
    path = tmp_path / "phase" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["temporal_filter"] = {"kind": "hmm", "transitions_per_s": _rows(NOT_STOCHASTIC)}
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError) as err:
        PhaseStage(OnnxRuntimeBackend(load_manifest(path)))
    assert str(err.value) == (f"{path}: temporal_filter.transitions_per_s: row 3 sums to 0.9, not 1 "
                              "(each row is the next second's distribution)")
