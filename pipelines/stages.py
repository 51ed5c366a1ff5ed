"""Model stages: what each model's numbers mean, as typed results.

Each stage is split the MONAI way into ``pre_process`` (content crop, resize, normalise from
the manifest), ``predict`` (the backend; recurrent state carried here) and ``post_process``
(probabilities, filtering, areas). The stages do not care which backend runs the model, and
``predict`` takes whatever array type the backend takes, so a GPU backend can keep tensors on
the device between the three steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from or_agent.pipelines.backends import InferenceBackend
from or_agent.pipelines.cvs import CvsAssessor, check_structures, cvs_measurements
from or_agent.pipelines.errors import ManifestError, ModelError
from or_agent.pipelines.phase_filter import PhaseFilter
from or_agent.pipelines.preprocess import ContentArea, crop_resize, normalise


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


CONF_SUBSAMPLE = 4  # segmentation confidence is averaged on a 4x4-subsampled grid


def reduce_logits(logits: np.ndarray, sub: int = CONF_SUBSAMPLE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segmentation logits ([1,C,H,W] or [C,H,W]) -> (uint8 class map HxW, int64 pixel counts [C],
    float64 per-class confidence [C]). The CPU definition; the GPU reduction kernel is checked against it.

    Confidence is the mean winning (max-softmax) probability over a class's pixels on a
    ``sub`` x ``sub``-subsampled grid: the mean of a region barely changes, and the exponentials cost
    16x less. A class present only between grid points gets 0.5; an absent one 0."""
    lg = np.asarray(logits, np.float32)
    lg = lg[0] if lg.ndim == 4 else lg
    classes = lg.shape[0]
    class_map = lg.argmax(0).astype(np.uint8)
    counts = np.bincount(class_map.ravel(), minlength=classes)
    s, sm = lg[:, ::sub, ::sub], class_map[::sub, ::sub]
    top = np.take_along_axis(s, sm[None].astype(np.int64), 0)[0]
    p_win = 1.0 / np.exp(s - top[None]).sum(0)  # = max softmax probability
    sub_counts = np.bincount(sm.ravel(), minlength=classes)
    sums = np.bincount(sm.ravel(), weights=p_win.ravel(), minlength=classes)
    return class_map, counts, class_confidence(counts, sub_counts, sums)


def class_confidence(counts: np.ndarray, sub_counts: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Per-class confidence from the pixel counts and, on the subsampled grid, the counts and summed
    winning probabilities (shared by the CPU reduction and the GPU kernel's host side)."""
    return np.where(sub_counts > 0, sums / np.maximum(sub_counts, 1), np.where(counts > 0, 0.5, 0.0))


@dataclass(frozen=True)
class AnatomyReduction:
    """Segmentation logits reduced to what the anatomy stage reports, by ``reduce_logits`` on the
    CPU or by the GPU kernel next to the engine's output (then only this crosses to the host)."""

    class_map: np.ndarray = field(repr=False)  # uint8 HxW class ids
    counts: np.ndarray  # int64 [C] pixels per class
    confidence: np.ndarray  # float64 [C]

    def __post_init__(self):
        if self.class_map.ndim != 2 or self.class_map.dtype != np.uint8:
            raise ValueError("class_map must be a 2-D uint8 array")
        if self.counts.shape != self.confidence.shape or self.counts.ndim != 1:
            raise ValueError("counts and confidence must be 1-D with one value per class")
        if int(self.counts.sum()) != self.class_map.size:
            raise ValueError(f"counts add up to {int(self.counts.sum())}, the class map has {self.class_map.size} pixels")


@dataclass(frozen=True)
class PhaseEstimate:
    phase: int  # filtered phase id
    name: str
    confidence: float  # smoothed probability of the filtered phase
    probabilities: tuple[float, ...]  # this step's model probabilities
    raw_phase: int  # this step's argmax, before the temporal filter
    time_in_phase_s: float

    def __post_init__(self):
        if not 0 <= self.phase < len(self.probabilities):
            raise ValueError(f"phase {self.phase} outside the {len(self.probabilities)} phases")
        if not 0.0 <= self.confidence <= 1.0 + 1e-6:
            raise ValueError(f"confidence {self.confidence} outside [0, 1]")


@dataclass(frozen=True)
class AnatomyEstimate:
    class_map: np.ndarray = field(repr=False)  # model-sized uint8 class ids
    area: ContentArea
    area_fraction: tuple[float, ...]  # per class, fraction of the content crop
    confidence: tuple[float, ...]  # per class, mean probability over its pixels (0 if absent)
    # the Critical View of Safety criteria and their probabilities, where the model assesses it
    cvs: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.class_map.ndim != 2 or self.class_map.dtype != np.uint8:
            raise ValueError("class_map must be a 2-D uint8 array")
        if len(self.area_fraction) != len(self.confidence):
            raise ValueError("area_fraction and confidence must have one value per class")

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

    @property
    def out_of_body(self) -> bool:
        return self.p_out_of_body > self.threshold

    @property
    def low_visibility(self) -> bool:
        return not self.out_of_body and self.p_low_visibility > self.threshold


class _Stage:
    def __init__(self, backend: InferenceBackend):
        self.backend = backend
        self.manifest = backend.manifest
        self.spec = self.manifest.input_spec

    def pre_process(self, frame: np.ndarray, area: ContentArea) -> np.ndarray:
        return normalise(crop_resize(frame, area, self.spec.height, self.spec.width), self.spec)

    @property
    def output_name(self) -> str:
        """The model's one result tensor (recurrent state outputs aside)."""
        names = [o.name for o in self.manifest.outputs if o.state_of is None]
        if len(names) != 1:
            raise ModelError(f"{self.manifest.path}: expected exactly one non-state output, found {names}")
        return names[0]

    def _single_output(self, outputs: dict) -> np.ndarray:
        return outputs[self.output_name]


class PhaseStage(_Stage):
    """Streams the recurrent phase model one step at a time and filters its output."""

    def __init__(self, backend: InferenceBackend, phase_filter: PhaseFilter | None = None):
        super().__init__(backend)
        if self.manifest.task != "phase":
            raise ModelError(f"{self.manifest.path}: a phase stage needs a task 'phase' model, not {self.manifest.task!r}")
        cfg = self.manifest.extra.get("temporal_filter", {})
        self.filter = phase_filter or PhaseFilter(smoothing=cfg.get("smoothing", 0.5), hold=cfg.get("hold_steps", 2),
                                                  margin=cfg.get("margin", 0.05))
        self.names = tuple(label.name for label in self.manifest.labels)
        # Confidence calibration (temperature scaling, fitted by `or-agent calibrate temperature`).
        cal = self.manifest.extra.get("calibration")
        t = cal.get("temperature", 1.0) if isinstance(cal, dict) else 1.0
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ManifestError(f"{self.manifest.path}: calibration.temperature: must be a positive number, got {t!r}")
        self.temperature = float(t)
        self.reset()

    def reset(self) -> None:
        """Start of a case: zero state, fresh filter."""
        self._state = {s.name: np.zeros(s.shape, np.float32) for s in self.manifest.state_inputs}
        self.filter.reset()
        self._phase: int | None = None
        self._entered_s = 0.0

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = self.backend.run({self.manifest.input.name: x, **self._state})
        self._state = {o.state_of: out[o.name] for o in self.manifest.outputs if o.state_of}
        return self._single_output(out)

    def post_process(self, logits: np.ndarray, t_s: float) -> PhaseEstimate:
        probs = softmax(np.asarray(logits, np.float64).ravel() / self.temperature)
        f = self.filter.update(probs)
        if f.phase != self._phase:
            self._phase, self._entered_s = f.phase, t_s
        return PhaseEstimate(f.phase, self.names[f.phase], min(1.0, f.confidence), tuple(float(p) for p in probs),
                             int(np.argmax(probs)), t_s - self._entered_s)

    def __call__(self, frame: np.ndarray, area: ContentArea, t_s: float) -> PhaseEstimate:
        return self.post_process(self.predict(self.pre_process(frame, area)), t_s)


class AnatomyStage(_Stage):
    def __init__(self, backend: InferenceBackend):
        super().__init__(backend)
        if self.manifest.task != "segmentation":
            raise ModelError(f"{self.manifest.path}: an anatomy stage needs a task 'segmentation' model, not {self.manifest.task!r}")
        self.classes = len(self.manifest.labels)
        self.names = tuple(lab.name for lab in self.manifest.labels)
        try:  # a model with the CVS structures may carry its assessor (pipelines.cvs)
            self.cvs = CvsAssessor.from_dict(self.manifest.extra["cvs"]) if "cvs" in self.manifest.extra else None
            if self.cvs is not None:
                check_structures(self.names)
        except ValueError as exc:
            raise ModelError(f"{self.manifest.path}: {exc}") from None

    def predict(self, x, on_device: bool = False):
        """Logits on the host; with ``on_device`` and a backend that can, a ``DeviceTensor`` in the
        engine's output buffer (valid until the next call) for the GPU reduction."""
        name = self.output_name
        if on_device and self.backend.device_outputs:
            return self.backend.run({self.manifest.input.name: x}, device_outputs=(name,))[name]
        return self.backend.run({self.manifest.input.name: x})[name]

    def post_process(self, logits: np.ndarray | AnatomyReduction, area: ContentArea) -> AnatomyEstimate:
        r = logits if isinstance(logits, AnatomyReduction) else AnatomyReduction(*reduce_logits(logits))
        if len(r.counts) != self.classes:
            raise ModelError(f"{self.manifest.name}: {len(r.counts)} classes in the output, the manifest labels {self.classes}")
        cvs = ()
        if self.cvs is not None:
            cvs = tuple(self.cvs.probabilities(cvs_measurements(r.class_map, self.names)).items())
        return AnatomyEstimate(r.class_map, area, tuple((r.counts / r.class_map.size).tolist()), tuple(r.confidence.tolist()),
                               cvs)

    def __call__(self, frame: np.ndarray, area: ContentArea) -> AnatomyEstimate:
        return self.post_process(self.predict(self.pre_process(frame, area)), area)


class VisibilityStage(_Stage):
    def __init__(self, backend: InferenceBackend, threshold: float = 0.5):
        super().__init__(backend)
        if self.manifest.task != "visibility":
            raise ModelError(f"{self.manifest.path}: a visibility stage needs a task 'visibility' model, not {self.manifest.task!r}")
        self.threshold = threshold

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._single_output(self.backend.run({self.manifest.input.name: x}))

    def post_process(self, logits: np.ndarray) -> VisibilityEstimate:
        p = sigmoid(np.asarray(logits, np.float64).ravel())
        return VisibilityEstimate(float(p[0]), float(p[1]), self.threshold)

    def __call__(self, frame: np.ndarray, area: ContentArea) -> VisibilityEstimate:
        return self.post_process(self.predict(self.pre_process(frame, area)))
