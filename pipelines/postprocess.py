"""Logits maths shared by the model stages, the frame paths and the GPU kernels' host side.

``reduce_logits`` is the CPU definition of what a segmentation stage reports per pixel and per
class; the GPU reduction kernel is checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    class_map = lg.argmax(0).astype(np.uint8)
    counts = np.bincount(class_map.ravel(), minlength=classes)
    s, sm = lg[:, ::sub, ::sub], class_map[::sub, ::sub]
    top = np.take_along_axis(s, sm[None].astype(np.int64), 0)[0]
    p_win = 1.0 / np.exp(s - top[None]).sum(0)  # = max softmax probability
    sub_counts = np.bincount(sm.ravel(), minlength=classes)
    sums = np.bincount(sm.ravel(), weights=p_win.ravel(), minlength=classes)
    return class_map, counts, class_confidence(counts, sub_counts, sums)


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
