"""Causal estimate of the surgical phase: a hidden Markov model's forward filter over the Cholec80 phases.

Each step the belief over the phases is carried forward by the per-second transition matrix raised to
the power of the seconds elapsed (``A ** dt``, also for fractional or long gaps: ``exp(dt * log A)``),
multiplied by the model's evidence, normalised, and floored so that no phase's belief ever reaches
zero. Every transition, even one never seen in real surgery, keeps a small probability (``unseen_per_s``
per second), and the start belief is uniform: the filter never locks into a phase (0.4 s of a wrong
phase cannot outweigh minutes of evidence for the right one), and an agent started in the middle of a
case reaches the phase the evidence shows without passing through Preparation first.

The transitions come from the phase model's manifest (``temporal_filter``, ``kind = "hmm"``: the matrix
counted from real labels) or, without one, from the real Cholec80 statistics in ``pipelines.surgery``:
the chance of staying in a phase for one more second from its median duration, the chance of leaving
split by how many videos made each move. ``time_scale`` says how many real seconds one second of the
video stands for (25 for the time-compressed synthetic surgeries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from or_agent.pipelines.errors import ManifestError
from or_agent.pipelines.surgery import PHASE_DURATIONS, PHASE_ID, PHASE_TRANSITIONS, PHASES

UNSEEN_PER_S = 1e-5  # per-second probability of a transition never seen in real surgery
BELIEF_FLOOR = 1e-4  # no phase's belief falls below this: evidence can always bring it back
MIN_STAY_PER_S = 0.5  # a per-second matrix stays in each phase with more than this (phases last seconds at least)
ROW_TOLERANCE = 1e-6
PRIOR_TOLERANCE = 1e-4  # a class prior is written rounded (6 decimals over 7 classes can be 3.5e-6 off); it is normalised


def with_unseen(a: np.ndarray, unseen_per_s: float = UNSEEN_PER_S) -> np.ndarray:
    """``a`` with every transition of probability 0 given ``unseen_per_s``, taken from staying."""
    a = np.array(a, np.float64)
    off = (a == 0) & ~np.eye(len(a), dtype=bool)
    a[off] = unseen_per_s
    a[np.diag_indices(len(a))] -= a.sum(1) - 1.0
    return a


def cholec80_transitions(unseen_per_s: float = UNSEEN_PER_S) -> np.ndarray:
    """Per-second transition matrix from the real Cholec80 statistics (``pipelines.surgery``).

    A phase's duration is taken as geometric with the phase's median, so it is left in a given second
    with probability ``1 - 0.5 ** (1 / median_s)``; a video that ends in the phase never leaves it (the
    last phase is left by 3 of 80 videos, so it is left 3/80 as often); the leaving moves are split by
    the number of videos that made each."""
    n = len(PHASES)
    a = np.zeros((n, n))
    for name, stats in PHASE_DURATIONS.items():
        i = PHASE_ID[name]
        moves = {PHASE_ID[b]: count for (src, b), count in PHASE_TRANSITIONS.items() if src == name}
        total = sum(moves.values())
        leave = (1.0 - 0.5 ** (1.0 / stats.median_s)) * min(1.0, total / stats.videos_with_phase)
        for j, count in moves.items():
            a[i, j] = leave * count / total
        a[i, i] = 1.0 - leave
    return with_unseen(a, unseen_per_s)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """Principal square root (Denman-Beavers iteration)."""
    y, z = a, np.eye(len(a))
    for _ in range(100):
        y_next = 0.5 * (y + np.linalg.inv(z))
        z = 0.5 * (z + np.linalg.inv(y))
        if np.abs(y_next - y).max() < 1e-15:
            return y_next
        y = y_next
    return y


def matrix_log(a: np.ndarray) -> np.ndarray:
    """Principal logarithm of a matrix whose eigenvalues lie off the closed negative real axis (a
    per-second transition matrix, diagonally dominant): square roots until it is within 1/4 of the
    identity, then the Mercator series (its error there is below 1e-24)."""
    eye = np.eye(len(a))
    x, roots = np.asarray(a, np.float64), 0
    while np.abs(x - eye).sum(1).max() > 0.25:
        if roots == 30:
            raise ValueError("the matrix has no principal logarithm")
        x, roots = _sqrtm(x), roots + 1
    e = x - eye
    out, power = np.zeros_like(e), eye
    for k in range(1, 41):
        power = power @ e
        out += ((-1) ** (k + 1)) * power / k
    return out * 2.0 ** roots


def matrix_exp(q: np.ndarray) -> np.ndarray:
    """exp(Q) by scaling and squaring with a Taylor series."""
    norm = np.abs(q).sum(1).max()
    s = max(0, int(np.ceil(np.log2(max(norm, 1e-300)))) + 1)
    q = q / 2.0 ** s
    out, term = np.eye(len(q)), np.eye(len(q))
    for k in range(1, 20):
        term = term @ q / k
        out = out + term
    for _ in range(s):
        out = out @ out
    return out


def _check_transitions(a: np.ndarray) -> None:
    """ValueError unless ``a`` is a square, nonnegative, row-stochastic per-second matrix."""
    if a.ndim != 2 or a.shape[0] != a.shape[1] or not np.isfinite(a).all():
        raise ValueError(f"transitions must be a square matrix of numbers, got shape {a.shape}")
    bad = np.argwhere(a < 0)
    if len(bad):
        raise ValueError(f"negative probability at row {bad[0][0]}, column {bad[0][1]}")
    sums = a.sum(1)
    row = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[row] - 1.0) > ROW_TOLERANCE:
        raise ValueError(f"row {row} sums to {sums[row]:.9g}, not 1 (each row is the next second's distribution)")
    stay = np.diag(a)
    row = int(np.argmin(stay))
    if stay[row] <= MIN_STAY_PER_S:
        raise ValueError(f"row {row} stays with probability {stay[row]:.9g}: a per-second matrix stays above "
                         f"{MIN_STAY_PER_S:g} (each phase lasts seconds)")


class PhaseHMM:
    """The forward filter: ``update(probabilities, dt_s)`` -> the posterior over the phases (an array).

    - ``transitions``: per-second row-stochastic matrix (seconds of real surgery).
    - ``time_scale``: real seconds per second of media (25 for the synthetic surgeries).
    - ``class_prior``: the classifier's training class frequencies: its probabilities are divided by
      them (scaled likelihoods), so that a phase frequent in training is not favoured twice.
    - ``power``: exponent on the evidence (< 1 tempers an over-confident classifier).
    - ``floor``: the least belief any phase keeps after each step.
    - ``initial``: the start belief (None: uniform, no forced start).
    """

    def __init__(self, transitions: np.ndarray, time_scale: float = 1.0, class_prior: np.ndarray | None = None,
                 power: float = 1.0, floor: float = BELIEF_FLOOR, initial: np.ndarray | None = None):
        a = np.asarray(transitions, np.float64)
        _check_transitions(a)
        if not 0 < time_scale < math.inf:
            raise ValueError(f"time_scale must be a positive number, got {time_scale}")
        if not 0 < power < math.inf:
            raise ValueError(f"power must be a positive number, got {power}")
        if not 0 <= floor < 1 / len(a):
            raise ValueError(f"floor must be in [0, 1/{len(a)}), got {floor}")
        self.n = len(a)
        self.transitions = a
        self.time_scale = float(time_scale)
        self._rate = matrix_log(a) * self.time_scale  # per second of media
        self.class_prior = None if class_prior is None else self._distribution(class_prior, "class_prior")
        self.initial = np.full(self.n, 1.0 / self.n) if initial is None else self._distribution(initial, "initial")
        self.power = float(power)
        self.floor = float(floor)
        self._cache: dict[float, np.ndarray] = {}
        self.reset()

    def _distribution(self, values, what: str) -> np.ndarray:
        v = np.asarray(values, np.float64).ravel()
        if v.shape != (self.n,) or not np.isfinite(v).all() or (v <= 0).any():
            raise ValueError(f"{what} must be {self.n} positive numbers")
        return v / v.sum()

    def reset(self) -> None:
        """Start of a case: the start belief."""
        self.belief = self.initial.copy()

    def step_matrix(self, dt_s: float) -> np.ndarray:
        """The transition matrix for ``dt_s`` seconds of media: ``A ** (dt_s * time_scale)`` (identity for 0)."""
        if not dt_s >= 0:  # also refuses NaN
            raise ValueError(f"a step cannot go back in time: dt_s = {dt_s}")
        key = round(float(dt_s), 3)  # media time is in milliseconds
        m = self._cache.get(key)
        if m is None:
            m = matrix_exp(self._rate * key) if key > 0 else np.eye(self.n)
            # a matrix counted from data may lack an exact generator: clip the last digits' negatives
            m = np.clip(m, 0.0, None)
            m /= m.sum(1, keepdims=True)
            if len(self._cache) < 256:
                self._cache[key] = m
        return m

    def update(self, probabilities, dt_s: float) -> np.ndarray:
        """One step: the model's ``probabilities`` for a frame ``dt_s`` seconds after the last step's; None when
        the step has no evidence to trust (an unfamiliar scene): the belief only moves with time."""
        post = self.belief @ self.step_matrix(dt_s)
        if probabilities is not None:
            p = np.asarray(probabilities, np.float64).ravel()
            if p.shape != (self.n,) or not np.isfinite(p).all():
                raise ValueError(f"expected {self.n} finite phase probabilities, got {p.shape[0]} values")
            likelihood = np.clip(p, 1e-12, None)
            if self.class_prior is not None:
                likelihood = likelihood / self.class_prior
            if self.power != 1.0:
                likelihood = likelihood ** self.power
            post = post * likelihood
        post /= post.sum()
        post = np.maximum(post, self.floor)
        self.belief = post / post.sum()
        return self.belief.copy()


@dataclass(frozen=True)
class FilteredPhase:
    phase: int  # the phase shown: the posterior's argmax
    confidence: float  # its posterior probability
    probabilities: np.ndarray  # the posterior over all phases
    steps_in_phase: int  # steps since the phase shown was entered (0 on the step it was)


class PhaseFilter:
    """The phase shown to the surgeon: the HMM's posterior argmax (the HMM already smooths: a margin on
    top measured no better on the held-out synthetic surgeries), and how long it has been shown."""

    def __init__(self, hmm: PhaseHMM | None = None):
        self.hmm = hmm or PhaseHMM(cholec80_transitions())
        self.reset()

    def reset(self) -> None:
        self.hmm.reset()
        self._phase: int | None = None
        self._steps = 0

    def update(self, probabilities, dt_s: float = 0.0) -> FilteredPhase:
        """``probabilities`` None: a step without evidence (see ``PhaseHMM.update``)."""
        post = self.hmm.update(probabilities, dt_s)
        best = int(np.argmax(post))
        if best != self._phase:
            self._phase, self._steps = best, 0
        else:
            self._steps += 1
        return FilteredPhase(self._phase, float(post[self._phase]), post, self._steps)

    def run(self, probability_sequence, times_s) -> np.ndarray:
        """Filter a whole sequence (one row per step, at media times ``times_s``) from a fresh start;
        returns the phase shown per step."""
        self.reset()
        out, last = [], None
        for p, t in zip(probability_sequence, times_s):
            out.append(self.update(p, 0.0 if last is None else t - last).phase)
            last = t
        return np.array(out, np.int64)


# the keys of a manifest's temporal_filter block the filter reads (others, such as "source", describe it)
TEMPORAL_FILTER_KEYS = ("kind", "transitions_per_s", "unseen_per_s", "class_prior", "likelihood_power", "time_scale")
# the keys of the exponential-average filter this one replaced: refused, not silently ignored
FORMER_FILTER_KEYS = ("smoothing", "hold_steps", "margin")


def _number(block: Mapping, key: str, where: str, default: float, positive: bool = True) -> float:
    value = block.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (value > 0 if positive else value >= 0):
        raise ManifestError(f"{where}.{key}: must be a {'positive' if positive else 'nonnegative'} number, got {value!r}")
    return float(value)


def _matrix(value, n: int, where: str) -> np.ndarray:
    if (not isinstance(value, list) or len(value) != n
            or any(not isinstance(row, list) or len(row) != n for row in value)
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for row in value for v in row)):
        raise ManifestError(f"{where}: must be {n} rows of {n} numbers (phases in the model's label order)")
    return np.array(value, np.float64)


def phase_filter_from(block: object, where: str, n: int = len(PHASES)) -> PhaseFilter:
    """The filter a phase model's manifest asks for: ``block`` is its ``temporal_filter`` (``{}`` when it
    has none), ``where`` names it in errors (``<manifest>: temporal_filter``)."""
    if not isinstance(block, Mapping):
        raise ManifestError(f"{where}: must be an object")
    former = [k for k in FORMER_FILTER_KEYS if k in block]
    if former:
        raise ManifestError(f"{where}.{former[0]}: a key of the former exponential-average filter; the phase filter is "
                            f"an HMM now (keys: {', '.join(TEMPORAL_FILTER_KEYS)})")
    kind = block.get("kind")
    if kind not in (None, "hmm"):
        raise ManifestError(f"{where}.kind: must be \"hmm\" (or absent: the real Cholec80 statistics), got {kind!r}")
    unseen = _number(block, "unseen_per_s", where, UNSEEN_PER_S, positive=False)
    if unseen > 0.01:
        raise ManifestError(f"{where}.unseen_per_s: must be at most 0.01 (a transition never seen), got {unseen!r}")
    if kind == "hmm":
        if "transitions_per_s" not in block:
            raise ManifestError(f"{where}.transitions_per_s: missing (needed by kind \"hmm\")")
        a = _matrix(block["transitions_per_s"], n, f"{where}.transitions_per_s")
        try:
            _check_transitions(a)
        except ValueError as exc:
            raise ManifestError(f"{where}.transitions_per_s: {exc}") from None
        a = with_unseen(a, unseen)
    elif "transitions_per_s" in block:
        raise ManifestError(f"{where}.transitions_per_s: given without kind \"hmm\"")
    elif n != len(PHASES):
        raise ManifestError(f"{where}: the Cholec80 statistics are for {len(PHASES)} phases, the model has {n}: "
                            f"give kind \"hmm\" with its transitions_per_s")
    else:
        a = cholec80_transitions(unseen)
    prior = None
    if block.get("class_prior") is not None:
        value = block["class_prior"]
        if (not isinstance(value, list) or len(value) != n
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in value)):
            raise ManifestError(f"{where}.class_prior: must be {n} positive numbers (the training class frequencies)")
        if abs(sum(value) - 1.0) > PRIOR_TOLERANCE:
            raise ManifestError(f"{where}.class_prior: sums to {sum(value):.9g}, not 1")
        prior = np.array(value, np.float64)
    try:
        return PhaseFilter(PhaseHMM(a, time_scale=_number(block, "time_scale", where, 1.0), class_prior=prior,
                                    power=_number(block, "likelihood_power", where, 1.0)))
    except ValueError as exc:  # the unseen transitions took a stay to 0.5 or below
        raise ManifestError(f"{where}.transitions_per_s: with unseen_per_s {unseen:g}: {exc}") from None
