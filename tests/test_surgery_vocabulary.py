"""The clinical vocabulary in one place (the phase filter's tests are in test_phase_filter.py)."""

from or_agent.pipelines.surgery import ANATOMY_CLASSES, PHASE_ID, PHASES, Anatomy


def test_cholec80_phases_in_order():
    assert PHASES[0] == "Preparation" and PHASES[-1] == "GallbladderRetraction"
    assert len(PHASES) == 7 and PHASE_ID["ClippingCutting"] == 2


def test_cholecseg8k_classes_and_named_ids():
    assert [c[0] for c in ANATOMY_CLASSES] == list(range(13))
    assert ANATOMY_CLASSES[Anatomy.CYSTIC_DUCT][1] == "Cystic Duct"
    assert ANATOMY_CLASSES[Anatomy.L_HOOK][1] == "L-hook Electrocautery"
