"""``or-agent doctor``: can this box run a live case, and if not, what to do about it.

Checks the GPU stack (driver, CUDA, pycuda, TensorRT), ONNX Runtime, the installed models, the
TensorRT engine cache against those models, capture devices, disk space, the TLS certificates' expiry
and the clock (and whether it is synchronised). Each line
is ``ok``, ``WARN`` or ``FAIL`` with what to do. Exit code 0 when a live case can run (the CPU
fallback counts, with a warning), 1 when it cannot (models missing or corrupt, no disk, no
ONNX Runtime).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from or_agent.pipelines.errors import OrAgentError

MIN_FREE_BYTES = 2 * 1024**3  # below this a case's recordings and audit trail may not fit
WARN_FREE_BYTES = 10 * 1024**3
CAPTURE_OPEN_TIMEOUT_S = 2.0
CERT_WARN_DAYS = 30  # a certificate expiring sooner is renewed before it stops the displays connecting
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")  # systemd-timesyncd touches it once synchronised
_TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised


@dataclass
class Report:
    out: Callable[[str], None]
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def ok(self, what: str) -> None:
        self.out(f"ok    {what}")

    def warn(self, what: str, todo: str = "") -> None:
        self.warnings.append(what)
        self.out(f"WARN  {what}" + (f" -> {todo}" if todo else ""))

    def fail(self, what: str, todo: str = "") -> None:
        self.failures.append(what)
        self.out(f"FAIL  {what}" + (f" -> {todo}" if todo else ""))

    def info(self, what: str) -> None:
        self.out(f"      {what}")


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _check_gpu(r: Report, cache_dir: Path, manifests: list) -> None:
    from or_agent.pipelines.backends import engines
    from or_agent.pipelines.gpu.context import gpu_info

    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if smi:
        for line in smi.splitlines():
            r.ok(f"nvidia-smi: {line.strip()}")
    else:
        r.info("nvidia-smi: not found or failed (no NVIDIA driver on this box?)")
    gpu = None
    try:
        gpu = gpu_info()
        r.ok(f"GPU {gpu.describe()}, {gpu.total_memory / 1024**3:.1f} GiB, driver supports CUDA {gpu.driver_cuda} (pycuda)")
    except OrAgentError as exc:
        r.warn(f"{exc}", "no GPU means no TensorRT: the models run on the CPU with ONNX Runtime (slower; "
                         "check the latency budget with the pipeline benchmark)")
    if gpu is not None:
        _check_gpu_kernels(r)
    version = None
    try:
        version = engines.tensorrt_version()
        r.ok(f"TensorRT {version}")
    except OrAgentError as exc:
        r.warn(str(exc), "without it the models run on ONNX Runtime (CPU)")
    if gpu is None or version is None or not manifests:
        return
    cache = engines.EngineCache(cache_dir)
    for m in manifests:
        key = engines.EngineKey.for_model(m, gpu, version)
        if cache.has(key):
            r.ok(f"engine for {m.name}: {cache.path_for(key).name}")
        else:
            r.warn(f"no TensorRT engine for {m.name} on {key.describe()}",
                   f"run `or-agent build-engines` before the case (cache {cache_dir})")
    stale = cache.prune([m.sha256 for m in manifests])
    if stale:
        r.warn(f"{len(stale)} cached engine(s) for models no longer installed in {cache_dir}",
               "`or-agent build-engines --prune` removes them")


def _check_gpu_kernels(r: Report) -> None:
    """The frame path's pycuda kernels are compiled when the agent starts; nvcc must be there."""
    from or_agent.pipelines.frame_path import GpuFramePath

    try:
        GpuFramePath().close()
        r.ok("GPU preprocessing and reduction kernels compile (the frame path can run on the GPU)")
    except OrAgentError as exc:
        r.warn(str(exc), "install the CUDA toolkit (nvcc on PATH); until then model inputs are made on the CPU")


def _check_onnxruntime(r: Report) -> None:
    try:
        import onnxruntime as ort
    except Exception as exc:
        r.fail(f"ONNX Runtime cannot be imported ({exc})", "reinstall or-agent (pip install -e .)")
        return
    providers = ort.get_available_providers()
    r.ok(f"ONNX Runtime {ort.__version__}, providers: {', '.join(providers)}")
    if "CPUExecutionProvider" not in providers:
        r.fail("ONNX Runtime has no CPUExecutionProvider", "reinstall onnxruntime")


def _check_models(r: Report, models_dir) -> list:
    from or_agent.pipelines.manifest import discover, load_manifest, resolve_models_dir
    from or_agent.pipelines.model_set import load_model_set

    try:
        root = resolve_models_dir(models_dir)
        paths = discover(root)
    except OrAgentError as exc:
        r.fail(str(exc), "install the models (or set --models / OR_AGENT_MODELS)")
        return []
    good = []
    for p in paths:
        try:
            m = load_manifest(p)
            m.verify_file()
        except OrAgentError as exc:
            r.fail(str(exc), "reinstall this model (`or-agent models` shows the details)")
            continue
        good.append(m)
        r.ok(f"model {m.name} {m.version} ({m.task}): sha256 verified")
    if len(good) == len(paths):
        try:  # the set as a whole: at most one phase and visibility model, unique names, its rules
            load_model_set(root, verify=False)
        except OrAgentError as exc:
            r.fail(str(exc), "fix the model set (see models/README.md)")
    return good


def _probe_capture(dev: str) -> str:
    """Open a capture device in a child process, so a hung driver cannot hang the doctor."""
    import sys

    code = ("import cv2,sys; c=cv2.VideoCapture(sys.argv[1]); ok=c.isOpened() and c.read()[0]; "
            "print('open' if ok else ('opened, no frame' if c.isOpened() else 'cannot open')); c.release()")
    try:
        p = subprocess.run([sys.executable, "-c", code, dev], capture_output=True, text=True,
                           timeout=CAPTURE_OPEN_TIMEOUT_S)
        return p.stdout.strip() or "cannot open"
    except subprocess.TimeoutExpired:
        return f"no answer within {CAPTURE_OPEN_TIMEOUT_S:.0f} s"


def _check_capture(r: Report, probe: bool) -> None:
    devices = sorted(str(p) for p in Path("/dev").glob("video*"))
    if not devices:
        r.info("capture devices: none (/dev/video*); a file or stream source still works")
        return
    for dev in devices:
        if not probe:
            r.info(f"capture device {dev}")
            continue
        state = _probe_capture(dev)
        if state == "open":
            r.ok(f"capture device {dev}: OpenCV reads frames")
        else:
            r.warn(f"capture device {dev}: {state}",
                   "check the capture card's driver, cabling and that no other process holds it")


def _check_disk(r: Report, dirs: dict[str, Path]) -> None:
    for label, d in dirs.items():
        probe = d
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = shutil.disk_usage(probe).free
        except OSError as exc:
            r.fail(f"{label} {d}: cannot read disk usage ({exc})")
            continue
        text = f"{label} {d}: {free / 1024**3:.1f} GiB free"
        if free < MIN_FREE_BYTES:
            r.fail(text, f"free at least {MIN_FREE_BYTES // 1024**3} GiB (old recordings, replays)")
        elif free < WARN_FREE_BYTES:
            r.warn(text, "free some space before long cases")
        else:
            r.ok(text)


def _check_clock(r: Report) -> None:
    w0, m0 = time.time(), time.monotonic()
    time.sleep(0.05)
    dw, dm = time.time() - w0, time.monotonic() - m0
    if abs(dw - dm) > 0.02:
        r.warn(f"wall clock moved {dw - dm:+.3f} s against the monotonic clock in 50 ms (being stepped?)",
               "let NTP settle before a case; audit timestamps use the wall clock")
    year = time.gmtime().tm_year
    if year < 2024:
        r.fail(f"wall clock says {time.strftime('%Y-%m-%d')}", "set the time (NTP); audit records would be misdated")
        return
    synced, how = clock_sync()
    stamp = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
    if synced:
        r.ok(f"clock {stamp}, synchronised ({how})")
    elif synced is False:
        r.warn(f"clock not synchronised ({how})",
               "enable NTP (timedatectl set-ntp true, or chrony) so audit times match the hospital's")
    else:
        r.info(f"clock {stamp}; clock sync: unknown (no timedatectl, adjtimex or systemd-timesyncd answer)")


def _adjtimex_state() -> bool | None:
    """The kernel's own view (adjtimex(2), read only): False when it says unsynchronised, None when it cannot tell."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        timex = ctypes.create_string_buffer(512)  # struct timex (about 208 bytes), modes 0: only read
        state = libc.adjtimex(timex)
    except (OSError, AttributeError):  # not Linux
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR


def clock_sync() -> tuple[bool | None, str]:
    """Whether the system clock is synchronised (None: unknown) and what said so: ``timedatectl`` where
    systemd runs, else the kernel's adjtimex state, else systemd-timesyncd's flag file."""
    ntp = _run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"])
    if ntp in ("yes", "no"):
        return ntp == "yes", "timedatectl"
    state = _adjtimex_state()
    if state is not None:
        return state, "adjtimex"
    if TIMESYNCD_FLAG.exists():
        return True, "systemd-timesyncd"
    return None, ""


def certificate_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The certificate files the given paths name: a file itself; a directory made by ``or-agent certs``
    its ``ca.crt``, ``server.crt`` and ``clients/*.crt`` (and any other ``*.crt``/``*.pem`` in it)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.iterdir() if q.suffix in (".crt", ".pem") and q.is_file())
            found += sorted((p / "clients").glob("*.crt")) if (p / "clients").is_dir() else []
        else:
            found.append(p)
    return list(dict.fromkeys(found))


def _check_certificates(r: Report, paths: Sequence[str | os.PathLike], now: dt.datetime) -> None:
    from cryptography import x509

    files = certificate_files(paths)
    if not files:
        r.info("TLS certificates: none given (doctor --config agent.toml or --certs DIR to check their expiry)")
        return
    for path in files:
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as exc:
            r.warn(f"certificate {path}: cannot read ({getattr(exc, 'strerror', None) or 'not a PEM certificate'})")
            continue
        for cert in certs[:1]:  # the file's own certificate; a chain's others are checked in their own files
            until = cert.not_valid_after_utc
            days = (until - now).total_seconds() / 86400
            text = f"certificate {path}: expires {until:%Y-%m-%d %H:%M} UTC"
            if days < 0:
                r.fail(f"certificate {path}: expired {until:%Y-%m-%d %H:%M} UTC",
                       "make a new one (or-agent certs --out DIR --box BOX ...); TLS peers refuse it")
            elif days < CERT_WARN_DAYS:
                r.warn(f"{text}, in {int(days)} day(s)", "renew it before then (or-agent certs --out DIR --box BOX ...)")
            else:
                r.ok(f"{text} (in {int(days)} days)")


def run_doctor(models_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
               out: Callable[[str], None] = print, work_dir: str | os.PathLike = ".",
               audit_dir: str | os.PathLike | None = "audit", probe_capture: bool = True,
               certificates: Sequence[str | os.PathLike] = (), now: dt.datetime | None = None) -> int:
    """Print the checks; 0 if a live case can run here, 1 if not. ``certificates``: TLS certificate files
    or ``or-agent certs`` directories whose expiry is checked against ``now`` (default: the clock)."""
    from or_agent.pipelines.backends.engines import default_cache_dir

    r = Report(out)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out("or-agent doctor")
    _check_onnxruntime(r)
    manifests = _check_models(r, models_dir)
    _check_gpu(r, cache, manifests)
    _check_capture(r, probe_capture)
    dirs = {"working dir": Path(work_dir).resolve()}
    if audit_dir is not None:
        dirs["audit dir"] = Path(audit_dir).resolve()
    _check_disk(r, dirs)
    _check_certificates(r, certificates, now or dt.datetime.now(dt.timezone.utc))
    _check_clock(r)
    if r.failures:
        out(f"NOT READY: {len(r.failures)} problem(s) stop a live case; {len(r.warnings)} warning(s)")
        return 1
    out(f"READY for a live case ({len(r.warnings)} warning(s))")
    return 0
