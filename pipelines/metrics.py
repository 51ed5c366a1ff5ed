"""Accuracy measures against ground truth, shared by model cards, replay reports and tests."""

from __future__ import annotations

import numpy as np

from or_agent.pipelines.surgery import PHASE_ID


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


FIGURE_DECIMALS = 4  # reported fractions (accuracy, precision, recall, F1, Jaccard): 4 decimals, e.g. 0.8125


def figure(value: float | None) -> float | None:
    """The one rounding rule for a reported figure: a fraction to ``FIGURE_DECIMALS`` decimals;
    undefined (None or NaN) stays None, which JSON writes as null (never 0.0)."""
    if value is None or np.isnan(value):
        return None
    return round(float(value), FIGURE_DECIMALS)


def rounded_figures(scores):
    """``scores`` (nested dicts and lists of figures, as the functions below return them) with every
    float rounded by ``figure``; integers (frame counts) and strings are left as they are."""
    if isinstance(scores, dict):
        return {k: rounded_figures(v) for k, v in scores.items()}
    if isinstance(scores, (list, tuple)):
        return [rounded_figures(v) for v in scores]
    if isinstance(scores, (float, np.floating)):
        return figure(float(scores))
    return scores


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def phase_scores(truth: np.ndarray, pred: np.ndarray, names: tuple[str, ...]) -> dict:
    """Strict frame-by-frame scores: accuracy, and per phase present in the truth or the prediction
    its precision, recall, F1 and Jaccard (unrounded; see ``rounded_figures``).

    Undefined figures are None: precision of a phase never predicted, recall of a phase absent from
    the truth, F1 where either is. A prediction of -1 (no phase shown yet) counts as wrong for every phase."""
    t = np.asarray(truth, np.int64)
    p = np.asarray(pred, np.int64)
    p = np.where((p < 0) | (p >= len(names)), len(names), p)
    conf = confusion(t, p, len(names) + 1)
    tp = np.diag(conf).astype(float)
    per = {}
    for i, name in enumerate(names):
        support, predicted = int(conf[i].sum()), int(conf[:, i].sum())
        if support == 0 and predicted == 0:
            continue
        prec, rec = _ratio(tp[i], predicted), _ratio(tp[i], support)
        f1 = None if prec is None or rec is None else (2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        per[name] = {"precision": prec, "recall": rec, "f1": f1,
                     "jaccard": float(tp[i] / (support + predicted - tp[i])), "frames": support}
    return {"accuracy": accuracy(t, p), "per_phase": per}


OFFICIAL_WINDOW_S = 10.0  # Evaluate.m's relaxed boundary: the first and last 10 s of each true phase segment

# Evaluate.m's extra forgiveness for Cholec80's last phases (ids there 4-7), which can follow each other
# in either order; by name, so a model's label order does not matter. (forgiven at the segment's start,
# forgiven at its end), as differences predicted - true in Cholec80's phase order.
_FORGIVEN = {
    "GallbladderDissection": ((-1,), (1, 2)),
    "GallbladderPackaging": ((-1,), (1, 2)),
    "CleaningCoagulation": ((-1, -2), (1, 2)),
    "GallbladderRetraction": ((-1, -2), (1, 2)),
}
_FORGIVEN_OTHERWISE = ((-1,), (1,))


def has_official_evaluation(names: tuple[str, ...]) -> bool:
    """Whether ``official_phase_scores`` is defined for a phase model with these labels (Cholec80's phases)."""
    return all(n in PHASE_ID for n in names)


def official_phase_scores(truth: np.ndarray, pred: np.ndarray, times_s: np.ndarray, names: tuple[str, ...],
                          window_s: float = OFFICIAL_WINDOW_S) -> dict:
    """The official Cholec80 / M2CAI phase evaluation of one video, with relaxed boundaries.

    It follows ``Evaluate.m`` by A. P. Twinanda (the evaluation script distributed with Cholec80 and the
    M2CAI 2016 workflow challenge, called per video by its ``Main.m``; copies in e.g.
    github.com/YuemingJin/TMRNet, code/eval/result/matlab-eval/Evaluate.m). With ``diff = predicted -
    true`` in Cholec80's phase order, for each connected segment of a true phase: in its first
    ``window_s`` a prediction of the previous phase (diff -1, a late transition) counts as right, and
    in its last ``window_s`` one of the next phase (diff +1, an early transition); at the end of
    GallbladderDissection and GallbladderPackaging also diff +2, and for CleaningCoagulation and
    GallbladderRetraction diff -1/-2 at the start and +1/+2 at the end (the last phases may come in
    either order). Then, for each phase k in the truth, over the union U of the frames predicted k and
    the frames truly k, TP = the frames of U counted right: Jaccard = TP / |U|, precision = TP / (frames
    predicted k), recall = TP / (frames truly k), precision and recall clipped to 1 as ``Main.m`` clips
    them to 100 % (a forgiven frame of another phase counts for both); accuracy = the share of frames
    counted right.

    Deviations, each deliberate:

    * Evaluate.m's end-of-segment lines (``curDiff(curDiff(end-t+1:end)==1) = 0``) index the segment's
      *first* t frames with a mask computed on its last t frames (a logical index shorter than the
      array), so the early transition its comment documents is not what it forgives; this follows the
      documented intent, the last ``window_s`` (I. Funke et al., "Metrics matter in surgical phase
      recognition", arXiv 2305.13961; github.com/YuemingJin/TMRNet issue 8).
    * The window is in seconds of each frame's own time, so samples may be irregular (key frames every
      few seconds): a segment's first ``window_s`` are its frames earlier than its first frame's time +
      ``window_s``, its last those later than its last frame's time - ``window_s``; a segment shorter
      than the window is all start and all end, as in Evaluate.m's ``t = min(10 * fps, length)``. At a
      constant frame rate this is Evaluate.m with its ``fps``.
    * Undefined figures are None (JSON null; NaN in Evaluate.m): every figure of a phase absent from the
      truth, and precision of a phase never predicted (Evaluate.m divides by zero there; Main.m's
      clipping would then report 100 %).
    * A frame with no prediction (-1, nothing shown yet) is wrong and never forgiven (Evaluate.m has no
      such frame; a label it does not know would become phase 0 and pass as "the previous phase" of
      Preparation).

    ``truth`` and ``pred`` are phase ids into ``names`` (Cholec80 phase names, in any order), one per
    sample, in time order; ``times_s`` the samples' times. Figures are unrounded (``rounded_figures``).
    """
    t = np.asarray(truth, np.int64).ravel()
    p = np.asarray(pred, np.int64).ravel()
    ts = np.asarray(times_s, np.float64).ravel()
    if not t.size or t.shape != p.shape or t.shape != ts.shape:
        raise ValueError(f"the official evaluation needs truth, prediction and times of one non-zero length, "
                         f"got {t.size}, {p.size} and {ts.size}")
    if np.any(np.diff(ts) < 0):
        raise ValueError("the official evaluation needs the samples in time order")
    if t.min() < 0 or t.max() >= len(names):
        raise ValueError(f"true phase ids must be 0..{len(names) - 1}")
    if not has_official_evaluation(names):
        unknown = next(n for n in names if n not in PHASE_ID)
        raise ValueError(f"the official evaluation is defined for the Cholec80 phases; {unknown!r} is not one")
    order = np.array([PHASE_ID[n] for n in names], np.int64)  # label id -> position in Cholec80's order
    predicted = (p >= 0) & (p < len(names))
    diff = np.where(predicted, order[np.clip(p, 0, len(names) - 1)] - order[t], np.iinfo(np.int64).max)
    right = diff == 0
    ends = np.flatnonzero(np.diff(t)) + 1
    for a, b in zip(np.r_[0, ends], np.r_[ends, t.size]):
        seg_t = ts[a:b]
        seg_diff = diff[a:b]
        at_start, at_end = _FORGIVEN.get(names[t[a]], _FORGIVEN_OTHERWISE)
        # rounded so that frame times like n / 25 land on the boundary exactly (250 frames at 25 fps = 10 s)
        first = np.round(seg_t - seg_t[0], 6) < window_s
        last = np.round(seg_t[-1] - seg_t, 6) < window_s
        right[a:b] |= (first & np.isin(seg_diff, at_start)) | (last & np.isin(seg_diff, at_end))
    per: dict[str, dict] = {}
    for k, name in enumerate(names):
        is_true, is_pred = t == k, p == k
        support, n_pred = int(is_true.sum()), int(is_pred.sum())
        if not support:
            per[name] = {"precision": None, "recall": None, "jaccard": None, "frames": 0}
            continue
        union = is_true | is_pred
        tp = int((union & right).sum())
        prec = _ratio(tp, n_pred)
        per[name] = {"precision": None if prec is None else min(1.0, prec), "recall": min(1.0, tp / support),
                     "jaccard": tp / int(union.sum()), "frames": support}
    return {"window_s": float(window_s), "accuracy": float(right.mean()), "per_phase": per}


PHASE_FIGURES = ("precision", "recall", "f1", "jaccard")  # per phase, those of them the scores have


def mean_over_phases(per_phase: dict) -> dict:
    """Each figure's mean over the phases where it is defined (None where it is defined for none)."""
    out = {}
    for key in PHASE_FIGURES:
        if any(key in m for m in per_phase.values()):
            values = [m[key] for m in per_phase.values() if m.get(key) is not None]
            out[key] = float(np.mean(values)) if values else None
    return out


def mean_over_videos(videos: list[dict]) -> dict:
    """``Main.m``'s averages of per-video scores (``phase_scores`` or ``official_phase_scores``): the
    mean accuracy over videos; per phase the mean of each figure over the videos where it is defined;
    and each figure's mean over the phases where that mean is defined (Main.m takes ``nanmean`` over
    videos, then the mean over phases; a phase undefined in every video is left out here, where
    Main.m's plain ``mean`` would make the whole figure NaN). None where nothing is defined."""
    if not videos:
        raise ValueError("the mean over videos needs at least one video")
    names = list(dict.fromkeys(name for v in videos for name in v["per_phase"]))
    keys = [k for k in PHASE_FIGURES if any(k in m for v in videos for m in v["per_phase"].values())]
    per: dict[str, dict] = {}
    for name in names:
        per[name] = {"frames": sum(v["per_phase"].get(name, {}).get("frames", 0) for v in videos)}
        for key in keys:
            values = [v["per_phase"][name][key] for v in videos
                      if name in v["per_phase"] and v["per_phase"][name][key] is not None]
            per[name][key] = float(np.mean(values)) if values else None
    return {"videos": len(videos), "accuracy": float(np.mean([v["accuracy"] for v in videos])),
            **mean_over_phases(per), "per_phase": per}


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
