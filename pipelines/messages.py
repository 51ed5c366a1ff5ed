"""Typed messages between pipeline stages, validated on construction.

A ``Frame`` comes out of a source; a ``FrameResult`` comes out of the pipeline's single publish
point with everything a display, the alert rules or a recorder needs about that frame, including
when it crossed each stage boundary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from or_agent.pipelines.preprocess import ContentArea


@dataclass(frozen=True)
class PhaseEstimate:
    phase: int  # filtered phase id
    name: str
    confidence: float  # smoothed probability of the filtered phase
    probabilities: tuple[float, ...]  # this step's model probabilities
    raw_phase: int  # this step's argmax, before the temporal filter
    time_in_phase_s: float
    model: str = ""  # the model that produced it
    familiar: bool = True  # the scene is one the model knows (its familiarity check, where it has one)
    feature_distance: float | None = None  # this step's distance to the training data, where the model gives one

    def __post_init__(self):
        if not 0 <= self.phase < len(self.probabilities):
            raise ValueError(f"phase {self.phase} outside the {len(self.probabilities)} phases")
        if not 0.0 <= self.confidence <= 1.0 + 1e-6:
            raise ValueError(f"confidence {self.confidence} outside [0, 1]")
        if not isinstance(self.familiar, bool):
            raise ValueError(f"familiar must be True or False, got {self.familiar!r}")
        if self.feature_distance is not None and (isinstance(self.feature_distance, bool)
                                                  or not isinstance(self.feature_distance, (int, float))
                                                  or math.isnan(self.feature_distance)):
            raise ValueError(f"feature_distance must be a number or None, got {self.feature_distance!r}")


@dataclass(frozen=True)
class SegmentationEstimate:
    class_map: np.ndarray = field(repr=False)  # model-sized uint8 class ids
    area: ContentArea
    area_fraction: tuple[float, ...]  # per class, fraction of the content crop
    confidence: tuple[float, ...]  # per class, mean probability over its pixels (0 if absent)
    # the Critical View of Safety criteria and their probabilities, where the model assesses it
    cvs: tuple[tuple[str, float], ...] = ()
    model: str = ""  # the model that produced it
    names: tuple[str, ...] = ()  # its class names, by class id
    # a class whose mean probability is below this is not drawn (its region is more often wrong than
    # right); the rules and the CVS read the whole class map with their own gates
    draw_min_confidence: float = 0.0

    def __post_init__(self):
        if self.class_map.ndim != 2 or self.class_map.dtype != np.uint8:
            raise ValueError("class_map must be a 2-D uint8 array")
        if len(self.area_fraction) != len(self.confidence):
            raise ValueError("area_fraction and confidence must have one value per class")
        if self.names and len(self.names) != len(self.area_fraction):
            raise ValueError(f"{len(self.names)} class names for {len(self.area_fraction)} classes")
        if not 0.0 <= self.draw_min_confidence < 1.0:
            raise ValueError(f"draw_min_confidence must be in [0, 1), got {self.draw_min_confidence}")

    def drawn(self, class_id: int) -> bool:
        """Whether this class's region is confident enough to be drawn (background never is)."""
        return class_id != 0 and self.confidence[class_id] >= self.draw_min_confidence

    def classification(self) -> ClassificationEstimate | None:
        """The Critical View of Safety this model's class map was assessed for, as image-level labels."""
        if not self.cvs:
            return None
        return ClassificationEstimate(self.model, CVS_OUTPUT, tuple(k for k, _ in self.cvs), tuple(v for _, v in self.cvs))

    def frame_fractions(self, frame_size: tuple[int, int]) -> tuple[float, ...]:
        """Per-class share of the whole frame (width, height): outside the content crop is the
        scope's black border, counted as class 0."""
        cw, ch = self.area.crop_size
        share = cw * ch / (frame_size[0] * frame_size[1])
        out = [a * share for a in self.area_fraction]
        out[0] += 1.0 - share
        return tuple(out)


@dataclass(frozen=True)
class VisibilityEstimate:
    p_out_of_body: float
    p_low_visibility: float
    threshold: float = 0.5
    model: str = ""  # the model that produced it

    @property
    def out_of_body(self) -> bool:
        return self.p_out_of_body > self.threshold

    @property
    def low_visibility(self) -> bool:
        return not self.out_of_body and self.p_low_visibility > self.threshold



CVS_OUTPUT = "critical_view_of_safety"  # the name of the Critical View of Safety assessment a segmentation model may carry


@dataclass(frozen=True)
class ClassificationEstimate:
    """Image-level labels with their probabilities: a classification model's output (named after the
    model), or an assessment a segmentation model carries (``cvs``)."""

    model: str
    name: str
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]

    def __post_init__(self):
        if not self.name or len(self.labels) != len(self.probabilities) or not self.labels:
            raise ValueError("a classification needs a name and one probability per label")
        if any(not 0.0 <= p <= 1.0 + 1e-6 for p in self.probabilities):
            raise ValueError(f"{self.name}: probabilities must be in [0, 1]")

    def probability(self, label: str) -> float:
        return self.probabilities[self.labels.index(label)]

    def items(self) -> tuple[tuple[str, float], ...]:
        return tuple(zip(self.labels, self.probabilities))


Estimate = PhaseEstimate | SegmentationEstimate | VisibilityEstimate | ClassificationEstimate


# Stage boundaries, in the order a frame crosses them.
STAGE_MARKS = ("capture", "preprocess", "inference", "postprocess", "publish")


@dataclass(frozen=True)
class Frame:
    """One decoded video frame from a source."""

    seq: int  # per-source sequence number from 0; a jump means frames were dropped
    capture_ns: int  # time.monotonic_ns() when the frame was grabbed
    media_ms: float  # media timestamp: position in the file, or time since the live source opened
    image: np.ndarray = field(repr=False)  # HxWx3 uint8 BGR

    def __post_init__(self):
        if self.seq < 0:
            raise ValueError(f"frame sequence number must be >= 0, got {self.seq}")
        img = self.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError("frame image must be an HxWx3 uint8 BGR array")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)"""
        return self.image.shape[1], self.image.shape[0]


@dataclass(frozen=True)
class SourceEvent:
    """Something the source wants reported: it opened, lost the feed, froze, failed, ended."""

    kind: str  # one of SOURCE_EVENT_KINDS
    source: str
    message: str
    at_ns: int  # time.monotonic_ns()
    seq: int | None = None  # the last frame delivered before the event, if any
    gap_s: float | None = None  # for "reconnected" and "unfrozen": how long the feed was missing

    def __post_init__(self):
        if self.kind not in SOURCE_EVENT_KINDS:
            raise ValueError(f"unknown source event kind {self.kind!r}")


SOURCE_EVENT_KINDS = ("opened", "disconnected", "reconnected", "frozen", "unfrozen", "error", "ended")


# Why a frame's results are not shown (``FrameResult.paused_reason``), as the displays and recordings say it.
PAUSED_OUT_OF_BODY = "camera out of body"
PAUSED_UNFAMILIAR = "unfamiliar scene"
PAUSED_REASONS = (PAUSED_OUT_OF_BODY, PAUSED_UNFAMILIAR)


@dataclass(frozen=True)
class FrameResult:
    """Everything the pipeline concluded about one frame, and when."""

    seq: int
    media_ms: float
    frame_size: tuple[int, int]  # (width, height)
    marks_ns: dict[str, int]  # STAGE_MARKS -> time.monotonic_ns()
    visibility: VisibilityEstimate | None
    phase: PhaseEstimate | None  # the newest phase estimate (steps run at the phase model's cadence)
    # one per segmentation model, in the set's order; () when out of body (nothing is drawn or measured on the room)
    segmentations: tuple[SegmentationEstimate, ...] = ()
    classifications: tuple[ClassificationEstimate, ...] = ()  # image-level outputs, incl. those segmentations carry
    fresh: frozenset[str] = frozenset()  # the models that ran on this very frame (the others' results are carried)
    image: np.ndarray | None = field(default=None, repr=False)  # the frame, when the subscriber asked for it
    # outlines per segmentation model and class, in frame pixels (for the wire)
    polygons: dict[str, dict[int, list[np.ndarray]]] | None = field(default=None, repr=False)
    withheld: tuple[tuple[str, str], ...] = ()  # (output, why): run but not shown, e.g. ("phase", "not validated ...")
    # the phase model's familiarity check says the models do not know this scene: given for a withheld phase
    # estimate (the check guards every output, not only the phase), and always true when the shown one says so
    unfamiliar_scene: bool = False

    @classmethod
    def of(cls, estimates: Sequence[Estimate], **fields) -> FrameResult:
        """A result holding ``estimates`` (at most one visibility and one phase), each under its kind."""
        def one(kind):
            found = [e for e in estimates if isinstance(e, kind)]
            if len(found) > 1:
                raise ValueError(f"more than one {kind.__name__} for one frame")
            return found[0] if found else None

        segmentations = tuple(e for e in estimates if isinstance(e, SegmentationEstimate))
        carried = tuple(c for c in (s.classification() for s in segmentations) if c is not None)
        return cls(visibility=one(VisibilityEstimate), phase=one(PhaseEstimate), segmentations=segmentations,
                   classifications=tuple(e for e in estimates if isinstance(e, ClassificationEstimate)) + carried, **fields)

    def __post_init__(self):
        missing = [m for m in STAGE_MARKS[:-1] if m not in self.marks_ns]
        if missing:
            raise ValueError(f"frame {self.seq}: missing stage timestamps {missing}")
        if not isinstance(self.unfamiliar_scene, bool):
            raise ValueError(f"unfamiliar_scene must be True or False, got {self.unfamiliar_scene!r}")
        if self.phase is not None and not self.phase.familiar:  # a shown phase estimate's verdict is the result's
            object.__setattr__(self, "unfamiliar_scene", True)

    @property
    def out_of_body(self) -> bool:
        return self.visibility is not None and self.visibility.out_of_body

    @property
    def paused_reason(self) -> str | None:
        """Why nothing of the models is to be shown for this frame (None: it is): the camera is out of the
        body, or the scene is not one the phase model's familiarity check knows."""
        if self.out_of_body:
            return PAUSED_OUT_OF_BODY
        if self.unfamiliar_scene:
            return PAUSED_UNFAMILIAR
        return None

    @property
    def ai_paused(self) -> bool:
        return self.paused_reason is not None

    @property
    def segmentation(self) -> SegmentationEstimate | None:
        """The set's first segmentation model's estimate: the one label masks and qualification compare."""
        return self.segmentations[0] if self.segmentations else None

    def is_fresh(self, estimate: Estimate | None) -> bool:
        """``estimate`` was computed on this very frame (not carried over from an earlier one)."""
        return estimate is not None and estimate.model in self.fresh

    @property
    def phase_fresh(self) -> bool:
        return self.is_fresh(self.phase)

    @property
    def segmentation_fresh(self) -> bool:
        return self.is_fresh(self.segmentation)

    def latency_ms(self, start: str = "capture", end: str = "publish") -> float:
        return (self.marks_ns[end] - self.marks_ns[start]) / 1e6
