"""Model stages: one interface for every model, and ``compose`` that wires them into a pipeline.

Every stage is split the MONAI way into ``pre_process`` (content crop, resize, normalise from the
manifest), ``predict`` (the backend; recurrent state carried here) and ``post_process`` (what the
numbers mean, as a typed estimate from ``pipelines.messages``). A stage declares what it consumes
and how the runtime treats it (``ModelStage``'s class attributes), so the runtime holds no model
semantics: it asks the frame schedule which stages are due, runs them, and publishes their estimates.
The stages do not care which backend runs the model, and ``predict`` takes whatever array type the
backend takes, so a GPU backend can keep tensors on the device between the three steps.

``compose`` makes the stages of a model set from its models by task; adding a task is one entry in
``STAGES`` (and its estimate in the messages module).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from or_agent.pipelines.backends import InferenceBackend
from or_agent.pipelines.cvs import CvsAssessor, check_structures, cvs_measurements
from or_agent.pipelines.errors import ManifestError, ModelError
from or_agent.pipelines.familiarity import FamiliarityCheck, SceneFamiliarity
from or_agent.pipelines.manifest import Task
from or_agent.pipelines.messages import (
    ClassificationEstimate,
    Estimate,
    PhaseEstimate,
    SegmentationEstimate,
    VisibilityEstimate,
)
from or_agent.pipelines.phase_filter import PhaseFilter, phase_filter_from
from or_agent.pipelines.postprocess import SegmentationReduction, reduce_logits, sigmoid, softmax
from or_agent.pipelines.preprocess import ContentArea, crop_resize, normalise
from or_agent.pipelines.schedule import Cadence


class ModelStage:
    """One model: what it consumes (a frame's content crop, at its cadence) and what it produces.

    How the runtime treats it is declared here, not in the runtime:

    * ``gate``: its estimate decides whether the others run on a frame (``blocks_others``), so it runs
      first and is post-processed at once; the one visibility model is the gate.
    * ``heavy``: runs on its own inference thread, beside the light models (segmentation).
    * ``holds_out_of_body``: while the gate blocks, its last estimate still stands (``carry``) instead
      of being withdrawn (the phase: the room says nothing about it, the surgery's phase has not changed).
    """

    task: ClassVar[Task]
    gate: ClassVar[bool] = False
    heavy: ClassVar[bool] = False
    holds_out_of_body: ClassVar[bool] = False

    def __init__(self, backend: InferenceBackend):
        self.backend = backend
        self.manifest = backend.manifest
        self.spec = self.manifest.input_spec
        if self.manifest.task != self.task:
            raise ModelError(f"{self.manifest.path}: a {self.task} stage needs a task {str(self.task)!r} model, "
                             f"not {str(self.manifest.task)!r}")
        self.names = tuple(lab.name for lab in self.manifest.labels)

    @property
    def name(self) -> str:
        """The model's name: how its results, schedule slot and rules refer to it."""
        return self.manifest.name

    @property
    def cadence(self) -> Cadence:
        return self.manifest.cadence

    def reset(self) -> None:
        """Start of a case: forget everything carried from the last one."""

    def pre_process(self, frame: np.ndarray, area: ContentArea) -> np.ndarray:
        return normalise(crop_resize(frame, area, self.spec.height, self.spec.width), self.spec)

    def predict(self, x: Any) -> Any:
        return self._single_output(self.backend.run({self.manifest.input.name: x}))

    def infer(self, x: Any, frame_path: Any = None) -> Any:
        """``predict`` as the runtime calls it, on the inference thread, with the frame path that made ``x``."""
        return self.predict(x)

    def post_process(self, raw: Any, area: ContentArea, t_s: float) -> Estimate:
        raise NotImplementedError

    def carry(self, estimate: Estimate, t_s: float) -> Estimate:
        """The last estimate, shown on a frame the model did not run on (media time ``t_s``)."""
        return estimate

    def blocks_others(self, estimate: Estimate) -> bool:
        """For the gate: the other models must not run on (or be shown for) this frame."""
        return False

    def __call__(self, frame: np.ndarray, area: ContentArea, t_s: float = 0.0) -> Estimate:
        return self.post_process(self.predict(self.pre_process(frame, area)), area, t_s)

    @property
    def output_name(self) -> str:
        """The model's one result tensor (recurrent state outputs aside)."""
        names = [o.name for o in self.manifest.outputs if o.state_of is None]
        if len(names) != 1:
            raise ModelError(f"{self.manifest.path}: expected exactly one non-state output, found {names}")
        return names[0]

    def _single_output(self, outputs: dict) -> np.ndarray:
        return outputs[self.output_name]


@dataclass(frozen=True)
class PhaseOutputs:
    """One step of a phase model that also says how familiar the scene is: what ``PhaseStage.predict``
    returns for such a model (for one without, the phase logits alone)."""

    logits: np.ndarray
    feature_distance: float


class PhaseStage(ModelStage):
    """Streams the recurrent phase model one step at a time and filters its output (``pipelines.phase_filter``,
    stepped by the media time between steps); with a ``familiarity`` block in its manifest, also whether the
    scene is one it knows (``pipelines.familiarity``)."""

    task = Task.PHASE
    holds_out_of_body = True

    def __init__(self, backend: InferenceBackend, phase_filter: PhaseFilter | None = None):
        super().__init__(backend)
        check = FamiliarityCheck.of(self.manifest)
        self.familiarity = SceneFamiliarity(check) if check else None
        self.filter = phase_filter or phase_filter_from(self.manifest.extra.get("temporal_filter", {}),
                                                        f"{self.manifest.path}: temporal_filter", len(self.names))
        _ = self.output_name  # a model whose outputs do not say which is the phase fails now, not at its first frame
        # Confidence calibration (temperature scaling, fitted by `or-agent calibrate temperature`).
        cal = self.manifest.extra.get("calibration")
        t = cal.get("temperature", 1.0) if isinstance(cal, dict) else 1.0
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ManifestError(f"{self.manifest.path}: calibration.temperature: must be a positive number, got {t!r}")
        self.temperature = float(t)
        self.reset()

    def reset(self) -> None:
        """Start of a case: zero state, fresh filter, a familiar scene."""
        self._state = {s.name: np.zeros(s.shape, np.float32) for s in self.manifest.state_inputs}
        self.filter.reset()
        if self.familiarity is not None:
            self.familiarity.reset()
        self._phase: int | None = None
        self._entered_s = 0.0
        self._stepped_s: float | None = None

    @property
    def output_name(self) -> str:
        """The phase logits: the one result tensor besides the familiarity output (and the state)."""
        familiarity = self.familiarity.check.output if self.familiarity else None
        names = [o.name for o in self.manifest.outputs if o.state_of is None and o.name != familiarity]
        if len(names) != 1:
            raise ModelError(f"{self.manifest.path}: expected exactly one phase output besides the state"
                             + (f" and familiarity ({familiarity})" if familiarity else "") + f", found {names}")
        return names[0]

    def predict(self, x: np.ndarray) -> np.ndarray | PhaseOutputs:
        out = self.backend.run({self.manifest.input.name: x, **self._state})
        self._state = {o.state_of: out[o.name] for o in self.manifest.outputs if o.state_of}
        if self.familiarity is None:
            return self._single_output(out)
        return PhaseOutputs(self._single_output(out), float(np.asarray(out[self.familiarity.check.output]).ravel()[0]))

    def post_process(self, raw: np.ndarray | PhaseOutputs, area: ContentArea | None = None,
                     t_s: float = 0.0) -> PhaseEstimate:
        logits = raw.logits if isinstance(raw, PhaseOutputs) else raw
        probs = softmax(np.asarray(logits, np.float64).ravel() / self.temperature)
        familiar, distance = True, None
        if isinstance(raw, PhaseOutputs) and self.familiarity is not None:
            # not a number counts as far; the estimate carries it as infinitely far
            distance = raw.feature_distance if not np.isnan(raw.feature_distance) else float("inf")
            familiar = self.familiarity.update(raw.feature_distance)
        # Media time between steps: 0 on the first, and where it went back (a source that restarted its clock).
        # In an unfamiliar scene the model's probabilities are not evidence: the filter steps on without them
        # (the belief moves only with time), so a stretch of nonsense cannot carry it to a wrong phase that
        # outlasts the pause.
        f = self.filter.update(probs if familiar else None,
                               0.0 if self._stepped_s is None else max(0.0, t_s - self._stepped_s))
        if f.phase != self._phase:
            self._phase, self._entered_s = f.phase, t_s
        self._stepped_s = t_s
        return PhaseEstimate(f.phase, self.names[f.phase], min(1.0, f.confidence), tuple(float(p) for p in probs),
                             int(np.argmax(probs)), t_s - self._entered_s, self.name, familiar, distance)

    def carry(self, estimate: Estimate, t_s: float) -> Estimate:
        # Between steps the phase holds; its clock keeps running with the media.
        assert isinstance(estimate, PhaseEstimate)
        return replace(estimate, time_in_phase_s=estimate.time_in_phase_s + (t_s - (self._stepped_s or 0.0)))


def draw_min_confidence(manifest) -> float:
    """A segmentation manifest's ``draw_min_confidence`` (0: every class drawn): the mean probability
    below which a class's region is not drawn, chosen where its regions are measured more often wrong."""
    value = manifest.extra.get("draw_min_confidence", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ModelError(f"{manifest.path}: draw_min_confidence must be a number in [0, 1), got {value!r}")
    return float(value)


class SegmentationStage(ModelStage):
    """Per-pixel classes; with a ``cvs`` block in its manifest, the Critical View of Safety assessed on them."""

    task = Task.SEGMENTATION
    heavy = True

    def __init__(self, backend: InferenceBackend):
        super().__init__(backend)
        self.classes = len(self.names)
        try:  # a model with the CVS structures may carry its assessor (pipelines.cvs)
            self.cvs = CvsAssessor.from_dict(self.manifest.extra["cvs"]) if "cvs" in self.manifest.extra else None
            if self.cvs is not None:
                check_structures(self.names)
        except ValueError as exc:
            raise ModelError(f"{self.manifest.path}: {exc}") from None
        self.draw_min_confidence = draw_min_confidence(self.manifest)

    def predict(self, x, on_device: bool = False):
        """Logits on the host; with ``on_device`` and a backend that can, a ``DeviceTensor`` in the
        engine's output buffer (valid until the next call) for the GPU reduction."""
        name = self.output_name
        if on_device and self.backend.device_outputs:
            return self.backend.run({self.manifest.input.name: x}, device_outputs=(name,))[name]
        return self.backend.run({self.manifest.input.name: x})[name]

    def infer(self, x, frame_path=None):
        if frame_path is None:
            return self.predict(x)
        # Reduced here when the logits are on the device: the engine reuses that buffer next frame.
        return frame_path.reduce(self.predict(x, on_device=frame_path.reduces_on_device))

    def post_process(self, raw: np.ndarray | SegmentationReduction, area: ContentArea, t_s: float = 0.0) -> SegmentationEstimate:
        r = raw if isinstance(raw, SegmentationReduction) else SegmentationReduction(*reduce_logits(raw))
        if len(r.counts) != self.classes:
            raise ModelError(f"{self.manifest.name}: {len(r.counts)} classes in the output, the manifest labels {self.classes}")
        cvs: tuple[tuple[str, float], ...] = ()
        if self.cvs is not None:
            cvs = tuple(self.cvs.probabilities(cvs_measurements(r.class_map, self.names)).items())
        return SegmentationEstimate(r.class_map, area, tuple((r.counts / r.class_map.size).tolist()),
                                    tuple(r.confidence.tolist()), cvs, self.name, self.names, self.draw_min_confidence)


class VisibilityStage(ModelStage):
    """Out of body / low visibility: the gate. Between its runs its verdict holds."""

    task = Task.VISIBILITY
    gate = True

    def __init__(self, backend: InferenceBackend, threshold: float = 0.5):
        super().__init__(backend)
        self.threshold = threshold

    def post_process(self, raw: np.ndarray, area: ContentArea | None = None, t_s: float = 0.0) -> VisibilityEstimate:
        p = sigmoid(np.asarray(raw, np.float64).ravel())
        return VisibilityEstimate(float(p[0]), float(p[1]), self.threshold, self.name)

    def blocks_others(self, estimate: Estimate) -> bool:
        return isinstance(estimate, VisibilityEstimate) and estimate.out_of_body


ACTIVATIONS = ("sigmoid", "softmax")


class ClassificationStage(ModelStage):
    """Image-level labels with probabilities (e.g. the Critical View of Safety criteria): independent
    labels (``"activation": "sigmoid"``, the default) or one of several (``"softmax"``)."""

    task = Task.CLASSIFICATION

    def __init__(self, backend: InferenceBackend):
        super().__init__(backend)
        self.activation = self.manifest.extra.get("activation", "sigmoid")
        if self.activation not in ACTIVATIONS:
            raise ManifestError(f"{self.manifest.path}: activation: must be one of {', '.join(ACTIVATIONS)}, "
                                f"got {self.activation!r}")

    def post_process(self, raw: np.ndarray, area: ContentArea | None = None, t_s: float = 0.0) -> ClassificationEstimate:
        logits = np.asarray(raw, np.float64).ravel()
        if logits.size != len(self.names):
            raise ModelError(f"{self.manifest.name}: {logits.size} outputs, the manifest labels {len(self.names)}")
        p = sigmoid(logits) if self.activation == "sigmoid" else softmax(logits)
        return ClassificationEstimate(self.name, self.name, self.names, tuple(float(v) for v in p))


# What each task's models become: one entry per task.
STAGES: dict[Task, type[ModelStage]] = {
    Task.VISIBILITY: VisibilityStage,
    Task.PHASE: PhaseStage,
    Task.SEGMENTATION: SegmentationStage,
    Task.CLASSIFICATION: ClassificationStage,
}
ONE_PER_SET = (Task.VISIBILITY, Task.PHASE)  # the gate and the phase are one each; the others any number


@dataclass(frozen=True)
class StageGraph:
    """A model set's stages, wired: the gate first, then the light models on one inference thread and
    the heavy ones on another; ``stages`` in the set's order (how results list them)."""

    stages: tuple[ModelStage, ...]
    light: tuple[ModelStage, ...]  # the gate (if any) first
    heavy: tuple[ModelStage, ...]

    @property
    def gate(self) -> ModelStage | None:
        """The stage whose verdict decides whether the others run (compose puts it first)."""
        return self.light[0] if self.light and self.light[0].gate else None

    def by_task(self, task: Task) -> list[ModelStage]:
        return [s for s in self.stages if s.task == task]

    def one(self, task: Task) -> ModelStage | None:
        found = self.by_task(task)
        return found[0] if found else None

    @property
    def backends(self) -> list[InferenceBackend]:
        return [s.backend for s in self.stages]

    def reset(self) -> None:
        for s in self.stages:
            s.reset()

    def close(self) -> None:
        for s in self.stages:
            s.backend.close()


def compose(parts: Sequence[InferenceBackend | ModelStage]) -> StageGraph:
    """The stages for a set's models (backends made into the stage their task names; stages as given),
    checked: at least one model, names unique, at most one of each task in ``ONE_PER_SET``."""
    stages = tuple(p if isinstance(p, ModelStage) else STAGES[Task(p.manifest.task)](p) for p in parts)
    if not stages:
        raise ModelError("a pipeline needs at least one model")
    names = [s.name for s in stages]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ModelError(f"two models are named {dup[0]!r}: results and rules tell models apart by name")
    for task in ONE_PER_SET:
        found = [s.name for s in stages if s.task == task]
        if len(found) > 1:
            raise ModelError(f"more than one {task} model ({', '.join(found)}): a set has at most one")
    gates = [s for s in stages if s.gate]
    light = tuple(gates) + tuple(s for s in stages if not s.heavy and not s.gate)
    return StageGraph(stages, light, tuple(s for s in stages if s.heavy))
