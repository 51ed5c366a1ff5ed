"""What the calibration commands share: finding models and videos, reading labels, decoding
frames the way the pipeline does, and writing a converted model with its manifest."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from or_agent.pipelines.errors import DependencyError, InputError, ManifestError
from or_agent.pipelines.files import atomic_write_bytes, atomic_write_text
from or_agent.pipelines.manifest import MANIFEST_NAME, ModelManifest, discover, load_manifest, resolve_models_dir, sha256_of
from or_agent.pipelines.preprocess import ContentArea, ContentAreaTracker
from or_agent.pipelines.schedule import frame_stepper
from or_agent.pipelines.sources import video_files
from or_agent.pipelines.surgery import PHASES
from or_agent.synth.dataset import read_phase_file

VISIBILITY_STATES = ("in_body", "out_of_body", "smoke_or_blur")
MAX_OPSET = 17  # models/README.md: opset <= 17


def require_onnx():
    """The ``onnx`` package, or a one-line DependencyError saying how to get it."""
    try:
        import onnx
    except ImportError:
        raise DependencyError("calibration needs the onnx package: pip install 'or-agent[calibrate]' "
                              "(or pip install 'onnx>=1.15,<2')") from None
    return onnx


# -- models ------------------------------------------------------------------------------------

def precision_of(m: ModelManifest) -> str:
    return str(m.extra.get("precision", "fp32"))


def resolve_model(name: str, models_dir: str | os.PathLike | None = None) -> ModelManifest:
    """The model called ``name`` (its folder or its manifest's name) in ``models_dir``, hash-checked."""
    root = resolve_models_dir(models_dir)
    if not root.is_dir():
        raise InputError(f"{root}: models directory does not exist")
    manifests = []
    for p in sorted(root.glob(f"*/{MANIFEST_NAME}")):
        try:
            manifests.append(load_manifest(p))
        except ManifestError:
            continue  # a broken neighbour must not hide the model asked for; `or-agent models` reports it
    found = [m for m in manifests if m.path.parent.name == name] or [m for m in manifests if m.name == name]
    if not found:
        names = ", ".join(sorted({m.path.parent.name for m in manifests})) or "none"
        raise InputError(f"{name}: no such model in {root} (installed: {names})")
    found[0].verify_file()
    return found[0]


def fp32_model_names(name: str, models_dir: str | os.PathLike | None = None) -> list[str]:
    """The models a conversion command is asked for: ``all`` means every FP32 model in the models
    directory (converted ones are never converted again); any other name is the one model."""
    if name != "all":
        return [name]
    root = resolve_models_dir(models_dir)
    names = [p.parent.name for p in discover(root) if precision_of(load_manifest(p)) == "fp32"]
    if not names:
        raise InputError(f"{root}: no FP32 models to convert")
    return names


def manifest_doc(m: ModelManifest) -> dict:
    """The manifest's JSON document as written (keys the dataclass does not model included)."""
    return json.loads(m.path.read_text())


def derived_manifest(src: ModelManifest, name: str, precision: str, sha256: str, block: dict) -> dict:
    """A copy of ``src``'s manifest for a converted model.

    The source's held-out figures are those of the FP32 network, not of this one: they move to
    ``metrics.fp32_reference`` until ``or-agent calibrate compare`` measures this model. A
    temperature fitted on the source carries over into the new ``calibration`` block.
    """
    doc = manifest_doc(src)
    old_cal = doc.get("calibration") if isinstance(doc.get("calibration"), dict) else {}
    doc["name"] = name
    doc["file"] = "model.onnx"
    doc["sha256"] = sha256
    doc["precision"] = precision
    doc["metrics"] = {"fp32_reference": doc.get("metrics", {}),
                      "note": f"figures of the {src.name} model this one was converted from; "
                              "run `or-agent calibrate compare` to measure this one"}
    cal = dict(block)
    cal["source_model"] = {"name": src.name, "version": src.version, "sha256": src.sha256,
                           "precision": precision_of(src)}
    for key in ("temperature", "ece_before", "ece_after", "temperature_fit"):
        if key in old_cal:
            cal[key] = old_cal[key]
    if "temperature" in old_cal:
        cal["temperature_fitted_on"] = src.name
    doc["calibration"] = cal
    return doc


def strip_unused_opsets(model) -> None:
    """Drop opset imports no node uses (ONNX Runtime's optimiser adds every domain it knows)."""
    used = {n.domain or "" for n in model.graph.node}
    keep = [o for o in model.opset_import if (o.domain or "") in used or (o.domain or "") in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def toposort(model) -> None:
    """Order the graph's nodes so every input is produced before it is used (converters append
    their Casts at the end; the ONNX checker and some parsers want topological order)."""
    g = model.graph
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending = list(g.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ManifestError(f"graph has a cycle or an input nobody produces at node {rest[0].name or rest[0].op_type}")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del g.node[:]
    g.node.extend(copies)


def default_opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def check_model(model, where: str) -> None:
    onnx = require_onnx()
    opset = default_opset(model)
    if opset > MAX_OPSET:
        raise ManifestError(f"{where}: converted model has opset {opset}, the contract allows at most {MAX_OPSET}")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises ValidationError and friends
        raise ManifestError(f"{where}: converted model fails the ONNX checker ({str(exc).splitlines()[0]})") from None


def write_model_dir(out_root: str | os.PathLike, name: str, model_bytes: bytes, doc_fn) -> ModelManifest:
    """Write ``<out_root>/<name>/model.onnx`` and its ``manifest.json`` (``doc_fn(sha256) -> dict``),
    each atomically, and return the manifest as the agent will load it (validated, hash-checked)."""
    folder = Path(out_root) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: cannot create the output directory ({exc.strerror or exc})") from None
    model_path = folder / "model.onnx"
    atomic_write_bytes(model_path, model_bytes)
    doc = doc_fn(sha256_of(model_path))
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(doc, indent=2) + "\n")
    m = load_manifest(folder / MANIFEST_NAME)
    m.verify_file()
    return m


def update_manifest(path: str | os.PathLike, update) -> ModelManifest:
    """Apply ``update(doc)`` to a manifest's JSON in place (atomically) and re-validate it."""
    m = load_manifest(path)
    doc = manifest_doc(m)
    update(doc)
    atomic_write_text(m.path, json.dumps(doc, indent=2) + "\n")
    return load_manifest(m.path)


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"or-agent-{prefix}-")


# -- videos and their labels -------------------------------------------------------------------

def list_videos(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Video files named directly or found in directories (as ``or-agent replay`` takes them)."""
    if not paths:
        raise InputError("--videos: give at least one video file or directory")
    return video_files(paths)


@dataclass(frozen=True)
class VideoLabels:
    """Per-frame labels found next to a video; either may be missing."""

    phase: np.ndarray | None  # phase id per frame
    visibility: np.ndarray | None  # index into VISIBILITY_STATES per frame
    phase_file: Path | None = None
    flags_file: Path | None = None

    def phase_at(self, f: int) -> int | None:
        return int(self.phase[f]) if self.phase is not None and f < len(self.phase) else None

    def visibility_at(self, f: int) -> int | None:
        return int(self.visibility[f]) if self.visibility is not None and f < len(self.visibility) else None

    @property
    def frames(self) -> int | None:
        sizes = [len(a) for a in (self.phase, self.visibility) if a is not None]
        return max(sizes) if sizes else None


def read_flags(path: Path) -> tuple[np.ndarray | None, np.ndarray]:
    """``<name>-flags.csv`` (``frame,phase,out_of_body,smoke,blur,...``): phase ids (if the column is
    there) and visibility state per frame."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read flags ({getattr(exc, 'strerror', None) or exc})") from None
    header = [c.strip().lower() for c in (lines[0].split(",") if lines else [])]
    need = ("frame", "out_of_body", "smoke", "blur")
    if any(c not in header for c in need):
        raise InputError(f"{path}: not a flags file (header must name {', '.join(need)})")
    col = {c: header.index(c) for c in header}
    phase, vis = [], []
    for n, row in enumerate(lines[1:], start=2):
        if not row.strip():
            continue
        parts = row.split(",")
        try:
            values = [int(v) for v in parts]
            if values[col["frame"]] != len(vis):
                raise ValueError
        except (ValueError, IndexError):
            raise InputError(f"{path}:{n}: expected frame {len(vis)} and integer flags, got {row!r}") from None
        if values[col["out_of_body"]]:
            vis.append(1)
        elif values[col["smoke"]] or values[col["blur"]]:
            vis.append(2)
        else:
            vis.append(0)
        if "phase" in col:
            phase.append(values[col["phase"]])
    ph = np.array(phase, np.int64) if "phase" in col else None
    if ph is not None and ph.size and (ph.min() < 0 or ph.max() >= len(PHASES)):
        raise InputError(f"{path}: phase ids must be 0..{len(PHASES) - 1}")
    return ph, np.array(vis, np.int64)


def find_labels(video: Path) -> VideoLabels:
    """``<name>-phase.txt`` / ``<name>-phase.csv`` and ``<name>-flags.csv`` next to ``video``."""
    phase_file = next((c for c in (video.with_name(f"{video.stem}-phase.txt"), video.with_name(f"{video.stem}-phase.csv"))
                       if c.is_file()), None)
    flags_file = video.with_name(f"{video.stem}-flags.csv")
    flags_file = flags_file if flags_file.is_file() else None
    phase = read_phase_file(phase_file) if phase_file else None
    vis = None
    if flags_file:
        flag_phase, vis = read_flags(flags_file)
        if phase is None:
            phase = flag_phase
    return VideoLabels(phase, vis, phase_file, flags_file)


def _why_undecodable(video: Path) -> str:
    try:  # the replay's own diagnosis when available, so both commands say the same thing
        from or_agent.pipelines.sources import _undecodable_reason

        return _undecodable_reason(video)
    except Exception:
        return "unknown container or codec"


def open_video(video: Path) -> cv2.VideoCapture:
    """An opened capture, or a one-line InputError saying why not."""
    if not video.is_file():
        raise InputError(f"{video}: no such video file")
    if video.stat().st_size == 0:
        raise InputError(f"{video}: file is empty (no frames)")
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        cap.release()
        raise InputError(f"{video}: cannot decode the video ({_why_undecodable(video)})")
    return cap


def video_info(video: Path) -> tuple[float, int]:
    """(frames per second, frame count as the container says; 0 when unknown)."""
    cap = open_video(video)
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()
    return (fps if fps and np.isfinite(fps) and fps > 0 else 25.0), max(0, count)


def iter_video(video: Path, tracker_every: int = 25) -> Iterator[tuple[int, np.ndarray, ContentArea]]:
    """Every frame with the content area the pipeline's tracker gives it; a video without a single
    readable frame is an InputError."""
    cap = open_video(video)
    tracker = ContentAreaTracker(tracker_every)
    f = 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            yield f, frame, tracker.update(frame)
            f += 1
    finally:
        cap.release()
    if f == 0:
        raise InputError(f"{video}: no frames could be read from the video")


# -- stepping the phase model through a video ---------------------------------------------------

class OutOfBodyJudge:
    """Whether the pipeline would skip a frame as out of body: from the flags when the video has
    them, else from the installed visibility model (FP32), else never.

    One judge serves a whole command: set ``labels`` to each video's in turn; the visibility model is
    loaded at most once, and only if a video has no flags."""

    def __init__(self, labels: VideoLabels | None, models_dir=None, stage=None):
        self.labels = labels
        self._stage = stage
        self._models_dir = models_dir
        self._tried = stage is not None

    @property
    def source(self) -> str:
        if self.labels.visibility is not None:
            return "flags"
        return "visibility model" if self._load() is not None else "none"

    def _load(self):
        if not self._tried:
            self._tried = True
            try:
                from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
                from or_agent.pipelines.manifest import find_model
                from or_agent.pipelines.stages import VisibilityStage

                self._stage = VisibilityStage(OnnxRuntimeBackend(find_model("visibility", self._models_dir), threads=1))
            except Exception:  # no single usable visibility model: step on every frame
                self._stage = None
        return self._stage

    def __call__(self, f: int, frame: np.ndarray, area: ContentArea, model_says: bool | None = None) -> bool:
        """``model_says``: the visibility model's verdict on this frame when the caller already has it."""
        v = self.labels.visibility_at(f)
        if v is not None:
            return v == 1
        if self.labels.visibility is not None:
            return False  # past the end of the flags
        if model_says is not None and self._stage is not None:
            return model_says
        stage = self._load()
        return bool(stage is not None and stage(frame, area).out_of_body)


@dataclass
class PhaseStep:
    frame: int
    image: np.ndarray  # the model-sized crop, uint8 BGR (pre-normalisation)
    state: dict[str, np.ndarray]  # the state inputs this step was run with
    logits: np.ndarray  # the phase logits (1-D)


def phase_steps(video: Path, backend, judge: OutOfBodyJudge, fps: float | None = None) -> Iterator[PhaseStep]:
    """Step a phase model through a video as the pipeline does: on its cadence's frames (media time),
    skipping frames judged out of body, state carried from step to step, zeros at the start."""
    from or_agent.pipelines.preprocess import crop_resize, normalise

    m = backend.manifest
    if fps is None:
        fps = video_info(video)[0]
    steps = frame_stepper(m.cadence, fps)
    state = {s.name: np.zeros(s.shape, np.float32) for s in m.state_inputs}
    logit_name = next(o.name for o in m.outputs if o.state_of is None)
    for f, frame, area in iter_video(video):
        if not steps(f) or judge(f, frame, area):
            continue
        img = crop_resize(frame, area, m.input_spec.height, m.input_spec.width)
        out = backend.run({m.input.name: normalise(img, m.input_spec), **state})
        yield PhaseStep(f, img, state, np.asarray(out[logit_name], np.float64).ravel())
        state = {o.state_of: out[o.name] for o in m.outputs if o.state_of}
