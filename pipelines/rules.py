"""Decision-support rules: transparent conditions on typed inputs, with hysteresis and evidence.

Rules are declared in a TOML file (``[[rules]]`` tables; the built-in set for laparoscopic
cholecystectomy is the synthetic model set's ``rules_cholecystectomy.toml``, every rule documented with its
rationale). Each rule has an id, a severity, a condition of one of the kinds below, enter and exit
hysteresis (seconds of media time), a cooldown after it clears, the states that suppress it (out of
body, low visibility, a scene the models do not know), a message template filled from its evidence, and it records the values that
made it fire, the frame's sequence number and media time.

Condition kinds (``kind = ...``):

Classes are named ``model.class`` (a segmentation model's name and one of its classes) or by the class
alone where only one of the set's models has it; classification outputs' labels likewise as
``output.label`` or the label alone (a classification model's output is named after the model; the
Critical View of Safety a segmentation model carries is ``critical_view_of_safety``).

- ``distance_below``: two classes' masks (of one model) closer than ``threshold_px`` (frame pixels), optionally only
  in some ``phases``. Evidence: ``distance_px``, each class's ``<class>_confidence``.
- ``structures_not_seen_before``: on entering ``phase``, some ``required`` class was not seen
  (area at least ``min_area``, and confidence at least ``min_class_confidence`` where set) for ``min_seen_s``
  during ``during_phase``; with two or more required
  classes they must also have been seen at the same time at least ``min_separation_px`` apart (seen
  *separately*). The critical-view-of-safety proxy; advisory.
- ``criteria_not_held_before``: on entering ``phase``, the image-level ``labels`` (e.g. the three
  criteria of the critical view of safety) were not all achieved together for ``min_held_s`` during
  ``during_phase``. A label counts as achieved from when its probability reaches ``above`` (0.5) until
  it falls below ``above - hysteresis`` (0.1), so a probability wavering about 0.5 neither makes nor
  breaks the view. Evidence: seconds each label and all of them were held, their last probabilities.
- ``area_growth``: a class's area (fraction of the frame) grew by at least ``growth`` within
  ``window_s`` and is at least ``min_area``, optionally only in some ``phases``. Bleeding. Evidence: ``area_pct``,
  ``growth_pct``, the class's ``<class>_confidence``.
- ``phase_duration_over``: the current phase has lasted longer than its limit: ``limits_s`` per
  phase, or the real Cholec80 90th percentile divided by ``time_scale``.
- ``label_probability``: an image-level label's probability at least ``above`` (or below ``below``),
  optionally only in some ``phases``. Evidence: ``probability``.
- ``state``: a boolean input (``low_visibility``, ``out_of_body``, ``unfamiliar_scene``) is true; or ``frame_drop_rate`` above
  ``threshold``; or a system state (``stale``, ``source_lost``, ``frozen``, ``source_error``, ``model_error``,
  ``audit_damaged``) holds, its detail in the evidence as ``detail``. The system alerts are such rules, built in
  (``system_rules.toml``, always loaded beside a set's own), so they are raised and cleared like any other.

The kinds that read anatomy classes (``distance_below``, ``area_growth``, ``structures_not_seen_before``) take
``min_class_confidence``, in (0, 1): on a frame where the model's mean probability over a class the rule rests on
is lower, that class counts as not seen there (a distance rule does not hold; an area rule neither holds nor takes
the frame into its growth window; the critical-view proxy does not count the frame as seen). Like a frame where the
class is absent, such a frame only starts the exit hysteresis of an active alert. No critical alert may rest on a
structure the model is unsure of: a critical rule of these kinds must declare it. Keys a rule's kind does not read
are refused (a misspelt key would otherwise be silently ignored).

The engine only evaluates and reports transitions (raised, updated, cleared); who records them, asks
for acknowledgement and re-announces them is the agent's business. No rule ever acts on its own.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from or_agent.pipelines.errors import InputError
from or_agent.pipelines.measure import class_distance_px
from or_agent.pipelines.messages import FrameResult, SegmentationEstimate
from or_agent.pipelines.surgery import ANATOMY_NAMES, PHASE_DURATIONS, PHASES

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

SEVERITIES = ("info", "warning", "critical")
KINDS = ("distance_below", "structures_not_seen_before", "criteria_not_held_before", "area_growth", "phase_duration_over",
         "label_probability", "state")
# the kinds that accumulate time seen or held, and so must know about time they were suppressed
_ACCUMULATING = ("structures_not_seen_before", "criteria_not_held_before")
# the kinds that rest on anatomy classes, and so take (critical ones: must declare) ``min_class_confidence``
ANATOMY_KINDS = ("distance_below", "structures_not_seen_before", "area_growth")
SYSTEM_STATES = ("stale", "source_lost", "frozen", "source_error", "model_error", "audit_damaged")
STATES = ("low_visibility", "out_of_body", "unfamiliar_scene", "frame_drop_rate") + SYSTEM_STATES
SUPPRESSORS = ("out_of_body", "low_visibility", "unfamiliar_scene")
# a rule that names no suppressors: nothing of the models counts out of the body, nor in a scene they do not know
DEFAULT_SUPPRESS_WHEN = ("out_of_body", "unfamiliar_scene")
# the reference set's rules (a model set names its own in its set manifest)
BUILTIN_RULES = Path(__file__).resolve().parent.parent / "models" / "synthetic" / "rules_cholecystectomy.toml"
# the agent's own alerts (stalls, the source, a model failure): loaded beside every set's rules
SYSTEM_RULES = Path(__file__).resolve().parent / "system_rules.toml"


@dataclass(frozen=True)
class RuleVocabulary:
    """What a set's rules may name: each segmentation model's classes and each image-level output's labels."""

    segmentations: tuple[tuple[str, tuple[str, ...]], ...] = (("anatomy", ANATOMY_NAMES),)
    classifications: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(f"{m}.{c}" for m, names in self.segmentations for c in names)

    def resolve(self, ref: str, where: str, owner: str, outputs: str = "segmentations") -> tuple[str, int, str]:
        """(model or output, index, name) for ``model.class`` / ``output.label``, or a name only one of them has."""
        table = self.segmentations if outputs == "segmentations" else self.classifications
        what = "anatomy class" if outputs == "segmentations" else "label"
        for model, names in table:
            if ref.startswith(model + ".") and ref[len(model) + 1:] in names:
                return model, names.index(ref[len(model) + 1:]), ref[len(model) + 1:]
        found = [(model, names.index(ref), ref) for model, names in table if ref in names]
        if len(found) == 1:
            return found[0]
        if found:
            raise InputError(f"{where}: {what} {ref!r} is ambiguous: models {', '.join(m for m, _, _ in found)} have it "
                             f"(write {found[0][0]}.{ref})")
        known = [n for _, names in table for n in names]
        raise InputError(f"{where}: unknown {what} {ref!r}: no model of {owner} has it (known: {', '.join(known) or 'none'})")


@dataclass(frozen=True)
class SystemHealth:
    """What the agent knows about itself, beside the models' outputs."""

    # each system state holds while its detail (what a display says about it) is not empty
    stale: str = ""
    source_lost: str = ""
    frozen: str = ""
    source_error: str = ""
    model_error: str = ""
    audit_damaged: str = ""  # the audit trail was found damaged when the agent started
    frame_drop_rate: float = 0.0  # dropped / offered over the recent window


@dataclass(frozen=True)
class SegmentationView:
    """One segmentation model's estimate as the rules read it."""

    areas: tuple[float, ...]  # per class, fraction of the frame
    class_map: np.ndarray | None = field(default=None, repr=False)  # model-sized, for distances
    px_per_cell: float = 1.0  # frame pixels per class-map cell
    confidence: tuple[float, ...] = ()  # per class, the model's mean probability over its pixels

    @classmethod
    def of(cls, a: SegmentationEstimate, frame_size: tuple[int, int]) -> SegmentationView:
        cw, ch = a.area.crop_size
        cmap = a.class_map
        return cls(a.frame_fractions(frame_size), cmap, math.sqrt((cw / cmap.shape[1]) * (ch / cmap.shape[0])), a.confidence)


@dataclass(frozen=True)
class RuleInputs:
    """Typed inputs to every rule, derived from one pipeline result."""

    seq: int
    t_s: float  # media time
    phase: int | None
    phase_confidence: float
    time_in_phase_s: float
    out_of_body: bool
    low_visibility: bool
    unfamiliar_scene: bool = False  # the phase model's familiarity check: the models do not know this scene
    segmentations: Mapping[str, SegmentationView] = field(default_factory=dict)  # by model; none out of body
    labels: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # output -> label -> probability
    system: SystemHealth = SystemHealth()

    @classmethod
    def from_result(cls, r: FrameResult, system: SystemHealth = SystemHealth()) -> RuleInputs:
        segs = {} if r.out_of_body else {a.model: SegmentationView.of(a, r.frame_size) for a in r.segmentations}
        p = r.phase
        return cls(seq=r.seq, t_s=r.media_ms / 1000.0, phase=None if p is None else p.phase,
                   phase_confidence=0.0 if p is None else p.confidence, time_in_phase_s=0.0 if p is None else p.time_in_phase_s,
                   out_of_body=r.out_of_body, low_visibility=bool(r.visibility and r.visibility.low_visibility),
                   unfamiliar_scene=r.unfamiliar_scene, segmentations=segs,
                   labels={c.name: dict(c.items()) for c in r.classifications}, system=system)

    def confidence_of(self, model: str, cls: int) -> float:
        """The model's mean probability over class ``cls``'s pixels (0 when there is no estimate)."""
        v = self.segmentations.get(model)
        return v.confidence[cls] if v is not None and cls < len(v.confidence) else 0.0

    def area(self, model: str, cls: int) -> float:
        """Fraction of the frame that class ``cls`` covers (0 when there is no estimate)."""
        v = self.segmentations.get(model)
        return v.areas[cls] if v is not None and cls < len(v.areas) else 0.0

    def distance_px(self, model: str, a: int, b: int) -> float:
        """Smallest distance between any pixel of class a and any of class b (inf if either is absent)."""
        v = self.segmentations.get(model)
        if v is None or v.class_map is None:
            return math.inf
        return class_distance_px(v.class_map, a, b, v.px_per_cell)

    def probability(self, output: str, label: str) -> float | None:
        """An image-level label's probability; None when that output has no estimate on this frame."""
        got = self.labels.get(output)
        return None if got is None else got.get(label)


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str
    kind: str
    message: str
    params: dict[str, Any]
    enter_s: float = 0.0
    exit_s: float = 0.0
    cooldown_s: float = 0.0
    suppress_when: tuple[str, ...] = DEFAULT_SUPPRESS_WHEN
    rationale: str = ""
    vocabulary: RuleVocabulary = RuleVocabulary()  # the classes and labels the rule may name (its model set's)
    owner: str = "the reference models"  # who those outputs belong to, for errors

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, got {self.severity!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for s in self.suppress_when:
            if s not in SUPPRESSORS:
                raise ValueError(f"suppress_when: unknown state {s!r} (known: {', '.join(SUPPRESSORS)})")
        if min(self.enter_s, self.exit_s, self.cooldown_s) < 0:
            raise ValueError("enter_s, exit_s and cooldown_s must not be negative")


@dataclass(frozen=True)
class AlertTransition:
    """A rule's state change: what the agent turns into an alert event."""

    rule: str
    severity: str
    kind: str  # raised, updated, cleared
    message: str
    evidence: dict[str, str]
    seq: int
    t_s: float


def _class_ref(name: str, where: str, rule: Rule) -> tuple[str, int, str]:
    if not isinstance(name, str):
        raise InputError(f"{where}: class names are strings, got {name!r}")
    return rule.vocabulary.resolve(name, where, rule.owner)


def _phase_id(name: str, where: str) -> int:
    if name not in PHASES:
        raise InputError(f"{where}: unknown phase {name!r} (known: {', '.join(PHASES)})")
    return PHASES.index(name)


class _Condition:
    """Evaluates a rule's condition; returns (true?, evidence)."""

    def __init__(self, rule: Rule, where: str):
        self.rule = rule
        p = rule.params
        k = rule.kind
        read: set[str] = set()  # the keys this kind reads: any other is refused below

        def need(key, types, default=None):
            read.add(key)
            if key not in p:
                if default is None:
                    raise InputError(f"{where}.{key}: missing (needed by kind {k!r})")
                return default
            v = p[key]
            if isinstance(v, int) and not isinstance(v, bool) and float in (types if isinstance(types, tuple) else (types,)):
                v = float(v)
            if not isinstance(v, types) or (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
                raise InputError(f"{where}.{key}: wrong type {type(v).__name__}")
            return v

        if k == "distance_below":
            classes = need("classes", list)
            if len(classes) != 2:
                raise InputError(f"{where}.classes: give exactly two class names")
            (self.model, self.a, name_a), (model_b, self.b, name_b) = (_class_ref(c, f"{where}.classes", rule) for c in classes)
            self.class_names = {self.a: name_a, self.b: name_b}
            if model_b != self.model:
                raise InputError(f"{where}.classes: both classes must be of one segmentation model "
                                 f"({self.model} and {model_b} are two)")
            self.threshold = need("threshold_px", float)
            self.phases = {_phase_id(x, f"{where}.phases") for x in need("phases", list, [])}
        elif k == "structures_not_seen_before":
            self.at = _phase_id(need("phase", str), f"{where}.phase")
            self.during = _phase_id(need("during_phase", str), f"{where}.during_phase")
            refs = [_class_ref(c, f"{where}.required", rule) for c in need("required", list)]
            if not refs:
                raise InputError(f"{where}.required: name at least one class")
            if len({m for m, _, _ in refs}) > 1:
                raise InputError(f"{where}.required: the classes must be of one segmentation model (they are seen together)")
            self.model = refs[0][0]
            self.required = [c for _, c, _ in refs]
            self.required_names = [n for _, _, n in refs]
            self.class_names = dict(zip(self.required, self.required_names))
            self.min_area = need("min_area", float, 0.002)
            self.min_seen_s = need("min_seen_s", float, 2.0)
            self.min_sep = need("min_separation_px", float, 10.0)
            self.seen_s = [0.0] * len(self.required)
            self.together_s = 0.0
            self.last_t: float | None = None
            self.prev_phase: int | None = None
            self.fired_for_entry = False
        elif k == "criteria_not_held_before":
            self.at = _phase_id(need("phase", str), f"{where}.phase")
            self.during = _phase_id(need("during_phase", str), f"{where}.during_phase")
            refs = [rule.vocabulary.resolve(lab, f"{where}.labels", rule.owner, outputs="classifications")
                    for lab in need("labels", list)]
            if not refs:
                raise InputError(f"{where}.labels: name at least one label")
            self.labels = [(output, label) for output, _, label in refs]
            self.level = need("above", float, 0.5)
            self.hysteresis = need("hysteresis", float, 0.1)
            if not 0.0 < self.level <= 1.0 or not 0.0 <= self.hysteresis < self.level:
                raise InputError(f"{where}: 'above' must be in (0, 1] and 'hysteresis' in [0, above)")
            self.min_held_s = need("min_held_s", float, 2.0)
            self.achieved = [False] * len(self.labels)
            self.held_s = [0.0] * len(self.labels)
            self.all_held_s = 0.0
            self.last_prob: list[float | None] = [None] * len(self.labels)
            self.last_t = None
            self.prev_phase = None
            self.fired_for_entry = False
        elif k == "area_growth":
            self.model, self.cls, name = _class_ref(need("class", str), f"{where}.class", rule)
            self.class_names = {self.cls: name}
            self.phases = {_phase_id(x, f"{where}.phases") for x in need("phases", list, [])}
            self.growth = need("growth", float)
            self.window_s = need("window_s", float)
            self.min_area = need("min_area", float, 0.0)
            self.history: deque[tuple[float, float]] = deque(maxlen=4096)
        elif k == "phase_duration_over":
            scale = need("time_scale", float, 1.0)
            if scale <= 0:
                raise InputError(f"{where}.time_scale: must be positive")
            limits = {PHASES.index(n): s.p90_s / scale for n, s in PHASE_DURATIONS.items()}
            for name, v in need("limits_s", dict, {}).items():
                limits[_phase_id(name, f"{where}.limits_s")] = float(v)
            self.limits = limits
        elif k == "label_probability":
            self.output, _, self.label = rule.vocabulary.resolve(need("label", str), f"{where}.label", rule.owner,
                                                                 outputs="classifications")
            if ("above" in p) == ("below" in p):
                raise InputError(f"{where}: give exactly one of 'above' and 'below'")
            self.above = "above" in p
            self.level = need("above" if self.above else "below", float)
            if not 0.0 <= self.level <= 1.0:
                raise InputError(f"{where}.{'above' if self.above else 'below'}: a probability, in [0, 1]")
            self.phases = {_phase_id(x, f"{where}.phases") for x in need("phases", list, [])}
        elif k == "state":
            self.state = need("state", str)
            if self.state not in STATES:
                raise InputError(f"{where}.state: unknown state {self.state!r} (known: {', '.join(STATES)})")
            self.threshold = need("threshold", float, 0.0)
        # the classes' mean probability a rule needs before it believes them (0: no gate)
        self.min_class_confidence = 0.0
        if k in ANATOMY_KINDS:
            read.add("min_class_confidence")
            if "min_confidence" in p:
                raise InputError(f"{where}.min_confidence: renamed min_class_confidence "
                                 "(it applies to every rule that reads anatomy classes)")
            if "min_class_confidence" in p:
                self.min_class_confidence = need("min_class_confidence", float)
                if not 0.0 < self.min_class_confidence < 1.0:
                    raise InputError(f"{where}.min_class_confidence: a mean probability in (0, 1), "
                                     f"got {self.min_class_confidence:g}")
            elif rule.severity == "critical":
                raise InputError(f"{where}.min_class_confidence: missing (a critical rule must not rest on a structure "
                                 "the model is unsure of: give the classes' minimum confidence, in (0, 1))")
        unknown = sorted(set(p) - read)
        if unknown:
            raise InputError(f"{where}.{unknown[0]}: not a key of kind {k!r} (its keys: {', '.join(sorted(read))})")

    def sure(self, x: RuleInputs, evidence: dict[str, Any]) -> bool:
        """Whether the model is sure enough of every class the rule rests on (``min_class_confidence``);
        each class's confidence goes into the evidence."""
        confidences = {c: x.confidence_of(self.model, c) for c in self.class_names}
        for c, conf in confidences.items():
            evidence[f"{self.class_names[c]}_confidence"] = round(conf, 2)
        if self.min_class_confidence:
            evidence["min_class_confidence"] = self.min_class_confidence
        return all(conf >= self.min_class_confidence for conf in confidences.values())

    def suppressed(self, x: RuleInputs) -> None:
        """The rule is suppressed on this input (out of body, low visibility): no evaluation, but a
        condition that accumulates seen time must not count this time as seen."""
        if self.rule.kind in _ACCUMULATING:
            self.last_t = x.t_s

    def __call__(self, x: RuleInputs) -> tuple[bool, dict[str, Any]]:
        k = self.rule.kind
        if k == "distance_below":
            if self.phases and x.phase not in self.phases:
                return False, {}
            d = x.distance_px(self.model, self.a, self.b)
            evidence: dict[str, Any] = {"distance_px": round(d, 1) if math.isfinite(d) else "none",
                                        "threshold_px": self.threshold, "phase": PHASES[x.phase] if x.phase is not None else ""}
            return self.sure(x, evidence) and d < self.threshold, evidence
        if k == "structures_not_seen_before":
            return self._cvs(x)
        if k == "criteria_not_held_before":
            return self._criteria(x)
        if k == "area_growth":
            area = x.area(self.model, self.cls)
            evidence = {"area_pct": round(100 * area, 2)}
            sure = self.sure(x, evidence)
            # a region the model is unsure of is no measurement of the class's area: it neither holds nor becomes
            # the window's baseline (an unsure pool followed by a sure one must not look like growth from nothing);
            # a class absent from the frame is measured, as none
            if sure or area == 0.0:
                self.history.append((x.t_s, area))
            while self.history and self.history[0][0] < x.t_s - self.window_s:
                self.history.popleft()
            if not sure or (self.phases and x.phase not in self.phases):
                return False, {}
            grew = area - min(a for _, a in self.history)
            evidence.update(growth_pct=round(100 * grew, 2), window_s=self.window_s)
            return area >= self.min_area and grew >= self.growth, evidence
        if k == "phase_duration_over":
            if x.phase is None:
                return False, {}
            limit = self.limits[x.phase]
            return x.time_in_phase_s > limit, {"phase": PHASES[x.phase], "time_in_phase_s": round(x.time_in_phase_s, 1),
                                               "limit_s": round(limit, 1)}
        if k == "label_probability":
            if self.phases and x.phase not in self.phases:
                return False, {}
            prob = x.probability(self.output, self.label)
            if prob is None:
                return False, {}
            holds = prob >= self.level if self.above else prob < self.level
            return holds, {"label": self.label, "probability": round(prob, 2)}
        # state
        if self.state == "frame_drop_rate":
            return x.system.frame_drop_rate > self.threshold, {"frame_drop_rate": round(x.system.frame_drop_rate, 3),
                                                                "threshold": self.threshold}
        if self.state in SYSTEM_STATES:
            detail = getattr(x.system, self.state)
            return bool(detail), {self.state: bool(detail), "detail": detail}
        value = getattr(x, self.state)
        return bool(value), {self.state: bool(value)}

    def _cvs(self, x: RuleInputs) -> tuple[bool, dict[str, Any]]:
        dt = 0.0 if self.last_t is None else max(0.0, x.t_s - self.last_t)
        self.last_t = x.t_s
        if x.phase == self.during and not x.out_of_body:
            seen = [x.area(self.model, c) >= self.min_area and x.confidence_of(self.model, c) >= self.min_class_confidence
                    for c in self.required]
            for i, s in enumerate(seen):
                self.seen_s[i] += dt if s else 0.0
            if len(self.required) > 1 and all(seen):
                sep = min(x.distance_px(self.model, a, b) for i, a in enumerate(self.required) for b in self.required[i + 1:])
                self.together_s += dt if sep >= self.min_sep else 0.0
        entered = x.phase == self.at and self.prev_phase is not None and self.prev_phase != self.at
        if x.phase is not None:
            self.prev_phase = x.phase
        evidence = {n + "_seen_s": round(s, 1) for n, s in zip(self.required_names, self.seen_s)}
        if len(self.required) > 1:
            evidence["seen_separately_s"] = round(self.together_s, 1)
        evidence["min_seen_s"] = self.min_seen_s
        if entered:
            ok = all(s >= self.min_seen_s for s in self.seen_s) and (len(self.required) == 1 or self.together_s >= self.min_seen_s)
            self.fired_for_entry = not ok
        elif x.phase != self.at:
            self.fired_for_entry = False
        return self.fired_for_entry, evidence


    def _criteria(self, x: RuleInputs) -> tuple[bool, dict[str, Any]]:
        dt = 0.0 if self.last_t is None else max(0.0, x.t_s - self.last_t)
        self.last_t = x.t_s
        for i, (output, label) in enumerate(self.labels):
            prob = x.probability(output, label)
            if prob is None:
                continue  # not assessed on this frame: the last verdict holds
            self.last_prob[i] = prob
            self.achieved[i] = prob >= self.level or (self.achieved[i] and prob >= self.level - self.hysteresis)
        if x.phase == self.during and not x.out_of_body:
            for i, a in enumerate(self.achieved):
                self.held_s[i] += dt if a else 0.0
            self.all_held_s += dt if all(self.achieved) else 0.0
        entered = x.phase == self.at and self.prev_phase is not None and self.prev_phase != self.at
        if x.phase is not None:
            self.prev_phase = x.phase
        evidence: dict[str, Any] = {label + "_held_s": round(s, 1) for (_, label), s in zip(self.labels, self.held_s)}
        evidence.update({label: round(p, 2) if p is not None else "not assessed"
                         for (_, label), p in zip(self.labels, self.last_prob)})
        evidence["all_held_s"] = round(self.all_held_s, 1)
        evidence["min_held_s"] = self.min_held_s
        if entered:
            self.fired_for_entry = self.all_held_s < self.min_held_s
        elif x.phase != self.at:
            self.fired_for_entry = False
        return self.fired_for_entry, evidence


class _RuleState:
    def __init__(self, rule: Rule, condition: _Condition):
        self.rule = rule
        self.condition = condition
        self.system = rule.kind == "state" and rule.params.get("state") in SYSTEM_STATES
        self.active = False
        self.true_since: float | None = None
        self.false_since: float | None = None
        self.cleared_at: float | None = None
        self.last_evidence: dict[str, Any] = {}


def _check_unique_ids(rules: list[Rule]) -> None:
    ids = [r.id for r in rules]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise InputError(f"rules: duplicate rule id {sorted(dup)[0]!r}")


def distance_rule_holds(rule: Rule, class_map: np.ndarray, px_per_cell: float = 1.0,
                        confidence: tuple[float, ...] = ()) -> bool:
    """Whether a ``distance_below`` rule's condition holds on one class map, whatever the phase (how
    ``or-agent evaluate`` judges the rules on labelled frames that carry no phase). Without
    ``confidence`` (the truth), the rule's confidence gate is passed."""
    if rule.kind != "distance_below":
        raise ValueError(f"rule {rule.id}: not a distance_below rule")
    condition = _Condition(Rule(**{**rule.__dict__, "params": {**rule.params, "phases": []}}), f"rules.{rule.id}")
    n = max(int(class_map.max()) + 1 if class_map.size else 1,
            max(len(names) for _, names in rule.vocabulary.segmentations))
    view = SegmentationView((), class_map, px_per_cell, confidence or (1.0,) * n)
    x = RuleInputs(seq=0, t_s=0.0, phase=None, phase_confidence=0.0, time_in_phase_s=0.0, out_of_body=False,
                   low_visibility=False, segmentations={condition.model: view})
    return condition(x)[0]


class RulesEngine:
    def __init__(self, rules: list[Rule], on_transition: Callable[[AlertTransition], None] | None = None):
        _check_unique_ids(rules)
        self._states = [_RuleState(r, _Condition(r, f"rules.{r.id}")) for r in rules]
        self._on_transition = on_transition
        self._seqs: deque[int] = deque(maxlen=50)  # recent frame sequence numbers: gaps are dropped frames
        self.system = SystemHealth()  # the agent's own state, as last reported (``set_system``)
        self._last_seq, self._last_t_s = 0, 0.0

    def evaluate(self, x: RuleInputs, only_system: bool = False, cleared_because: str = "") -> list[AlertTransition]:
        out = []
        self._last_seq, self._last_t_s = x.seq, x.t_s
        for st in self._states:
            rule = st.rule
            if only_system and not st.system:
                continue
            suppressed = any(getattr(x, s) for s in rule.suppress_when)
            if suppressed:
                st.condition.suppressed(x)
            cond, evidence = (False, {}) if suppressed else st.condition(x)
            if cond:
                st.false_since = None
                if st.true_since is None:
                    st.true_since = x.t_s
                st.last_evidence = evidence
                cooling = st.cleared_at is not None and x.t_s - st.cleared_at < rule.cooldown_s
                if not st.active and not cooling and x.t_s - st.true_since >= rule.enter_s:
                    st.active = True
                    out.append(self._transition(st, "raised", x, evidence))
            else:
                st.true_since = None
                if st.active:
                    if st.false_since is None:
                        st.false_since = x.t_s
                    if x.t_s - st.false_since >= rule.exit_s:
                        st.active = False
                        st.cleared_at = x.t_s
                        out.append(self._transition(st, "cleared", x, st.last_evidence, cleared_because))
        if self._on_transition is not None:
            for t in out:
                self._on_transition(t)
        return out

    def drop_rate(self) -> float:
        """Frames the source dropped among those it offered, over the recent window (from sequence gaps)."""
        if len(self._seqs) < 2:
            return 0.0
        return 1.0 - len(self._seqs) / (self._seqs[-1] - self._seqs[0] + 1)

    def on_result(self, r: FrameResult) -> list[AlertTransition]:
        """Evaluate one pipeline result; the frame-drop rate is derived from its sequence number."""
        self._seqs.append(r.seq)
        self.system = replace(self.system, frame_drop_rate=self.drop_rate())
        return self.evaluate(RuleInputs.from_result(r, self.system))

    def set_system(self, cleared_because: str = "", **states: str) -> list[AlertTransition]:
        """The agent's own state changed (a stall, the source, a model failure: ``SYSTEM_STATES``, each a
        detail or "" when it no longer holds); the system rules are evaluated at once, at the last frame's
        media time, since no frame may come while it holds. ``cleared_because`` goes on what this clears."""
        unknown = set(states) - set(SYSTEM_STATES)
        if unknown:
            raise ValueError(f"unknown system state {sorted(unknown)[0]!r} (known: {', '.join(SYSTEM_STATES)})")
        self.system = replace(self.system, **states)  # type: ignore[arg-type]  # checked against SYSTEM_STATES above
        x = RuleInputs(seq=self._last_seq, t_s=self._last_t_s, phase=None, phase_confidence=0.0, time_in_phase_s=0.0,
                       out_of_body=False, low_visibility=False, system=self.system)
        return self.evaluate(x, only_system=True, cleared_because=cleared_because)

    @staticmethod
    def _transition(st: _RuleState, kind: str, x: RuleInputs, evidence: dict, because: str = "") -> AlertTransition:
        ev = {k: str(v) for k, v in evidence.items()}
        try:
            message = st.rule.message.format(**evidence)
        except (KeyError, ValueError, IndexError):
            message = st.rule.message
        if kind == "cleared":
            message = f"{message} - cleared" + (f": {because}" if because else "")
        return AlertTransition(st.rule.id, st.rule.severity, kind, message, ev, x.seq, x.t_s)


RULE_KEYS = {"id", "severity", "kind", "message", "enter_s", "exit_s", "cooldown_s", "suppress_when", "rationale"}


def system_rules() -> list[Rule]:
    """The agent's own alerts (``SYSTEM_RULES``): a stall, the source lost, frozen or failing, a model failure."""
    return load_rules(SYSTEM_RULES)


def load_rules(path: str | Path | None = None, overrides: dict[str, dict] | None = None,
               vocabulary: RuleVocabulary = RuleVocabulary(), owner: str = "the reference models") -> list[Rule]:
    """Rules from a TOML file (default: the built-in cholecystectomy set), validated against the ``vocabulary``
    of the models they will read (``owner`` names them in errors); errors name the rule and key."""
    path = Path(path) if path is not None else BUILTIN_RULES
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such rules file") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    tables = doc.get("rules")
    if not isinstance(tables, list) or not tables:
        raise InputError(f"{path}: no [[rules]] tables")
    extra = set(doc) - {"rules"}
    if extra:
        raise InputError(f"{path}: unknown top-level key {sorted(extra)[0]!r} (only [[rules]] tables)")
    rules = []
    for i, t in enumerate(tables):
        rid = t.get("id")
        where = f"{path}: rules.{rid}" if isinstance(rid, str) and rid else f"{path}: rules[{i}]"
        if not isinstance(rid, str) or not rid:
            raise InputError(f"{where}.id: missing")
        t = {**t, **((overrides or {}).get(rid, {}))}
        params = {k: v for k, v in t.items() if k not in RULE_KEYS}
        try:
            for key in ("severity", "kind", "message"):
                if key not in t:
                    raise ValueError(f"{key}: missing")
            rule = Rule(id=rid, severity=t["severity"], kind=t["kind"], message=t["message"], params=params,
                        enter_s=float(t.get("enter_s", 0.0)), exit_s=float(t.get("exit_s", 0.0)),
                        cooldown_s=float(t.get("cooldown_s", 0.0)),
                        suppress_when=tuple(t.get("suppress_when", DEFAULT_SUPPRESS_WHEN)), rationale=t.get("rationale", ""),
                        vocabulary=vocabulary, owner=owner)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{where}: {exc}") from None
        _Condition(rule, where)  # checks the kind's parameters, naming this file's table
        rules.append(rule)
    _check_unique_ids(rules)
    return rules
