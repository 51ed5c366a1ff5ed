"""Is the scene one the models know? The phase model's scene-familiarity output, with hysteresis.

A phase model may carry a second output: how far this frame's features are from its training data's
(for example a Mahalanobis distance, calibrated on validation frames). Its manifest says which output
that is and where to pause and resume, in a ``familiarity`` block:

    "familiarity": {"output": "feature_distance", "pause_above": 31.5, "resume_below": 28.0,
                    "pause_after_steps": 2, "resume_after_steps": 2, ...calibration figures...}

The scene becomes unfamiliar after ``pause_after_steps`` consecutive steps with the distance above
``pause_above``, and familiar again after ``resume_after_steps`` consecutive steps below
``resume_below``; a case starts familiar. While it is unfamiliar the agent pauses the phase, the
anatomy overlays and every alert resting on them, with the reason "unfamiliar scene": confident
output on video the models were never trained for is nonsense, however confident.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from or_agent.pipelines.errors import ManifestError


@dataclass(frozen=True)
class FamiliarityCheck:
    """A manifest's ``familiarity`` block: the output it reads and its thresholds."""

    output: str
    pause_above: float
    resume_below: float
    pause_after_steps: int = 2
    resume_after_steps: int = 2

    def __post_init__(self):
        if not self.output:
            raise ValueError("output: must name the model's distance output")
        for key in ("pause_above", "resume_below"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{key}: must be a number, got {value!r}")
        if self.resume_below > self.pause_above:
            raise ValueError(f"resume_below: must not be above pause_above ({self.pause_above:g}), got {self.resume_below:g}")
        for key in ("pause_after_steps", "resume_after_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: must be a whole number of steps, at least 1, got {value!r}")

    @classmethod
    def of(cls, manifest) -> FamiliarityCheck | None:
        """The check a phase model's manifest declares (None without a ``familiarity`` block); a bad block,
        or one naming an output the model lacks, is a ``ManifestError`` naming the key."""
        block = manifest.extra.get("familiarity")
        if block is None:
            return None
        where = f"{manifest.path}: familiarity"
        if not isinstance(block, Mapping):
            raise ManifestError(f"{where}: must be an object")
        for key in ("output", "pause_above", "resume_below"):
            if key not in block:
                raise ManifestError(f"{where}.{key}: missing")
        if not isinstance(block["output"], str):
            raise ManifestError(f"{where}.output: must be the name of an output, got {block['output']!r}")
        try:
            check = cls(block["output"], block["pause_above"], block["resume_below"],
                        block.get("pause_after_steps", 2), block.get("resume_after_steps", 2))
        except ValueError as exc:
            raise ManifestError(f"{where}.{exc}") from None
        found = [o for o in manifest.outputs if o.name == check.output and o.state_of is None]
        if not found:
            names = [o.name for o in manifest.outputs if o.state_of is None]
            raise ManifestError(f"{where}.output: the model has no output {check.output!r} (outputs: {', '.join(names)})")
        if math.prod(found[0].shape) != 1:
            raise ManifestError(f"{where}.output: {check.output!r} has shape {list(found[0].shape)}: a distance is one number")
        return check


class SceneFamiliarity:
    """The hysteresis over the distance, one step at a time."""

    def __init__(self, check: FamiliarityCheck):
        self.check = check
        self.reset()

    def reset(self) -> None:
        """Start of a case: familiar."""
        self.familiar = True
        self._run = 0  # consecutive steps pointing the other way

    def update(self, distance: float) -> bool:
        """Whether the scene is familiar after a step with this distance (not a number counts as far)."""
        if self.familiar:
            far = math.isnan(distance) or distance > self.check.pause_above
            self._run = self._run + 1 if far else 0
            if self._run >= self.check.pause_after_steps:
                self.familiar, self._run = False, 0
        else:
            near = distance < self.check.resume_below
            self._run = self._run + 1 if near else 0
            if self._run >= self.check.resume_after_steps:
                self.familiar, self._run = True, 0
        return self.familiar
