"""Which models run on a frame: one frame schedule on media time, for every frame loop.

Every model declares its **cadence** in its manifest: ``"every frame"``, ``"every K frames"`` or
``"N Hz"`` (steps per second of media time). ``FrameSchedule`` turns the cadences of a set's models
into a decision per frame, and the live runtime, replay (through the runtime), calibration and the
benchmarks all ask it, so a model steps on the same frames wherever it runs.

The decision follows media time, never sequence numbers: a live source that drops frames skips
sequence numbers, and "every k-th sequence number" could then starve a model; "every K frames" means
every K frame periods of media time, so the model runs on the first frame at or after each due time.
After a gap in the media (frames dropped, a stall) a model is not run twice to catch up: its next due
time is counted from the frame that ran.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_EVERY_FRAME = re.compile(r"every frame")
_EVERY_K = re.compile(r"every (\d+) frames")
_HZ = re.compile(r"(\d+(?:\.\d+)?) Hz")
DEFAULT_FPS = 25.0  # frame period assumed for "every K frames" until a source without a nominal rate shows its own


@dataclass(frozen=True)
class Cadence:
    """How often a model runs: every ``every_frames``-th frame period, or ``hz`` times per second."""

    every_frames: int = 1
    hz: float | None = None

    def __post_init__(self):
        if self.hz is not None and not (self.hz > 0 and self.every_frames == 1):
            raise ValueError(f"a cadence in Hz must be positive and alone, got {self.hz} Hz every {self.every_frames} frames")
        if self.every_frames < 1:
            raise ValueError(f"a cadence of every K frames needs K >= 1, got {self.every_frames}")

    @classmethod
    def parse(cls, text: str) -> Cadence:
        """``"every frame"``, ``"every 3 frames"`` or ``"5 Hz"``; ValueError naming the forms otherwise."""
        t = str(text).strip()
        if _EVERY_FRAME.fullmatch(t):
            return cls()
        if m := _EVERY_K.fullmatch(t):
            return cls(every_frames=int(m.group(1)))
        if m := _HZ.fullmatch(t):
            return cls(hz=float(m.group(1)))
        raise ValueError(f"cadence must be 'every frame', 'every K frames' or 'N Hz', got {text!r}")

    @property
    def every_frame(self) -> bool:
        return self.hz is None and self.every_frames == 1

    def step_ms(self, frame_ms: float) -> float:
        return 1000.0 / self.hz if self.hz is not None else self.every_frames * frame_ms

    def __str__(self) -> str:
        if self.hz is not None:
            return f"{self.hz:g} Hz"
        return "every frame" if self.every_frames == 1 else f"every {self.every_frames} frames"


class FrameSchedule:
    """Decides, frame by frame on media time, which of the named models run.

    ``nominal_fps`` is the source's frame rate when it declares one; otherwise the frame period is
    measured from the media times seen (the median of the recent intervals)."""

    def __init__(self, cadences: Mapping[str, Cadence], nominal_fps: float | None = None):
        if nominal_fps is not None and not nominal_fps > 0:
            raise ValueError(f"nominal_fps must be positive, got {nominal_fps}")
        self.cadences = dict(cadences)
        self._nominal_ms = 1000.0 / nominal_fps if nominal_fps else None
        self.reset()

    def reset(self) -> None:
        """Back to the start of a case: every model is due on the first frame."""
        self._beat_ms: dict[str, float | None] = dict.fromkeys(self.cadences)
        self._last_media_ms: float | None = None
        self._intervals: list[float] = []

    @property
    def frame_ms(self) -> float:
        if self._nominal_ms is not None:
            return self._nominal_ms
        if not self._intervals:
            return 1000.0 / DEFAULT_FPS
        return sorted(self._intervals)[len(self._intervals) // 2]

    def due(self, media_ms: float) -> frozenset[str]:
        """The models that run on the frame at ``media_ms`` (media times must not go back); ``only``
        limits the answer to models that can run on this frame (the others' clocks do not advance, so
        they run on the next frame that allows them)."""
        if self._last_media_ms is not None:
            gap = media_ms - self._last_media_ms
            if gap < 0:
                raise ValueError(f"media time went back from {self._last_media_ms} to {media_ms} ms")
            if gap > 0 and self._nominal_ms is None:
                self._intervals = (self._intervals + [gap])[-15:]
        self._last_media_ms = media_ms
        frame_ms = self.frame_ms
        out = []
        for name in self.cadences:
            cadence = self.cadences[name]
            if cadence.every_frame:
                out.append(name)
                continue
            beat = self._beat_ms[name]  # the beat of its last run (None: it has not run yet)
            step = cadence.step_ms(frame_ms)  # with the frame period known now, for "every K frames"
            # "every K frames" counts frame periods, so a timestamp rounded below its frame's time (a
            # container's 79.99999 ms) still counts as that frame; a rate in Hz steps on the first frame at
            # or after each beat
            slack = frame_ms / 4 if cadence.hz is None else 0.0
            if beat is None or media_ms + slack >= beat + step:
                # on the beat, the next beat keeps the grid (no drift); a whole beat late, it restarts here
                self._beat_ms[name] = beat + step if beat is not None and media_ms - (beat + step) < step else media_ms
                out.append(name)
        return frozenset(out)


def frame_stepper(cadence: Cadence, fps: float) -> Callable[[int], bool]:
    """For a file decoded frame by frame at ``fps`` (offline evaluation, calibration): call it with each
    frame index in order; it says whether the model runs on that frame, as the runtime's schedule
    decides on the frame's media time."""
    schedule = FrameSchedule({"model": cadence}, fps)
    return lambda f: "model" in schedule.due(f * 1000.0 / fps)
