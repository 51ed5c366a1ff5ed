"""Causal temporal filter for the phase model's per-step probabilities.

Surgery moves forward through the Cholec80 phases; the only backward moves are the few seen in
real surgeries (``pipelines.surgery.PHASE_TRANSITIONS``). The filter keeps an exponential
average of the probabilities, considers only the phases reachable from the current one, and
switches only when a reachable phase has led for ``hold`` consecutive steps (hysteresis), so a
single odd frame cannot flip the phase shown to the surgeon.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from or_agent.pipelines.surgery import PHASE_TRANSITIONS, PHASES


def reachable_phases() -> np.ndarray:
    """reach[a, b]: may the filter move from phase a to phase b?"""
    n = len(PHASES)
    reach = np.zeros((n, n), bool)
    for a in range(n):
        reach[a, a:] = True  # forward moves, including skipped (absent) phases
    ids = {name: i for i, name in enumerate(PHASES)}
    for (a, b) in PHASE_TRANSITIONS:
        reach[ids[a], ids[b]] = True  # the real backward exceptions
    return reach


@dataclass(frozen=True)
class FilteredPhase:
    phase: int
    confidence: float
    probabilities: np.ndarray  # smoothed, over all phases
    steps_in_phase: int


class PhaseFilter:
    def __init__(self, smoothing: float = 0.5, hold: int = 2, margin: float = 0.05,
                 start_phases: tuple[int, ...] = (0, 1)):
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if hold < 1:
            raise ValueError(f"hold must be at least 1 step, got {hold}")
        self.smoothing = smoothing
        self.hold = hold
        self.margin = margin
        self.start_phases = start_phases
        self.reach = reachable_phases()
        self.reset()

    def reset(self) -> None:
        self._avg: np.ndarray | None = None
        self._phase: int | None = None
        self._lead = 0
        self._candidate: int | None = None
        self._steps = 0

    def update(self, probabilities: np.ndarray) -> FilteredPhase:
        p = np.asarray(probabilities, np.float64).ravel()
        if p.shape != (len(PHASES),):
            raise ValueError(f"expected {len(PHASES)} phase probabilities, got shape {p.shape}")
        self._avg = p if self._avg is None else self.smoothing * p + (1 - self.smoothing) * self._avg
        avg = self._avg
        if self._phase is None:
            allowed = np.full(len(PHASES), -np.inf)
            allowed[list(self.start_phases)] = avg[list(self.start_phases)]
            self._phase = int(np.argmax(allowed))
        current = self._phase
        masked = np.where(self.reach[current], avg, -np.inf)
        masked[current] = -np.inf
        best = int(np.argmax(masked))
        if np.isfinite(masked[best]) and masked[best] > avg[current] + self.margin:
            self._lead = self._lead + 1 if best == self._candidate else 1
            self._candidate = best
        else:
            self._lead, self._candidate = 0, None
        if self._lead >= self.hold:
            self._phase, self._lead, self._candidate, self._steps = best, 0, None, 0
        else:
            self._steps += 1
        return FilteredPhase(self._phase, float(avg[self._phase]), avg.copy(), self._steps)

    def run(self, probability_sequence: np.ndarray) -> np.ndarray:
        """Filter a whole sequence from a fresh start; returns the phase id per step."""
        self.reset()
        return np.array([self.update(p).phase for p in probability_sequence], np.int64)
