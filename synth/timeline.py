"""Surgery timelines: which phase when, and the events inside it.

Durations follow a log-normal per phase fitted to the real Cholec80 median and 90th
percentile, capped at the real maximum, then divided by the caller's time scale so a
35-minute surgery can become a 2-minute clip. The phase order is a walk over the real
Cholec80 transitions, weighted by how many videos show each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from or_agent.pipelines.errors import InputError
from or_agent.pipelines.surgery import CHOLEC80_VIDEOS, PHASE_DURATIONS, PHASE_ID, PHASE_TRANSITIONS, PHASES

_Z90 = 1.2815515655446004  # standard normal 90th percentile


@dataclass(frozen=True)
class PhaseSegment:
    phase: int
    start: int  # first frame
    end: int  # one past the last frame

    def __post_init__(self):
        if not 0 <= self.phase < len(PHASES):
            raise ValueError(f"phase id {self.phase} out of range")
        if self.end <= self.start:
            raise ValueError(f"empty phase segment [{self.start}, {self.end})")


@dataclass(frozen=True)
class Event:
    """Something that happens for a while: a bleed, smoke, fogging, the camera outside."""

    kind: str  # one of EVENT_KINDS
    start: int
    end: int

    def __post_init__(self):
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}")
        if self.end <= self.start:
            raise ValueError(f"empty {self.kind} event [{self.start}, {self.end})")

    def covers(self, frame: int) -> bool:
        return self.start <= frame < self.end


EVENT_KINDS = ("out_of_body", "smoke", "blur", "bleeding")


@dataclass(frozen=True)
class Timeline:
    fps: float
    segments: tuple[PhaseSegment, ...]
    events: tuple[Event, ...]

    @property
    def frames(self) -> int:
        return self.segments[-1].end

    def phase_at(self, frame: int) -> tuple[int, float]:
        """The phase id at ``frame`` and how far through its segment it is (0..1)."""
        for seg in self.segments:
            if seg.start <= frame < seg.end:
                return seg.phase, (frame - seg.start) / (seg.end - seg.start)
        raise IndexError(f"frame {frame} outside timeline of {self.frames} frames")

    def phases_seen_before(self, frame: int) -> frozenset[int]:
        return frozenset(s.phase for s in self.segments if s.start <= frame)

    def active(self, kind: str, frame: int) -> Event | None:
        for ev in self.events:
            if ev.kind == kind and ev.covers(frame):
                return ev
        return None

    def phase_per_frame(self) -> np.ndarray:
        out = np.empty(self.frames, np.int64)
        for seg in self.segments:
            out[seg.start:seg.end] = seg.phase
        return out


def _pick(rng: np.random.Generator, weighted: dict[str | None, float]) -> str | None:
    names = list(weighted)
    weights = np.array([weighted[n] for n in names], float)
    return names[rng.choice(len(names), p=weights / weights.sum())]


def sample_phase_order(rng: np.random.Generator) -> list[str]:
    """A walk over the real transitions; each branch weighted by its Cholec80 video count."""
    t = PHASE_TRANSITIONS
    order = []
    if rng.random() < PHASE_DURATIONS["Preparation"].videos_with_phase / CHOLEC80_VIDEOS:
        order.append("Preparation")
    order += ["CalotTriangleDissection", "ClippingCutting", "GallbladderDissection"]
    after_dissection = _pick(rng, {
        "GallbladderPackaging": t[("GallbladderDissection", "GallbladderPackaging")],
        "CleaningCoagulation": t[("GallbladderDissection", "CleaningCoagulation")],
    })
    if after_dissection == "CleaningCoagulation":
        order += ["CleaningCoagulation", "GallbladderPackaging"]
    else:
        order.append("GallbladderPackaging")
        order.append(_pick(rng, {
            "CleaningCoagulation": t[("GallbladderPackaging", "CleaningCoagulation")],
            "GallbladderRetraction": t[("GallbladderPackaging", "GallbladderRetraction")],
        }))
    if order[-1] != "GallbladderRetraction":
        order.append("GallbladderRetraction")
    back = t[("GallbladderRetraction", "CleaningCoagulation")]
    if _pick(rng, {"back": back, None: CHOLEC80_VIDEOS - back}) == "back":
        order += ["CleaningCoagulation", "GallbladderRetraction"]
    return order


def sample_duration_s(phase: str, rng: np.random.Generator) -> float:
    stats = PHASE_DURATIONS[phase]
    mu = math.log(stats.median_s)
    sigma = (math.log(stats.p90_s) - mu) / _Z90
    return float(min(math.exp(rng.normal(mu, sigma)), stats.max_s))


def _sample_events(rng, segments, fps, frames) -> list[Event]:
    """Events placed where they happen in real surgery, in frames of the scaled clip."""
    events: list[Event] = []

    def span(lo_s: float, hi_s: float) -> int:
        return max(2, int(round(rng.uniform(lo_s, hi_s) * fps)))

    for seg in segments:
        name = PHASES[seg.phase]
        length = seg.end - seg.start
        # Energy use makes smoke during dissection and coagulation.
        if name in ("CalotTriangleDissection", "GallbladderDissection", "CleaningCoagulation"):
            for _ in range(int(rng.integers(1, 3))):
                dur = min(span(1.5, 4.0), length // 3)
                if dur >= 2:
                    start = seg.start + int(rng.integers(0, length - dur))
                    events.append(Event("smoke", start, start + dur))
        if name in ("CalotTriangleDissection", "GallbladderDissection") and rng.random() < 0.6:
            dur = min(span(3.0, 8.0), length // 2)
            if dur >= 2:
                start = seg.start + int(rng.integers(0, length - dur))
                events.append(Event("bleeding", start, start + dur))
        if rng.random() < 0.25:
            dur = min(span(0.8, 2.0), length // 3)
            if dur >= 2:
                start = seg.start + int(rng.integers(0, length - dur))
                events.append(Event("blur", start, start + dur))
    # The camera comes out to be cleaned once or twice per surgery (never in the first second).
    for _ in range(int(rng.integers(1, 3))):
        dur = span(2.0, 5.0)
        if frames > 4 * dur:
            start = int(rng.integers(int(fps), frames - dur))
            events.append(Event("out_of_body", start, start + dur))
    events.sort(key=lambda e: (e.start, e.kind))
    return _drop_overlapping_out_of_body(events)


def _drop_overlapping_out_of_body(events: list[Event]) -> list[Event]:
    """Out of the body nothing else is visible, so other events are cut around it."""
    oob = [e for e in events if e.kind == "out_of_body"]
    kept: list[Event] = []
    for ev in events:
        if ev.kind != "out_of_body" and any(o.start < ev.end and ev.start < o.end for o in oob):
            continue
        if ev.kind == "out_of_body" and any(k.kind == "out_of_body" and k.start < ev.end and ev.start < k.end for k in kept):
            continue
        kept.append(ev)
    return kept


def sample_timeline(rng: np.random.Generator, fps: float = 25.0, time_scale: float = 20.0,
                    min_phase_s: float = 2.0) -> Timeline:
    """A random surgery. ``time_scale`` divides the real durations (20 turns ~35 min into ~1.7 min)."""
    if time_scale <= 0:
        raise InputError(f"time scale must be positive, got {time_scale}")
    if fps <= 0:
        raise InputError(f"fps must be positive, got {fps}")
    order = sample_phase_order(rng)
    segments = []
    start = 0
    for name in order:
        seconds = max(min_phase_s, sample_duration_s(name, rng) / time_scale)
        length = max(2, int(round(seconds * fps)))
        segments.append(PhaseSegment(PHASE_ID[name], start, start + length))
        start += length
    events = _sample_events(rng, segments, fps, start)
    return Timeline(fps=fps, segments=tuple(segments), events=tuple(events))
