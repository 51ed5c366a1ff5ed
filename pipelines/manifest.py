"""Model manifests: the contract between a model file and the agent.

Every model (ours or a hospital's own) sits next to a ``manifest.json`` that says what the
model is, what input it wants and how to normalise it, what its outputs mean, which tensors
carry recurrent state, its labels and their display colours, the sha256 of the ONNX file,
how it was trained, and what it scored on held-out data. The schema is documented in
``models/README.md``; this module validates it and names the file and field at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from or_agent.pipelines.errors import ManifestError
from or_agent.pipelines.preprocess import InputSpec
from or_agent.pipelines.schedule import Cadence

SCHEMA = "or-agent/model-manifest/v1"
MANIFEST_NAME = "manifest.json"
SET_FILE = "model-set.json"
SETS_ROOT = Path(__file__).resolve().parent.parent / "models"  # where the bundled model sets live
DEFAULT_SET = "synthetic"


class Task(str, Enum):
    """What a model computes; a manifest's ``task``. (A ``str`` so that it is its own JSON value.)"""

    SEGMENTATION = "segmentation"  # per-pixel classes (anatomy, tools)
    PHASE = "phase"  # the surgical phase, a recurrent model stepped on media time
    VISIBILITY = "visibility"  # out of body / low visibility: decides whether the others' outputs count
    CLASSIFICATION = "classification"  # image-level labels with probabilities (e.g. CVS criteria)

    def __str__(self) -> str:
        return self.value


TASKS = tuple(t.value for t in Task)


@dataclass(frozen=True)
class DatasetRef:
    """A dataset a model was trained on, with the terms its use inherits."""

    name: str
    license: str
    attribution: str

    def __post_init__(self):
        for key in ("name", "license", "attribution"):
            if not str(getattr(self, key)).strip():
                raise ValueError(f"{key} is empty")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    meaning: str
    state_of: str | None = None  # for a state output: the input it feeds on the next step

    def __post_init__(self):
        if not self.name:
            raise ValueError("tensor name is empty")
        if not self.shape or any((not isinstance(d, int)) or d < 1 for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: shape must be positive integers, got {self.shape}")


@dataclass(frozen=True)
class Label:
    id: int
    name: str
    color: tuple[int, int, int]  # RGB

    def __post_init__(self):
        if len(self.color) != 3 or any(not 0 <= c <= 255 for c in self.color):
            raise ValueError(f"label {self.name!r}: color must be three values 0..255")


@dataclass(frozen=True)
class ModelManifest:
    path: Path  # the manifest file
    name: str
    version: str
    task: str
    file: str  # ONNX file, relative to the manifest
    sha256: str
    input: TensorSpec
    input_spec: InputSpec
    state_inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[Label, ...]
    license: str = ""
    datasets: tuple[DatasetRef, ...] = ()
    cadence: Cadence = Cadence()
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return self.path.parent / self.file

    def output(self, name: str) -> TensorSpec:
        for o in self.outputs:
            if o.name == name:
                return o
        raise ManifestError(f"{self.path}: outputs: no output named {name!r}")

    def verify_file(self) -> None:
        """Check that the ONNX file exists and its sha256 is the manifest's."""
        p = self.model_path
        if not p.is_file():
            raise ManifestError(f"{self.path}: file: model file {p} does not exist")
        digest = sha256_of(p)
        if digest != self.sha256:
            raise ManifestError(f"{self.path}: sha256: {p.name} has sha256 {digest[:16]}..., "
                                f"manifest says {self.sha256[:16]}... (file changed or corrupt)")


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Reader:
    """Field access that names the manifest and the field on any problem."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, problem: str) -> ManifestError:
        return ManifestError(f"{self.path}: {where}: {problem}")

    def get(self, obj: dict, key: str, kind, where: str, required: bool = True, default=None):
        full = f"{where}.{key}" if where else key
        if key not in obj:
            if required:
                raise self.fail(full, "missing")
            return default
        value = obj[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise self.fail(full, f"must be {names}, got {type(value).__name__}")
        return value

    def objects(self, doc: dict, key: str, not_an_object: str, build: Callable[[dict, str], Any]) -> list:
        """The list ``doc[key]`` of JSON objects, each made with ``build(obj, where)``; errors name the item."""
        out = []
        for i, obj in enumerate(self.get(doc, key, list, "")):
            where = f"{key}[{i}]"
            if not isinstance(obj, dict):
                raise self.fail(where, not_an_object)
            try:
                out.append(build(obj, where))
            except ValueError as exc:
                raise self.fail(where, str(exc)) from None
        return out

    def tensor(self, obj: Any, where: str) -> TensorSpec:
        if not isinstance(obj, dict):
            raise self.fail(where, "must be an object")
        shape = self.get(obj, "shape", list, where)
        try:
            return TensorSpec(self.get(obj, "name", str, where), tuple(shape),
                              self.get(obj, "meaning", str, where, required=False, default=""),
                              self.get(obj, "state_of", str, where, required=False))
        except ValueError as exc:
            raise self.fail(where, str(exc)) from None


def load_manifest(path: str | os.PathLike) -> ModelManifest:
    """Read and validate one manifest (a file, or a directory holding ``manifest.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    r = _Reader(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read manifest ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(doc, dict):
        raise r.fail("(top level)", "must be a JSON object")
    schema = r.get(doc, "schema", str, "")
    if schema != SCHEMA:
        raise r.fail("schema", f"unsupported schema {schema!r} (expected {SCHEMA!r})")
    task_name = r.get(doc, "task", str, "")
    if task_name not in TASKS:
        raise r.fail("task", f"must be one of {', '.join(TASKS)}, got {task_name!r}")
    task = Task(task_name)
    sha = r.get(doc, "sha256", str, "")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise r.fail("sha256", "must be 64 lowercase hex digits")

    inp = r.get(doc, "input", dict, "")
    tensor = r.tensor(inp, "input")
    if len(tensor.shape) != 4 or tensor.shape[1] != 3:
        raise r.fail("input.shape", f"must be [1, 3, height, width], got {list(tensor.shape)}")
    mean = r.get(inp, "mean", list, "input")
    std = r.get(inp, "std", list, "input")
    value_range = r.get(inp, "value_range", list, "input")
    if value_range != [0, 1]:
        raise r.fail("input.value_range", f"only [0, 1] (pixels divided by 255) is supported, got {value_range}")
    if r.get(inp, "layout", str, "input") != "NCHW":
        raise r.fail("input.layout", "only NCHW is supported")
    try:
        spec = InputSpec(tensor.shape[2], tensor.shape[3], r.get(inp, "color_order", str, "input"),
                         tuple(float(v) for v in mean), tuple(float(v) for v in std))
    except (ValueError, TypeError) as exc:
        raise r.fail("input", str(exc)) from None

    state_docs = r.get(doc, "state_inputs", list, "", required=False, default=[])
    states = tuple(r.tensor(s, f"state_inputs[{i}]") for i, s in enumerate(state_docs))
    outputs = tuple(r.tensor(o, f"outputs[{i}]") for i, o in enumerate(r.get(doc, "outputs", list, "")))
    if not outputs:
        raise r.fail("outputs", "must list at least one output")
    out_names = {o.name for o in outputs}
    for s in states:
        if not any(o.state_of == s.name for o in outputs):
            raise r.fail("outputs", f"no output has state_of={s.name!r} to feed state input {s.name!r}")
    for o in outputs:
        if o.state_of is not None and o.state_of not in {s.name for s in states}:
            raise r.fail(f"outputs.{o.name}.state_of", f"{o.state_of!r} is not a state input")
    if len(out_names) != len(outputs):
        raise r.fail("outputs", "output names must be unique")

    labels = r.objects(doc, "labels", "must be an object", lambda lab, where: Label(
        r.get(lab, "id", int, where), r.get(lab, "name", str, where), tuple(r.get(lab, "color", list, where))))
    if [lab.id for lab in labels] != list(range(len(labels))):
        raise r.fail("labels", "ids must be 0, 1, 2, ... in order")

    license_ = r.get(doc, "license", str, "").strip()
    if not license_:
        raise r.fail("license", "must name the licence the model is used under (e.g. CC-BY-NC-SA-4.0)")
    datasets = r.objects(doc, "datasets", "must be an object with name, license and attribution", lambda d, where: DatasetRef(
        r.get(d, "name", str, where), r.get(d, "license", str, where), r.get(d, "attribution", str, where)))
    if not datasets:
        raise r.fail("datasets", "must list the datasets the model was trained on")
    try:
        cadence = Cadence.parse(r.get(doc, "cadence", str, ""))
    except ValueError as exc:
        raise r.fail("cadence", str(exc)) from None

    known = {"schema", "name", "version", "task", "file", "sha256", "input", "state_inputs", "outputs",
             "labels", "license", "datasets", "cadence", "training", "metrics"}
    return ModelManifest(
        path=path,
        name=r.get(doc, "name", str, ""),
        version=r.get(doc, "version", str, ""),
        task=task,
        file=r.get(doc, "file", str, ""),
        sha256=sha,
        input=tensor,
        input_spec=spec,
        state_inputs=states,
        outputs=outputs,
        labels=tuple(labels),
        license=license_,
        datasets=tuple(datasets),
        cadence=cadence,
        training=r.get(doc, "training", dict, "", required=False, default={}),
        metrics=r.get(doc, "metrics", dict, "", required=False, default={}),
        extra={k: v for k, v in doc.items() if k not in known},
    )


def set_names(root: Path = SETS_ROOT) -> list[str]:
    """The model sets installed under ``root`` (folders with a ``model-set.json``)."""
    return sorted(p.parent.name for p in root.glob(f"*/{SET_FILE}")) if root.is_dir() else []


def resolve_models_dir(spec: str | os.PathLike | None = None) -> Path:
    """The folder a ``--models SET|DIR`` value names: ``None`` is ``$OR_AGENT_MODELS`` or the default set."""
    if spec is None or str(spec) == "":
        spec = os.environ.get("OR_AGENT_MODELS") or DEFAULT_SET
    path, text = Path(spec), str(spec)
    if "/" not in text and os.sep not in text and (SETS_ROOT / text / SET_FILE).is_file():
        return SETS_ROOT / text
    if path.is_dir():
        return path
    if path.exists():
        raise ManifestError(f"{path}: not a directory (give a model set's name or folder, or a models directory)")
    known = ", ".join(set_names()) or "none"
    raise ManifestError(f"{text}: no such model set or models directory (bundled sets: {known})")


def default_models_dir() -> Path:
    """``$OR_AGENT_MODELS`` (a set's name or a folder) if set, else the default set's folder."""
    return resolve_models_dir(None)


def discover(models_dir: str | os.PathLike | None = None) -> list[Path]:
    """Manifest paths one level under the folder ``models_dir`` names (``<dir>/<model>/manifest.json``)."""
    return sorted(p for p in resolve_models_dir(models_dir).glob(f"*/{MANIFEST_NAME}"))


def find_model(task: str, models_dir: str | os.PathLike | None = None) -> ModelManifest:
    """The installed model for ``task`` in the set or folder ``models_dir`` names, validated and hash-checked."""
    root = resolve_models_dir(models_dir)
    found = [m for m in (load_manifest(p) for p in discover(root)) if m.task == task]
    if not found:
        raise ManifestError(f"{root}: no model with task {task!r} installed")
    if len(found) > 1:
        names = ", ".join(str(m.path.parent.name) for m in found)
        raise ManifestError(f"more than one {task} model installed ({names}): keep one per task")
    found[0].verify_file()
    return found[0]
