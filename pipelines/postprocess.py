"""Logits maths shared by the model stages, the frame paths and the GPU kernels' host side.

``reduce_logits`` is the CPU definition of what a segmentation stage reports per pixel and per
class; the GPU reduction kernel is checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


CONF_SUBSAMPLE = 4  # segmentation confidence is averaged on a 4x4-subsampled grid


def reduce_logits(logits: np.ndarray, sub: int = CONF_SUBSAMPLE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segmentation logits ([1,C,H,W] or [C,H,W]) -> (uint8 class map HxW, int64 pixel counts [C],
    float64 per-class confidence [C]). The CPU definition; the GPU reduction kernel is checked against it.

    Confidence is the mean winning (max-softmax) probability over a class's pixels on a
    ``sub`` x ``sub``-subsampled grid: the mean of a region barely changes, and the exponentials cost
    16x less. A class present only between grid points gets 0.5; an absent one 0."""
    lg = np.asarray(logits, np.float32)
    lg = lg[0] if lg.ndim == 4 else lg
    classes = lg.shape[0]
    class_map, top_logit = _running_max(lg)
    counts = class_counts(class_map, classes)
    s, sm = lg[:, ::sub, ::sub], class_map[::sub, ::sub]
    p_win = 1.0 / np.exp(s - top_logit[None, ::sub, ::sub]).sum(0)  # = max softmax probability
    sub_counts = class_counts(sm, classes)
    sums = np.bincount(sm.ravel(), weights=p_win.ravel(), minlength=classes)
    return class_map, counts, class_confidence(counts, sub_counts, sums)


_EXACT_HISTOGRAM_PIXELS = 1 << 24  # OpenCV's histogram counts in float32: exact up to 2**24


def class_counts(class_map: np.ndarray, classes: int) -> np.ndarray:
    """Pixels per class id 0..classes-1 of a uint8 class map (ids >= ``classes`` are not counted), as int64.
    OpenCV's histogram: 0.5x the time of ``np.bincount``, which first widens every pixel to int64
    (``python -m bench.cpu_paths_bench``, section 8)."""
    if class_map.size >= _EXACT_HISTOGRAM_PIXELS or class_map.dtype != np.uint8:
        return np.bincount(class_map.ravel(), minlength=classes)[:classes].astype(np.int64)
    hist = cv2.calcHist([np.ascontiguousarray(class_map)], [0], None, [256], [0, 256])
    return hist.reshape(-1)[:classes].astype(np.int64)


def class_argmax(logits: np.ndarray) -> np.ndarray:
    """``logits.argmax(0)`` as uint8 for [C,H,W] float32 logits (C <= 256), ties to the lower class as
    argmax's (a NaN logit, unlike in argmax, never wins a pixel). A running maximum over the class
    planes with OpenCV's SIMD compare, maximum and minimum: numpy's argmax over the first axis walks
    the array across its planes (13 classes at 256x448: ``python -m bench.cpu_paths_bench``)."""
    return _running_max(logits)[0]


def _running_max(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``class_argmax``, the winning logit per pixel): the confidence needs the maximum the search found."""
    if logits.ndim != 3 or not 1 <= logits.shape[0] <= 256:
        raise ValueError(f"expected [C,H,W] logits with 1..256 classes, got shape {logits.shape}")
    best = np.array(logits[0], np.float32, order="C")
    class_map = np.zeros(best.shape, np.uint8)
    for c in range(1, logits.shape[0]):
        plane = np.ascontiguousarray(logits[c], np.float32)
        higher = cv2.compare(plane, best, cv2.CMP_GT)  # 255 where class c beats every class before it
        cv2.max(plane, best, dst=best)
        # min(255, c) = c where it wins, 0 elsewhere; c exceeds every class id set so far, so the maximum
        # writes c exactly where it won: two SIMD passes, 0.85-0.95x a masked copy of a filled plane
        # (``python -m bench.cpu_paths_bench``, section 8; numpy's boolean-mask assignment is 5x slower still)
        cv2.max(class_map, cv2.min(higher, c), dst=class_map)
    return class_map, best


def class_confidence(counts: np.ndarray, sub_counts: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Per-class confidence from the pixel counts and, on the subsampled grid, the counts and summed
    winning probabilities (shared by the CPU reduction and the GPU kernel's host side)."""
    return np.where(sub_counts > 0, sums / np.maximum(sub_counts, 1), np.where(counts > 0, 0.5, 0.0))


@dataclass(frozen=True)
class SegmentationReduction:
    """Segmentation logits reduced to what the anatomy stage reports, by ``reduce_logits`` on the
    CPU or by the GPU kernel next to the engine's output (then only this crosses to the host)."""

    class_map: np.ndarray = field(repr=False)  # uint8 HxW class ids
    counts: np.ndarray  # int64 [C] pixels per class
    confidence: np.ndarray  # float64 [C]

    def __post_init__(self):
        if self.class_map.ndim != 2 or self.class_map.dtype != np.uint8:
            raise ValueError("class_map must be a 2-D uint8 array")
        if self.counts.shape != self.confidence.shape or self.counts.ndim != 1:
            raise ValueError("counts and confidence must be 1-D with one value per class")
        if int(self.counts.sum()) != self.class_map.size:
            raise ValueError(f"counts add up to {int(self.counts.sum())}, the class map has {self.class_map.size} pixels")
