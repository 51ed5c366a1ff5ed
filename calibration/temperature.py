"""Confidence calibration of the phase model: temperature scaling.

The phase confidence on the OR display should mean what it says: of the steps shown at 80 %,
about 80 % should be right. A network's softmax rarely is; dividing its logits by one fitted
temperature T (Guo et al., 2017) fixes most of the gap without changing any argmax, so the phase
shown, the accuracy and the temporal filter's decisions on clear cases stay as they were.

T is fitted on labelled replays: the phase model is stepped through each video as the pipeline
steps it (5 Hz, out-of-body frames skipped, state carried), every step's raw logits are paired
with the labelled phase, and T minimises the negative log-likelihood of the labels under
``softmax(logits / T)``: a grid over log T in [0.05, 20], then golden-section search around the
best grid point (the NLL is convex in 1/T, so unimodal in log T). The expected calibration error
(15 equal-width confidence bins, top-1) is reported before (T = 1) and after.

``apply_temperature`` stores ``temperature``, ``ece_before`` and ``ece_after`` in the manifest's
``calibration`` block; the phase stage divides the logits by it when present.

Fit on videos the model was not trained on (a calibration or validation set): on its training
videos a network looks better calibrated than it is.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from or_agent.calibration.common import OutOfBodyJudge, find_labels, list_videos, phase_steps, resolve_model, update_manifest, video_info
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.manifest import ModelManifest, find_model

T_MIN, T_MAX = 0.05, 20.0
ECE_BINS = 15
_GRID = 41
_GOLDEN = (math.sqrt(5) - 1) / 2


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, np.float64) / temperature
    return float(-_log_softmax(z)[np.arange(len(labels)), labels].mean())


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
                               bins: int = ECE_BINS) -> float:
    """Top-1 ECE: the frequency-weighted gap between confidence and accuracy over ``bins`` equal bins."""
    p = np.exp(_log_softmax(np.asarray(logits, np.float64) / temperature))
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == np.asarray(labels)).astype(np.float64)
    idx = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, t_min: float = T_MIN, t_max: float = T_MAX) -> float:
    """The temperature in [t_min, t_max] that minimises the NLL (grid on log T, then golden section)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise InputError(f"temperature fitting needs N x classes logits and N labels, got {logits.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise InputError(f"labels must be 0..{logits.shape[1] - 1}")
    lo, hi = math.log(t_min), math.log(t_max)
    grid = np.linspace(lo, hi, _GRID)
    values = [nll(logits, labels, math.exp(u)) for u in grid]
    i = int(np.argmin(values))
    a, b = grid[max(0, i - 1)], grid[min(_GRID - 1, i + 1)]
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = nll(logits, labels, math.exp(c)), nll(logits, labels, math.exp(d))
    while b - a > 1e-5:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = nll(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = nll(logits, labels, math.exp(d))
    return float(math.exp((a + b) / 2))


def collect_phase_logits(videos: Sequence[Path], manifest: ModelManifest, models_dir=None,
                         log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raw phase logits and labelled phases, one row per pipeline step over ``videos``."""
    from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend

    say = log or (lambda s: None)
    labels = [find_labels(v) for v in videos]
    for v, lab in zip(videos, labels):
        if lab.phase is None:
            raise InputError(f"{v}: no phase labels next to it ({v.stem}-phase.txt, {v.stem}-phase.csv or {v.stem}-flags.csv)")
    backend = OnnxRuntimeBackend(manifest, threads=1, verify=False)
    rows, truth = [], []
    judge = OutOfBodyJudge(None, models_dir)
    try:
        for v, lab in zip(videos, labels):
            judge.labels = lab
            n0 = len(rows)
            for step in phase_steps(v, backend, judge, video_info(v)[0]):
                p = lab.phase_at(step.frame)
                if p is not None:
                    rows.append(step.logits)
                    truth.append(p)
            say(f"  {v.name}: {len(rows) - n0} labelled phase steps (out of body judged by {judge.source})")
    finally:
        backend.close()
    if not rows:
        raise InputError("no labelled phase steps in " + ", ".join(v.name for v in videos))
    return np.array(rows, np.float64), np.array(truth, np.int64)


def apply_temperature(manifest_path: str | Path, temperature: float, ece_before: float, ece_after: float,
                      fit: dict | None = None) -> ModelManifest:
    """Store the temperature and the ECE before and after in the manifest's ``calibration`` block
    (other keys of the block are kept); returns the re-validated manifest."""
    if not (T_MIN <= temperature <= T_MAX) or not math.isfinite(temperature):
        raise InputError(f"temperature must be within {T_MIN}..{T_MAX}, got {temperature}")

    def update(doc):
        if doc.get("task") != "phase":
            raise InputError(f"{manifest_path}: temperature scaling is for phase models, this one is {doc.get('task')!r}")
        cal = doc.get("calibration")
        cal = dict(cal) if isinstance(cal, dict) else {}
        cal["temperature"] = round(float(temperature), 4)
        cal["ece_before"] = round(float(ece_before), 4)
        cal["ece_after"] = round(float(ece_after), 4)
        if fit is not None:
            cal["temperature_fit"] = fit
        cal.pop("temperature_fitted_on", None)  # fitted on this model now
        doc["calibration"] = cal

    return update_manifest(manifest_path, update)


def calibrate_temperature(videos: Sequence[str], model: str | None = None, models_dir=None, write: bool = True,
                          log: Callable[[str], None] = print, check: Sequence[str] | None = None) -> dict:
    """``or-agent calibrate temperature``: fit T on labelled replays, report ECE, store it.

    With ``check`` (labelled videos not in the fit) the ECE and NLL before and after are measured
    there as well, and the temperature is stored only if it lowers both there: a temperature that
    only helps the videos it was fitted on is not a calibration (``check_passed`` says which)."""
    m = resolve_model(model, models_dir) if model else find_model("phase", models_dir)
    if m.task != "phase":
        raise InputError(f"{model}: temperature scaling is for the phase model, {m.name} is a {m.task} model")
    paths = list_videos(videos)
    check_paths = list_videos(check) if check else []
    overlap = {p.resolve() for p in paths} & {p.resolve() for p in check_paths}
    if overlap:
        raise InputError(f"--check videos must be kept out of the fit: {', '.join(sorted(p.name for p in overlap))} is in both")
    log(f"stepping {m.name} through {len(paths)} labelled video(s)")
    logits, labels = collect_phase_logits(paths, m, models_dir, log)
    t = fit_temperature(logits, labels)
    before, after = expected_calibration_error(logits, labels), expected_calibration_error(logits, labels, t)
    nll_before, nll_after = nll(logits, labels), nll(logits, labels, t)
    acc = float((logits.argmax(1) == labels).mean())
    conf_before = float(np.exp(_log_softmax(logits)).max(1).mean())
    conf_after = float(np.exp(_log_softmax(logits / t)).max(1).mean())
    result = {"temperature": round(t, 4), "ece_before": round(before, 4), "ece_after": round(after, 4),
              "nll_before": round(nll_before, 4), "nll_after": round(nll_after, 4), "steps": len(labels),
              "accuracy_raw": round(acc, 4), "mean_confidence_before": round(conf_before, 4),
              "mean_confidence_after": round(conf_after, 4)}
    log(f"{len(labels)} steps, raw accuracy {acc:.3f}; mean confidence {conf_before:.3f} -> {conf_after:.3f}")
    log(f"temperature {t:.3f}: ECE ({ECE_BINS} bins) {before:.4f} -> {after:.4f}, NLL {nll_before:.4f} -> {nll_after:.4f}")
    old = (m.extra.get("calibration") or {}).get("temperature")
    if old is not None:
        log(f"(the manifest had temperature {old})")
    if check_paths:
        log(f"checking on {len(check_paths)} video(s) kept out of the fit")
        c_logits, c_labels = collect_phase_logits(check_paths, m, models_dir, log)
        c = {"videos": [p.name for p in check_paths], "folders": sorted({p.parent.name for p in check_paths}),
             "steps": len(c_labels),
             "ece_before": round(expected_calibration_error(c_logits, c_labels), 4),
             "ece_after": round(expected_calibration_error(c_logits, c_labels, t), 4),
             "nll_before": round(nll(c_logits, c_labels), 4), "nll_after": round(nll(c_logits, c_labels, t), 4)}
        result["check"] = c
        result["check_passed"] = c["ece_after"] < c["ece_before"] and c["nll_after"] < c["nll_before"]
        log(f"kept out of the fit: ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}, NLL {c['nll_before']:.4f} -> "
            f"{c['nll_after']:.4f}: {'better' if result['check_passed'] else 'NOT better'}")
        if not result["check_passed"]:
            if write:
                log(f"the temperature is not written into {m.path}: it does not help on the videos kept out of the fit")
            return result
    if write:
        fit = {"videos": [p.name for p in paths], "folders": sorted({p.parent.name for p in paths}),
               "steps": len(labels), "bins": ECE_BINS,
               "nll_before": result["nll_before"], "nll_after": result["nll_after"],
               "method": f"NLL minimised over log T in [{T_MIN}, {T_MAX}] (grid, then golden section); "
                         "raw logits of the pipeline's 5 Hz steps, out-of-body frames skipped",
               "fitted_on": datetime.date.today().isoformat()}
        if "check" in result:
            fit["check"] = result["check"]
        out = apply_temperature(m.path, t, before, after, fit)
        log(f"wrote calibration.temperature = {out.extra['calibration']['temperature']} into {out.path}")
        result["manifest"] = str(out.path)
    return result
