"""Typed messages between pipeline stages, validated on construction.

A ``Frame`` comes out of a source; a ``FrameResult`` comes out of the pipeline's single publish
point with everything a display, the alert rules or a recorder needs about that frame, including
when it crossed each stage boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from or_agent.pipelines.stages import AnatomyEstimate, PhaseEstimate, VisibilityEstimate

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


@dataclass(frozen=True)
class FrameResult:
    """Everything the pipeline concluded about one frame, and when."""

    seq: int
    media_ms: float
    frame_size: tuple[int, int]  # (width, height)
    marks_ns: dict[str, int]  # STAGE_MARKS -> time.monotonic_ns()
    visibility: VisibilityEstimate | None
    phase: PhaseEstimate | None  # the newest phase estimate (steps run at the phase rate)
    anatomy: AnatomyEstimate | None  # None when out of body, or not computed for this frame
    phase_fresh: bool = False  # the phase model stepped on this very frame
    anatomy_fresh: bool = False
    image: np.ndarray | None = field(default=None, repr=False)  # the frame, when the subscriber asked for it
    polygons: dict[int, list[np.ndarray]] | None = field(default=None, repr=False)  # anatomy outlines, frame pixels
    withheld: tuple[tuple[str, str], ...] = ()  # (output, why): run but not shown, e.g. ("phase", "not validated ...")

    def __post_init__(self):
        missing = [m for m in STAGE_MARKS[:-1] if m not in self.marks_ns]
        if missing:
            raise ValueError(f"frame {self.seq}: missing stage timestamps {missing}")

    @property
    def out_of_body(self) -> bool:
        return self.visibility is not None and self.visibility.out_of_body

    def latency_ms(self, start: str = "capture", end: str = "publish") -> float:
        return (self.marks_ns[end] - self.marks_ns[start]) / 1e6
