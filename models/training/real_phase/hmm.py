"""The transitions of the causal HMM phase filter, counted from the real labels.

    python -m or_agent.models.training.real_phase.hmm        # writes .cache/real-phase/transitions.json (~2 s)

The filter itself (``PhaseHMM``) is the agent's, ``pipelines.phase_filter``: training evaluates exactly
what runs. The matrix this writes goes into the phase model's manifest as ``temporal_filter``
(``kind = "hmm"``, ``transitions_per_s``).

The per-second transition matrix is counted from the real Cholec80 phase labels (1 fps, all 80
videos); a transition never seen gets a small probability (``UNSEEN_PER_S`` per second), so the
filter can always follow the evidence anywhere. For a step of ``dt`` seconds the matrix is raised
to the power dt (exactly, also for fractional dt: expm(dt * logm(A)), both by series, pure numpy).

No forced start: the initial belief is uniform (or a given prior), so an agent started mid-case
reaches the right phase from the evidence. It never locks in: every transition has probability
>= UNSEEN_PER_S * dt, and the posterior is floored at ``floor`` before each step.

Use (pure numpy; what the agent needs to integrate):

    hmm = PhaseHMM(load_transitions(path))   # 7x7 per-second matrix, Cholec80 phase order
    post = hmm.update(softmax_probs, dt_s)   # each step, dt_s = seconds since the previous step
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from or_agent.pipelines.phase_filter import UNSEEN_PER_S, PhaseHMM, with_unseen

__all__ = ["PHASES", "UNSEEN_PER_S", "PhaseHMM", "load_transitions", "lock_in_check", "save_transitions",
           "transition_matrix"]

PHASES = ["Preparation", "CalotTriangleDissection", "ClippingCutting", "GallbladderDissection",
          "GallbladderPackaging", "CleaningCoagulation", "GallbladderRetraction"]


def transition_matrix(series: dict[str, np.ndarray], exclude=(), unseen: float = UNSEEN_PER_S,
                      n: int = len(PHASES)) -> np.ndarray:
    """Per-second row-stochastic matrix from per-second phase-id series ({video: ids})."""
    counts = np.zeros((n, n))
    for video, ids in series.items():
        if video in exclude:
            continue
        np.add.at(counts, (ids[:-1], ids[1:]), 1)
    a = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    for i in range(n):
        if counts[i].sum() == 0:
            a[i, i] = 1.0
    return with_unseen(a, unseen)  # the unseen mass is taken from staying


def save_transitions(path: Path, a: np.ndarray, meta: dict) -> None:
    path.write_text(json.dumps({"phases": PHASES, "step_s": 1.0, "transition_per_second": np.round(a, 9).tolist(),
                                **meta}, indent=1))


def load_transitions(path) -> np.ndarray:
    return np.array(json.loads(Path(path).read_text())["transition_per_second"])


def lock_in_check(a: np.ndarray, rate_hz: float = 5.0) -> dict:
    """0.4 s of 99 % Cleaning, then 10 min of 99 % Calot evidence: seconds until Calot leads, and
    the final posterior of Calot."""
    hmm = PhaseHMM(a)
    wrong = np.full(7, 0.01 / 6)
    wrong[5] = 0.99
    right = np.full(7, 0.01 / 6)
    right[1] = 0.99
    for _ in range(int(0.4 * rate_hz)):
        hmm.update(wrong, 1 / rate_hz)
    first = None
    for k in range(int(600 * rate_hz)):
        post = hmm.update(right, 1 / rate_hz)
        if first is None and post.argmax() == 1:
            first = (k + 1) / rate_hz
    return {"seconds_to_calot": first, "final_calot": float(post[1]), "final_argmax": PHASES[int(post.argmax())]}


def main() -> None:
    from or_agent.models.training.real_phase.data import CACHE, cholec80_phase_per_second

    series = cholec80_phase_per_second()
    a = transition_matrix(series)
    CACHE.mkdir(parents=True, exist_ok=True)
    check = lock_in_check(a)
    save_transitions(CACHE / "transitions.json", a, {
        "source": "real Cholec80 phase labels, 1 fps, all 80 videos (cholec80-phase-labels/phase_data_*.csv.gz)",
        "unseen_transition_per_second": UNSEEN_PER_S, "videos": len(series),
        "seconds": int(sum(len(v) for v in series.values())), "lock_in_check": check,
        "use": "P(dt) = A^dt (expm(dt*logm(A))); forward filter with uniform start; see models/training/real_phase/hmm.py"})
    np.set_printoptions(precision=6, suppress=True)
    print(a)
    print("lock-in check:", check)


if __name__ == "__main__":
    main()
