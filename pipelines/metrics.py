"""Accuracy measures against ground truth, shared by model cards, replay reports and tests."""

from __future__ import annotations

import numpy as np


def confusion(truth: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    """confusion[t, p]: how many pixels (or frames) of true class t were predicted p."""
    t = np.asarray(truth, np.int64).ravel()
    p = np.asarray(pred, np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"truth and prediction differ in size: {t.size} vs {p.size}")
    return np.bincount(t * classes + p, minlength=classes * classes).reshape(classes, classes)


def per_class_iou(conf: np.ndarray) -> np.ndarray:
    """IoU per class; NaN for a class absent from both truth and prediction."""
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def per_class_dice(conf: np.ndarray) -> np.ndarray:
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


def mean_iou_present(conf: np.ndarray) -> float:
    """Mean IoU over the classes present in the ground truth."""
    present = conf.sum(1) > 0
    return float(np.nanmean(per_class_iou(conf)[present]))


def accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    t, p = np.asarray(truth).ravel(), np.asarray(pred).ravel()
    if t.shape != p.shape or t.size == 0:
        raise ValueError("accuracy needs two non-empty sequences of the same length")
    return float((t == p).mean())


def recall(truth: np.ndarray, pred: np.ndarray) -> float:
    """Recall of the positive (True) class; NaN when there are no positives."""
    t, p = np.asarray(truth, bool).ravel(), np.asarray(pred, bool).ravel()
    return float((t & p).sum() / t.sum()) if t.any() else float("nan")


def precision(truth: np.ndarray, pred: np.ndarray) -> float:
    t, p = np.asarray(truth, bool).ravel(), np.asarray(pred, bool).ravel()
    return float((t & p).sum() / p.sum()) if p.any() else float("nan")


RELAXED_WINDOW_S = 10.0  # Cholec80's relaxed boundary: +-10 s around each labelled phase change


def relax_boundaries(truth: np.ndarray, pred: np.ndarray, window: int) -> np.ndarray:
    """Predictions with the relaxed-boundary rule of Cholec80 evaluation applied.

    Within ``window`` frames of a ground-truth phase change from A to B, predicting either A or B
    is counted as correct (the exact moment of a change is ambiguous even for annotators), so
    those predictions are replaced by the truth before scoring.
    """
    t = np.asarray(truth)
    out = np.asarray(pred).copy()
    changes = np.flatnonzero(t[1:] != t[:-1]) + 1
    for c in changes:
        a, b = t[c - 1], t[c]
        lo, hi = max(0, c - window), min(len(t), c + window)
        seg = slice(lo, hi)
        ok = (out[seg] == a) | (out[seg] == b)
        out[seg] = np.where(ok, t[seg], out[seg])
    return out


def phase_scores(truth: np.ndarray, pred: np.ndarray, names: tuple[str, ...]) -> dict:
    """Accuracy and per-phase precision, recall, F1 and Jaccard (phases absent from both are left out).

    A prediction of -1 (no phase shown yet) counts as wrong for every phase."""
    t = np.asarray(truth, np.int64)
    p = np.asarray(pred, np.int64)
    p = np.where((p < 0) | (p >= len(names)), len(names), p)
    conf = confusion(t, p, len(names) + 1)
    tp = np.diag(conf).astype(float)
    per = {}
    for i, name in enumerate(names):
        support, predicted = conf[i].sum(), conf[:, i].sum()
        if support == 0 and predicted == 0:
            continue
        prec = tp[i] / predicted if predicted else 0.0
        rec = tp[i] / support if support else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        jac = tp[i] / (support + predicted - tp[i])
        per[name] = {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4),
                     "jaccard": round(float(jac), 4), "frames": int(support)}
    return {"accuracy": round(accuracy(t, p), 4), "per_phase": per}


def balanced_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean of the recall of the positives and of the negatives (NaN without either)."""
    t, p = np.asarray(truth, bool).ravel(), np.asarray(pred, bool).ravel()
    if not t.any() or t.all():
        return float("nan")
    return float(0.5 * (p[t].mean() + (~p[~t]).mean()))


def average_precision(truth: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision-recall curve as the mean precision at each positive, ranked by score
    (NaN without positives)."""
    t = np.asarray(truth, bool).ravel()
    if not t.any():
        return float("nan")
    order = np.argsort(-np.asarray(score, np.float64).ravel(), kind="stable")
    hits = t[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())
