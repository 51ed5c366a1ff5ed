"""The offline install bundle for an OR box: a wheelhouse built on a connected machine.

``build_bundle`` writes, into a new folder, the or-agent wheel and every locked dependency's wheel for
one target (CPython version and Linux platform tag) under ``wheels/``, the target's slice of the lock
(``requirements.txt``, with the lock's hashes, which pip checks on download and again on install),
``install.sh`` (a fresh virtual environment, ``pip install --no-index`` from ``wheels/``), a CycloneDX
SBOM (``sbom.cdx.json``, from ``cyclonedx-py`` on that requirements slice, so it needs no network) and
``SHA256SUMS`` over all of it. The locks live in the repository's ``packaging/``, so the bundle is made
from a source checkout. The folder is assembled beside its destination and renamed into place at the
end: an interrupted or failed bundle leaves nothing at ``--out``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from or_agent.pipelines.errors import DependencyError, InputError, OrAgentError

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_LOCK = Path("packaging") / "requirements.lock"
# Extras locked apart (they need NVIDIA's stack on the box); each name is a lock beside the runtime one.
EXTRA_LOCKS = {"gpu": Path("packaging") / "requirements-gpu.lock"}

_PYTHON_VERSION = re.compile(r"3\.(\d+)")
# pip's platform tags for Linux wheels; manylinux tags accept wheels for that glibc and older.
_PLATFORM = re.compile(r"(?:manylinux1|manylinux2010|manylinux2014|manylinux_\d+_\d+|linux)_(x86_64|aarch64)")
_NO_NETWORK = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
               "Network is unreachable", "ProxyError", "ConnectTimeoutError", "Max retries exceeded")


@dataclass(frozen=True)
class Target:
    """Where the bundle will be installed: a CPython version and a platform tag; ``None`` means this machine's."""

    python_version: str | None = None  # "3.11"
    platform: str | None = None  # "manylinux_2_28_x86_64"

    def __post_init__(self) -> None:
        if self.python_version is not None:
            m = _PYTHON_VERSION.fullmatch(self.python_version)
            if m is None or int(m.group(1)) < 10:
                raise InputError(f"--python-version: expected a CPython version 3.10 or newer such as 3.11, "
                                 f"got {self.python_version!r}")
        if self.platform is not None and _PLATFORM.fullmatch(self.platform) is None:
            raise InputError(f"--platform: expected a Linux wheel platform tag such as manylinux_2_28_x86_64, "
                             f"got {self.platform!r}")

    @property
    def python(self) -> str:
        return self.python_version or f"{sys.version_info.major}.{sys.version_info.minor}"

    def describe(self) -> str:
        return f"CPython {self.python} on {self.platform or 'this machine'}"

    def marker_environment(self) -> dict[str, str]:
        """The PEP 508 marker values on the target, to pick the lock's lines that apply there."""
        from packaging.markers import default_environment

        env = {key: str(value) for key, value in default_environment().items()}
        if self.python_version is not None:
            env.update(python_version=self.python, python_full_version=f"{self.python}.0",
                       implementation_name="cpython", platform_python_implementation="CPython")
        if self.platform is not None:
            machine = _PLATFORM.fullmatch(self.platform).group(1)  # type: ignore[union-attr]
            env.update(sys_platform="linux", platform_system="Linux", os_name="posix", platform_machine=machine)
        return env

    def pip_args(self) -> list[str]:
        """pip download's target options; none for this machine, which pip knows itself."""
        args = []
        if self.python_version is not None:
            args += ["--python-version", self.python, "--implementation", "cp"]
        for tag in self.platform_tags():
            args += ["--platform", tag]
        return args

    def platform_tags(self) -> list[str]:
        """The target's tag and every older manylinux tag its glibc also runs: pip matches tags exactly."""
        if self.platform is None:
            return []
        m = _PLATFORM.fullmatch(self.platform)
        arch = m.group(1)  # type: ignore[union-attr]
        legacy = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}
        glibc = self.platform.removesuffix(f"_{arch}")
        if glibc == "linux" or (glibc.startswith("manylinux_") and not glibc.startswith("manylinux_2_")):
            return [self.platform]
        minor = legacy[glibc] if glibc in legacy else int(glibc.split("_")[2])
        tags = [f"manylinux_2_{v}_{arch}" for v in range(minor, 4, -1)]
        tags += [f"{name}_{arch}" for name, v in legacy.items() if v <= minor]
        return tags


@dataclass(frozen=True)
class Locked:
    """One pinned line of a lock file: ``name==version ; marker`` and its hashes."""

    name: str
    version: str
    marker: str | None
    hashes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.hashes:
            raise InputError(f"lock line {self.name}=={self.version} has no --hash (regenerate the lock with --generate-hashes)")

    def applies_to(self, env: dict[str, str]) -> bool:
        from packaging.markers import Marker

        return self.marker is None or Marker(self.marker).evaluate(env)

    def requirement_line(self) -> str:
        return f"{self.name}=={self.version} " + " ".join(f"--hash={h}" for h in self.hashes)


def read_lock(path: Path) -> list[Locked]:
    """The pinned lines of a pip/uv lock with hashes (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    entries = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, *hashes = (part.strip() for part in line.split("--hash="))
        requirement, _, marker = spec.partition(";")
        name, sep, version = requirement.strip().partition("==")
        if not sep:
            raise InputError(f"{path}: {requirement.strip()!r} is not pinned with == (not a lock file?)")
        entries.append(Locked(name.strip(), version.strip(), marker.strip() or None, tuple(hashes)))
    return entries


@dataclass(frozen=True)
class BundleSummary:
    out: Path
    target: Target
    wheels: int
    size_bytes: int
    not_bundled: tuple[str, ...] = field(default=())  # "name==version: why", to install on the box otherwise


def build_bundle(out: Path, target: Target, extras: Sequence[str] = (), root: Path = ROOT,
                 log: Callable[[str], None] = lambda line: None) -> BundleSummary:
    """Build the bundle into ``out`` (which must not exist yet); see the module's docstring."""
    unknown = sorted(set(extras) - set(EXTRA_LOCKS))
    if unknown:
        raise InputError(f"--extras: unknown {', '.join(unknown)} (known: {', '.join(EXTRA_LOCKS)})")
    if not (root / "setup.py").is_file() or not (root / RUNTIME_LOCK).is_file():
        raise InputError(f"{root}: not an or-agent source checkout (no setup.py and {RUNTIME_LOCK}); "
                         "run or-agent bundle from the repository")
    if out.exists():
        raise InputError(f"{out}: already exists; a bundle is written to a new folder")
    _require_sbom_generator()
    env = target.marker_environment()
    runtime = [e for e in read_lock(root / RUNTIME_LOCK) if e.applies_to(env)]
    extra_entries = {x: [e for e in read_lock(root / EXTRA_LOCKS[x]) if e.applies_to(env)] for x in extras}

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted run: never part of a bundle
    wheels = staging / "wheels"
    wheels.mkdir(parents=True)
    try:
        log(f"bundle for {target.describe()}: {len(runtime)} locked packages"
            + "".join(f", {len(v)} for {k}" for k, v in extra_entries.items()))
        _write_requirements(staging / "requirements.txt", runtime)
        log("building the or-agent wheel")
        agent_wheel = _build_agent_wheel(root, wheels)
        log(f"downloading {len(runtime)} wheels (hashes checked against {RUNTIME_LOCK})")
        _pip_download(["-r", str(staging / "requirements.txt")], wheels, target)
        not_bundled: list[str] = []
        extra_files = []
        for extra, entries in extra_entries.items():
            bundled = []
            for entry in entries:
                log(f"downloading {entry.name}=={entry.version} ({extra})")
                try:
                    _pip_download([f"{entry.name}=={entry.version}"], wheels, target, hashes=entry.hashes)
                    bundled.append(entry)
                except _NoWheel:
                    not_bundled.append(f"{entry.name}=={entry.version}: no wheel for {target.describe()}; "
                                       "install it on the box")
                    log(f"  not bundled: {not_bundled[-1]}")
            name = f"requirements-{extra}.txt"
            _write_requirements(staging / name, bundled)
            extra_files.append(name)
        (staging / "install.sh").write_text(_install_script(target, agent_wheel.name, extra_files), encoding="utf-8")
        (staging / "install.sh").chmod(0o755)
        log("writing the SBOM (CycloneDX)")
        _write_sbom(staging, root, runtime, [e for x in extra_entries.values() for e in x])
        _write_checksums(staging)
        count = len(list(wheels.glob("*.whl")))
        size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BundleSummary(out, target, count, size, tuple(not_bundled))


class _NoWheel(OrAgentError):
    """pip found no file of a locked version for the target."""


def _require_sbom_generator() -> None:
    try:
        import cyclonedx_py  # noqa: F401
    except ImportError:
        raise DependencyError("the bundle's SBOM needs cyclonedx-bom: pip install 'or-agent[bundle]'") from None


def _write_requirements(path: Path, entries: Sequence[Locked]) -> None:
    path.write_text("".join(e.requirement_line() + "\n" for e in entries), encoding="utf-8")


def _run_pip(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)


def _build_agent_wheel(root: Path, wheels: Path) -> Path:
    proc = _run_pip(["wheel", str(root), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)])
    if proc.returncode != 0:
        raise OrAgentError(f"building the or-agent wheel failed: {_last_line(proc.stderr)}")
    (wheel,) = wheels.glob("or_agent-*.whl")
    return wheel


def _pip_download(requirements: list[str], wheels: Path, target: Target, hashes: Sequence[str] = ()) -> None:
    args = ["download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels), *target.pip_args()]
    if hashes:  # one package: its hashes through a one-line requirements file, so pip checks them
        req = wheels.parent / ".one.txt"
        req.write_text(f"{requirements[0]} " + " ".join(f"--hash={h}" for h in hashes) + "\n", encoding="utf-8")
        requirements = ["-r", str(req)]
    proc = _run_pip(args + ["--require-hashes", *requirements])
    if hashes:
        req.unlink()
    if proc.returncode == 0:
        return
    err = proc.stderr
    if any(sign in err for sign in _NO_NETWORK):
        raise OrAgentError("cannot reach the package index: or-agent bundle downloads the wheels, "
                           "so run it on a machine with network access (or a pip mirror)")
    missing = re.search(r"(?:satisfies the requirement|No matching distribution found for) ([^\s(]+)", err)
    if missing:
        if hashes:
            raise _NoWheel(missing.group(1))
        raise InputError(f"no wheel of {missing.group(1)} for {target.describe()}: check --python-version and "
                         "--platform (manylinux_2_28_x86_64 suits Ubuntu 20.04 and newer)")
    raise OrAgentError(f"pip download failed: {_last_line(err)}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def _install_script(target: Target, agent_wheel: str, extra_files: Sequence[str]) -> str:
    major, minor = target.python.split(".")
    extras = "".join(f'"$venv/bin/python" -m pip install $pip_opts -r "$here/{name}"\n' for name in extra_files)
    return f"""#!/bin/sh
# Installs or-agent from this bundle, without a network: ./install.sh [VENV]  (default /opt/or-agent/venv)
# Built for {target.describe()}; PYTHON=... picks the interpreter (default python3).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv=${{1:-/opt/or-agent/venv}}
python=${{PYTHON:-python3}}
(cd "$here" && sha256sum --quiet -c SHA256SUMS) || {{ echo "install.sh: error: the bundle's files do not match SHA256SUMS" >&2; exit 2; }}
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != ({major}, {minor}))' || {{
    echo "install.sh: error: this bundle is for Python {target.python}; found $("$python" --version 2>&1) (set PYTHON=...)" >&2; exit 2; }}
"$python" -m venv "$venv"
# --isolated: the box's pip configuration (indexes, find-links, constraints) plays no part
pip_opts="--isolated --disable-pip-version-check --no-index --find-links $here/wheels"
"$venv/bin/python" -m pip install $pip_opts -r "$here/requirements.txt"
{extras}"$venv/bin/python" -m pip install $pip_opts "$here/wheels/{agent_wheel}"
echo "installed or-agent into $venv (run: $venv/bin/or-agent models)"
"""


def _write_sbom(staging: Path, root: Path, runtime: Sequence[Locked], extras: Sequence[Locked]) -> None:
    from or_agent import __version__

    work = staging / ".sbom"
    work.mkdir()
    # cyclonedx-py names the root component from a PEP 621 pyproject.toml; setup.py has none, so one is written
    (work / "pyproject.toml").write_text(
        f'[project]\nname = "or-agent"\nversion = "{__version__}"\n'
        'description = "Surgical video decision-support edge agent"\nlicense = {text = "Apache-2.0"}\n', encoding="utf-8")
    (work / "requirements.txt").write_text("".join(e.requirement_line() + "\n" for e in [*runtime, *extras]),
                                           encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "cyclonedx_py", "requirements", str(work / "requirements.txt"),
                           "--pyproject", str(work / "pyproject.toml"), "--output-reproducible", "--of", "JSON",
                           "-o", str(staging / "sbom.cdx.json")], capture_output=True, text=True)
    shutil.rmtree(work)
    if proc.returncode != 0:
        raise OrAgentError(f"cyclonedx-py failed: {_last_line(proc.stderr)}")


def _write_checksums(staging: Path) -> None:
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(staging).as_posix()}\n" for p in files]
    (staging / "SHA256SUMS").write_text("".join(lines), encoding="utf-8")
