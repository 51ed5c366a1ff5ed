import numpy as np

from or_agent.pipelines.phase_filter import PhaseFilter, reachable_phases
from or_agent.pipelines.surgery import ANATOMY_CLASSES, PHASE_ID, PHASES, Anatomy, allowed_transitions


def test_cholec80_phases_in_order():
    assert PHASES[0] == "Preparation" and PHASES[-1] == "GallbladderRetraction"
    assert len(PHASES) == 7 and PHASE_ID["ClippingCutting"] == 2


def test_cholecseg8k_classes_and_named_ids():
    assert [c[0] for c in ANATOMY_CLASSES] == list(range(13))
    assert ANATOMY_CLASSES[Anatomy.CYSTIC_DUCT][1] == "Cystic Duct"
    assert ANATOMY_CLASSES[Anatomy.L_HOOK][1] == "L-hook Electrocautery"


def test_only_real_backward_transitions_are_reachable():
    reach = reachable_phases()
    backward = {(a, b) for a in range(7) for b in range(7) if b < a and reach[a, b]}
    assert backward == {(a, b) for a, b in allowed_transitions() if b < a}
    assert backward == {(PHASE_ID["CleaningCoagulation"], PHASE_ID["GallbladderPackaging"]),
                        (PHASE_ID["GallbladderRetraction"], PHASE_ID["CleaningCoagulation"])}


def _onehot(i, p=0.9):
    v = np.full(7, (1 - p) / 6)
    v[i] = p
    return v


def test_filter_ignores_a_single_odd_step_and_follows_a_held_change():
    f = PhaseFilter(smoothing=1.0, hold=2)
    seq = [_onehot(1)] * 5 + [_onehot(3)] + [_onehot(1)] * 3 + [_onehot(2)] * 4
    out = f.run(np.array(seq))
    assert list(out[:9]) == [1] * 9  # the one-step blip to phase 3 never shows
    assert list(out[9:]) == [1, 2, 2, 2]  # a change held for two steps is accepted on the second


def test_filter_refuses_a_backward_move_that_never_happens_in_surgery():
    f = PhaseFilter(smoothing=1.0, hold=1)
    out = f.run(np.array([_onehot(3)] * 1 + [_onehot(0)] * 10))
    # starts in a start phase, moves forward to 3 and never back to Preparation
    assert out[-1] == 3 and 0 not in out[2:]
