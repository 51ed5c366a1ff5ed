"""Model sets: the models a hospital installs for a procedure, with the rules that read their classes.

A model set is a folder ``models/<set>/`` holding a set manifest (``model-set.json``, schema
``or-agent/model-set/v1``): its name and version, the procedure it is for, its licence and provenance,
the rules file written for its class names, and its models, each in its own folder with its model
manifest. Selected with ``--models SET|DIR`` (or ``$OR_AGENT_MODELS``): a set's name, a set's folder,
or a plain models directory (``<dir>/<model>/manifest.json``, as ``calibrate`` writes), which is taken
as a set of its own with the built-in cholecystectomy rules.

A set is checked as a whole when it is loaded: every model manifest and sha256, at most one phase and
one visibility model (any number of segmentation and classification models), unique model names,
and the rules against the classes its models have, so a rule naming a class no model produces is
refused with the rule and the class named, before any case starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from or_agent.pipelines.errors import ManifestError
from or_agent.pipelines.manifest import (
    DEFAULT_SET,
    MANIFEST_NAME,
    SET_FILE,
    SETS_ROOT,
    ModelManifest,
    Task,
    load_manifest,
    resolve_models_dir,
)
from or_agent.pipelines.rules import RuleVocabulary, load_rules

# at most one of these per set (the visibility model gates the others; the phase is one timeline)
ONE_PER_SET = (Task.VISIBILITY, Task.PHASE)
SET_SCHEMA = "or-agent/model-set/v1"
PROCEDURES = ("laparoscopic-cholecystectomy",)
WITHHOLDABLE = ("phase",)  # outputs a set may run without showing
DEFAULT_RULES = SETS_ROOT / DEFAULT_SET / "rules_cholecystectomy.toml"  # for a plain models directory


@dataclass(frozen=True)
class ModelSet:
    path: Path  # the set's folder
    name: str
    version: str
    procedure: str
    license: str
    provenance: str
    rules_file: Path
    models: tuple[ModelManifest, ...]
    declared: bool = True  # False for a plain models directory taken as a set
    # outputs the set runs but does not show, with why (a model not validated on real footage):
    # the displays say so instead of showing a guess
    withheld: tuple[tuple[str, str], ...] = ()

    def for_task(self, task: Task | str) -> list[ModelManifest]:
        return [m for m in self.models if m.task == task]

    def model(self, task: Task | str) -> ModelManifest:
        """The set's one model for ``task``."""
        found = self.for_task(task)
        if not found:
            raise ManifestError(f"{self.path}: no model with task {str(task)!r} in model set {self.name!r}")
        return found[0]

    @property
    def outputs(self) -> RuleVocabulary:
        """What the set's rules may name: each segmentation model's classes, each image-level output's labels
        (a classification model's, and the Critical View of Safety a segmentation model carries)."""
        from or_agent.pipelines.cvs import CRITERIA
        from or_agent.pipelines.messages import CVS_OUTPUT

        segs = tuple((m.name, tuple(lab.name for lab in m.labels)) for m in self.for_task(Task.SEGMENTATION))
        labels = tuple((m.name, tuple(lab.name for lab in m.labels)) for m in self.for_task(Task.CLASSIFICATION))
        labels += tuple((CVS_OUTPUT, CRITERIA) for m in self.for_task(Task.SEGMENTATION) if "cvs" in m.extra)[:1]
        return RuleVocabulary(segs, labels)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Every segmentation class, as ``model.class``."""
        return self.outputs.class_names


def _field(doc: dict, key: str, path: Path, kind=str):
    value = doc.get(key)
    if value is None:
        raise ManifestError(f"{path}: {key}: missing")
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise ManifestError(f"{path}: {key}: must be a non-empty {'string' if kind is str else kind.__name__}")
    return value


def _check_tasks(folder: Path, models: list[ModelManifest]) -> None:
    """At least one model; at most one phase and one visibility model (any number of the others); unique names."""
    if not models:
        raise ManifestError(f"{folder}: no models installed")
    for task in ONE_PER_SET:
        found = [m for m in models if m.task == task]
        if len(found) > 1:
            names = ", ".join(m.path.parent.name for m in found)
            raise ManifestError(f"more than one {task} model installed ({names}): a set has at most one")
    model_names = [m.name for m in models]
    dup = sorted({n for n in model_names if model_names.count(n) > 1})
    if dup:
        raise ManifestError(f"{folder}: two models are named {dup[0]!r}: results and rules tell models apart by name")


def load_model_set(spec: str | os.PathLike | None = None, verify: bool = True) -> ModelSet:
    """Read and check a model set (see the module doc); ``verify`` also checks every model's sha256."""
    folder = resolve_models_dir(spec)
    set_file = folder / SET_FILE
    if set_file.is_file():
        try:
            doc = json.loads(set_file.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{set_file}: cannot read ({exc})") from None
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{set_file}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        if not isinstance(doc, dict):
            raise ManifestError(f"{set_file}: must be a JSON object")
        if doc.get("schema") != SET_SCHEMA:
            raise ManifestError(f"{set_file}: schema: unsupported schema {doc.get('schema')!r} (expected {SET_SCHEMA!r})")
        procedure = _field(doc, "procedure", set_file)
        if procedure not in PROCEDURES:
            raise ManifestError(f"{set_file}: procedure: must be one of {', '.join(PROCEDURES)}, got {procedure!r}")
        names = _field(doc, "models", set_file, list)
        if not names or not all(isinstance(n, str) and n and not Path(n).is_absolute() for n in names):
            raise ManifestError(f"{set_file}: models: must list the set's model folders, relative to the set "
                                "(a model shared with another set as ../<set>/<model>)")
        models = []
        for n in names:
            if not (folder / n / MANIFEST_NAME).is_file():
                raise ManifestError(f"{set_file}: models: {n}/{MANIFEST_NAME} does not exist")
            models.append(load_manifest(folder / n))
        rules_file = folder / _field(doc, "rules", set_file)
        withheld_doc = doc.get("withheld", {})
        if not isinstance(withheld_doc, dict) or any(t not in WITHHOLDABLE or not isinstance(r, str) or not r.strip()
                                                     for t, r in withheld_doc.items()):
            raise ManifestError(f"{set_file}: withheld: must map {' or '.join(WITHHOLDABLE)} to the reason it is not shown")
        withheld = tuple(withheld_doc.items())
        meta = dict(name=_field(doc, "name", set_file), version=_field(doc, "version", set_file), procedure=procedure,
                    license=_field(doc, "license", set_file), provenance=_field(doc, "provenance", set_file))
        declared = True
    else:
        withheld = ()
        paths = sorted(folder.glob(f"*/{MANIFEST_NAME}"))
        if not paths:
            raise ManifestError(f"{folder}: neither a model set ({SET_FILE}) nor a models directory (*/{MANIFEST_NAME})")
        models = [load_manifest(p) for p in paths]
        rules_file = DEFAULT_RULES
        licences = sorted({m.license for m in models})
        meta = dict(name=folder.name, version="-", procedure=PROCEDURES[0], license=", ".join(licences),
                    provenance=f"models directory {folder} (no {SET_FILE})")
        declared = False
    _check_tasks(folder, models)
    if verify:
        for m in models:
            m.verify_file()
    model_set = ModelSet(path=folder, rules_file=rules_file, models=tuple(models), declared=declared, withheld=withheld, **meta)
    load_rules(rules_file, vocabulary=model_set.outputs, owner=f"model set {model_set.name!r}")
    return model_set
