"""The box's model store: installed model sets by version, the active one, and the way back.

Layout of the store directory (``--store``, config ``models.store``, ``$OR_AGENT_MODEL_STORE``, else
``/var/lib/or-agent/models`` where that exists (the service's), else ``~/.local/state/or-agent/models``):

    NAME@VERSION/      a verified copy of an installed set (never changed once there)
    active             symlink to the set the agent runs: point the agent at it with
                       ``--models STORE/active`` (``pipeline.models``, ``$OR_AGENT_MODELS``)
    previous           symlink to the set that was active before, for ``rollback``

Install copies the set into a temporary folder in the store, verifies the copy (every model's
manifest and sha256, the rules against the models, and the signature when the box trusts signing keys)
and only then renames it to ``NAME@VERSION``: a set is either wholly installed or not at all, and what
was verified is exactly what is installed. Activation makes the new link under a temporary name and
``os.replace``-s it onto ``active``, so a reader sees the old set or the new one, never neither. Every
installed set is kept (with its TensorRT engines: ``build-engines --prune`` keeps them), so rolling
back needs no rebuild.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from or_agent.agent.config import is_plain_name
from or_agent.agent.model_signing import check_digests, digest_text, read_digests, verify_signature
from or_agent.pipelines.errors import InputError, OrAgentError
from or_agent.pipelines.files import fsync_dir
from or_agent.pipelines.manifest import SET_FILE, load_manifest

STORE_ENV = "OR_AGENT_MODEL_STORE"
SERVICE_STORE = Path("/var/lib/or-agent/models")
ACTIVE = "active"
PREVIOUS = "previous"
_INCOMING = ".incoming-"


def default_store_dir() -> Path:
    """``$OR_AGENT_MODEL_STORE``, else the service's store if the box has one, else the user's."""
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env)
    if SERVICE_STORE.is_dir():
        return SERVICE_STORE
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "or-agent" / "models"


@dataclass(frozen=True)
class InstalledSet:
    label: str  # NAME@VERSION
    path: Path
    signed: bool
    active: bool = False
    previous: bool = False

    def __post_init__(self):
        if "@" not in self.label:
            raise ValueError(f"installed set label {self.label!r} is not NAME@VERSION")


@dataclass(frozen=True)
class InstallResult:
    label: str
    path: Path
    signed_by: Path | None  # the trusted key that verified it; None: hashes checked, no signature required
    already_installed: bool = False


def _label_of(model_set) -> str:
    for what, value in (("name", model_set.name), ("version", model_set.version)):
        if not is_plain_name(value):
            raise InputError(f"{model_set.path / SET_FILE}: {what} {value!r} cannot name an installed set "
                             "(letters, digits, . _ - only)")
    return f"{model_set.name}@{model_set.version}"


class ModelStore:
    """Install, activate and roll back model sets in one store directory."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    @property
    def active_path(self) -> Path:
        return self.dir / ACTIVE

    def installed(self) -> list[InstalledSet]:
        active, previous = self.active(), self.previous()
        if not self.dir.is_dir():
            return []
        return [InstalledSet(p.name, p, (p / "model-set.sig").is_file(), p.name == active, p.name == previous)
                for p in sorted(self.dir.iterdir())
                if "@" in p.name and p.is_dir() and not p.is_symlink() and (p / SET_FILE).is_file()]

    def active(self) -> str | None:
        return self._pointer(ACTIVE)

    def previous(self) -> str | None:
        return self._pointer(PREVIOUS)

    def _pointer(self, name: str) -> str | None:
        link = self.dir / name
        return os.readlink(link) if link.is_symlink() else None

    # ----- install ------------------------------------------------------------------------------------

    def install(self, source: str | os.PathLike, trusted_keys: Sequence[str | os.PathLike] = ()) -> InstallResult:
        """Verify and copy the set folder ``source`` into the store as ``NAME@VERSION`` (see the module doc)."""
        from or_agent.pipelines.model_set import load_model_set

        source = Path(source)
        if not (source / SET_FILE).is_file():
            raise InputError(f"{source}: not a model set folder (no {SET_FILE})")
        self.dir.mkdir(parents=True, exist_ok=True)
        incoming = self.dir / f"{_INCOMING}{os.getpid()}-{source.name}"
        shutil.rmtree(incoming, ignore_errors=True)  # left by an install that died
        try:
            try:
                shutil.copytree(source, incoming, symlinks=True)
            except OSError as exc:
                raise InputError(f"{source}: cannot copy into the store {self.dir} ({exc.strerror or exc})") from None
            # everything below reads the copy, so what is verified is exactly what gets installed
            try:
                signed_by = verify_signature(incoming, trusted_keys) if trusted_keys else None
                if signed_by is None and read_digests(incoming) is not None:
                    check_digests(incoming)  # an unsigned box still refuses a set changed since it was signed
                self._take_in_shared_models(source, incoming, signed=bool(trusted_keys) or read_digests(incoming) is not None)
                model_set = load_model_set(incoming, verify=True)
            except OrAgentError as exc:  # named as the user knows the files: in the source folder
                raise type(exc)(str(exc).replace(str(incoming), str(source))) from None
            label = _label_of(model_set)
            final = self.dir / label
            if final.exists():
                if digest_text(final) != digest_text(incoming):
                    raise InputError(f"{label} is already installed with different content: a changed set needs a "
                                     "new version in its model-set.json")
                return InstallResult(label, final, signed_by, already_installed=True)
            os.rename(incoming, final)
            fsync_dir(self.dir)
            return InstallResult(label, final, signed_by)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    @staticmethod
    def _shared_models(source: Path) -> list[tuple[str, Path]]:
        """The set's models that live outside its folder (``../synthetic/phase``): (entry, folder)."""
        import json

        try:
            names = json.loads((source / SET_FILE).read_text()).get("models", [])
        except (OSError, ValueError, AttributeError):
            return []  # load_model_set names the problem
        return [(n, (source / n).resolve()) for n in (names if isinstance(names, list) else [])
                if isinstance(n, str) and ".." in Path(n).parts]

    @classmethod
    def _take_in_shared_models(cls, source: Path, copy: Path, signed: bool) -> None:
        """An installed set holds its own models: a model the source set shares with another set
        (``../synthetic/phase``) is copied into the set's copy, and the copy's model list names it there.
        A signed set cannot be changed so: its signature covers its own folder only."""
        import json

        shared = cls._shared_models(source)
        if not shared:
            return
        if signed:
            raise InputError(f"{source / SET_FILE}: models: {shared[0][0]} is shared with another set, outside what "
                             "its signature covers; a signed set must hold its own models (copy the model folder into "
                             "the set and sign it again)")
        doc = json.loads((copy / SET_FILE).read_text())
        for entry, folder in shared:
            inside = copy / folder.name
            if inside.exists():
                raise InputError(f"{source / SET_FILE}: models: {entry} would be copied into the set as {folder.name}/, "
                                 "which the set already has")
            try:
                shutil.copytree(folder, inside, symlinks=True)
            except OSError as exc:
                raise InputError(f"{source / entry}: cannot copy the shared model into the store ({exc.strerror or exc})") from None
            doc["models"] = [folder.name if m == entry else m for m in doc["models"]]
        (copy / SET_FILE).write_text(json.dumps(doc, indent=2) + "\n")

    # ----- activate and roll back -------------------------------------------------------------------

    def activate(self, label: str) -> tuple[str, str | None]:
        """Make ``NAME@VERSION`` the active set (checked first); the old active becomes ``previous``.
        Returns (now active, previous)."""
        from or_agent.pipelines.model_set import load_model_set

        target = self.dir / label
        if "@" not in label or "/" in label or not (target / SET_FILE).is_file():
            known = ", ".join(s.label for s in self.installed()) or "none"
            raise InputError(f"{label}: not installed in {self.dir} (installed: {known})")
        load_model_set(target, verify=True)  # a set damaged since install is never switched to
        current = self.active()
        if current == label:
            return label, self.previous()
        if current is not None:
            self._point(PREVIOUS, current)
        self._point(ACTIVE, label)
        return label, current

    def rollback(self) -> tuple[str, str]:
        """Switch back to the previous set; the one active until now becomes ``previous``. Returns (active, previous)."""
        before, current = self.previous(), self.active()
        if before is None:
            raise InputError(f"{self.dir}: no previous model set to roll back to")
        if not (self.dir / before / SET_FILE).is_file():
            raise InputError(f"{self.dir}: the previous set {before} is no longer installed")
        now, old = self.activate(before)
        return now, old or current or ""

    def _point(self, name: str, label: str) -> None:
        """Atomically make ``name`` a relative symlink to ``label`` (relative: the store can move)."""
        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(label, tmp)
        os.replace(tmp, self.dir / name)
        fsync_dir(self.dir)

    # ----- what the engine cache must keep ----------------------------------------------------------

    def model_sha256s(self) -> set[str]:
        """The sha256 of every model file of every installed set (active, previous and the others)."""
        keep = set()
        for s in self.installed():
            for manifest in sorted(s.path.glob("*/manifest.json")):
                try:
                    keep.add(load_manifest(manifest).sha256)
                except OrAgentError:
                    continue  # a damaged manifest references no engine we could match anyway
        return keep

