"""The Critical View of Safety (CVS), assessed from a segmentation model's class map.

Strasberg's three criteria, as Endoscapes' raters score them: C1 two tubular structures (and only two)
entering the gallbladder, C2 the hepatocystic triangle cleared of fat and fibrous tissue, C3 the lower
third of the gallbladder separated from the liver bed (the cystic plate in view). Each is assessed by
a small logistic regression on interpretable measurements of the class map (which structures are seen,
how much of them, in how many pieces, how far apart), so the evidence behind a probability can be shown
with it. The measurements need a set whose segmentation model has the Endoscapes structures; the
weights live in that model's manifest (``cvs``), fitted on the training split's expert ratings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from or_agent.pipelines.measure import class_distance_px

CRITERIA = ("cvs_two_structures", "cvs_hepatocystic_triangle", "cvs_cystic_plate")
STRUCTURES = ("Cystic Plate", "Hepatocystic Triangle", "Cystic Artery", "Cystic Duct", "Gallbladder", "Tool")
CVS_SHORT = {"cvs_two_structures": "C1 two structures", "cvs_hepatocystic_triangle": "C2 triangle cleared",
             "cvs_cystic_plate": "C3 cystic plate"}
MIN_PIECE = 0.0005  # a connected piece smaller than this fraction of the map is noise, not a structure


def _key(name: str) -> str:
    return name.lower().replace(" ", "_")


FEATURES = tuple(f"{kind}_{_key(s)}" for s in STRUCTURES[:5] for kind in ("area", "seen", "pieces")) + (
    "artery_duct_distance", "both_tubular_seen_apart")


def check_structures(classes: tuple[str, ...]) -> None:
    """ValueError unless a segmentation model with ``classes`` has every structure the CVS is judged on."""
    missing = [s for s in STRUCTURES if s not in classes]
    if missing:
        raise ValueError(f"the segmentation model has no class {missing[0]!r}: the CVS needs {', '.join(STRUCTURES)}")


def cvs_text(probabilities) -> str:
    """One line for a display: each criterion met only at probability 0.5 or more, with the probability."""
    return "CVS: " + "  |  ".join(f"{CVS_SHORT.get(k, k)} {'yes' if p >= 0.5 else 'no'} ({100 * p:.0f}%)"
                                  for k, p in probabilities)


def cvs_measurements(class_map: np.ndarray, classes: tuple[str, ...]) -> dict[str, float]:
    """The measurements the criteria are judged on, by name (``FEATURES``): per structure its area (fraction
    of the map), whether it is seen (at least one piece above ``MIN_PIECE``) and its number of pieces;
    the artery-duct distance as a fraction of the map's diagonal (1 when either is missing), and whether
    both tubular structures are seen apart."""
    check_structures(classes)
    total = class_map.size
    out: dict[str, float] = {}
    for s in STRUCTURES[:5]:
        mask = (class_map == classes.index(s)).astype(np.uint8)
        # labelled inside the structure's bounding box only: the same pieces, and most structures cover a
        # small part of a full-size map (python -m bench.models_bench, the anatomy model's "post")
        x, y, w, h = cv2.boundingRect(mask)
        sizes = np.zeros(0)
        if w:
            _, _, stats, _ = cv2.connectedComponentsWithStats(mask[y:y + h, x:x + w], connectivity=8)
            sizes = stats[1:, cv2.CC_STAT_AREA] / total
        pieces = int((sizes >= MIN_PIECE).sum())
        out[f"area_{_key(s)}"] = float(cv2.countNonZero(mask) / total)
        out[f"seen_{_key(s)}"] = float(pieces > 0)
        out[f"pieces_{_key(s)}"] = float(pieces)
    diagonal = math.hypot(*class_map.shape)
    d = class_distance_px(class_map, classes.index("Cystic Artery"), classes.index("Cystic Duct"))
    out["artery_duct_distance"] = 1.0 if math.isinf(d) else min(1.0, d / diagonal)
    out["both_tubular_seen_apart"] = float(out["seen_cystic_artery"] and out["seen_cystic_duct"] and d > 0.01 * diagonal)
    return out


@dataclass(frozen=True)
class CvsAssessor:
    """Probabilities of the three criteria from the measurements: standardised features, one logistic
    regression per criterion. Built from (and saved to) a manifest's ``cvs`` block."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: tuple[tuple[float, ...], ...]  # one row per criterion
    bias: tuple[float, ...]

    def __post_init__(self):
        f = len(self.features)
        if len(self.mean) != f or len(self.std) != f or any(s <= 0 for s in self.std):
            raise ValueError("cvs: mean and std need one positive value per feature")
        if len(self.weights) != len(CRITERIA) or any(len(w) != f for w in self.weights) or len(self.bias) != len(CRITERIA):
            raise ValueError(f"cvs: weights need {len(CRITERIA)} rows of {f} and one bias per criterion")
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"cvs: unknown feature {sorted(unknown)[0]!r}")

    @classmethod
    def from_dict(cls, d: dict) -> CvsAssessor:
        try:
            return cls(tuple(d["features"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])),
                       tuple(tuple(map(float, w)) for w in d["weights"]), tuple(map(float, d["bias"])))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"cvs: missing or malformed field ({exc})") from None

    def as_dict(self) -> dict:
        return {"criteria": list(CRITERIA), "features": list(self.features), "mean": list(self.mean),
                "std": list(self.std), "weights": [list(w) for w in self.weights], "bias": list(self.bias)}

    def probabilities(self, measurements: dict[str, float]) -> dict[str, float]:
        x = (np.array([measurements[f] for f in self.features]) - np.array(self.mean)) / np.array(self.std)
        z = np.array(self.weights) @ x + np.array(self.bias)
        return {c: float(1 / (1 + math.exp(-v))) for c, v in zip(CRITERIA, z)}


def fit_assessor(x: np.ndarray, y: np.ndarray, features: tuple[str, ...] = FEATURES, l2: float = 1.0,
                 steps: int = 3000, lr: float = 0.1) -> CvsAssessor:
    """Class-balanced, L2-regularised logistic regression per criterion (``x``: frames x features in
    ``features`` order; ``y``: frames x criteria, 0/1), by gradient descent on standardised features."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    mean = x.mean(0)
    std = x.std(0)
    std[std < 1e-6] = 1.0
    xs = (x - mean) / std
    weights, bias = [], []
    for c in range(y.shape[1]):
        t = y[:, c]
        pos = max(1.0, t.sum())
        neg = max(1.0, len(t) - t.sum())
        sample_w = np.where(t > 0.5, len(t) / (2 * pos), len(t) / (2 * neg))
        w = np.zeros(xs.shape[1])
        b = 0.0
        for _ in range(steps):
            p = 1 / (1 + np.exp(-(xs @ w + b)))
            g = sample_w * (p - t)
            w -= lr * (xs.T @ g / len(t) + l2 * w / len(t))
            b -= lr * g.mean()
        weights.append(tuple(w.tolist()))
        bias.append(float(b))
    return CvsAssessor(tuple(features), tuple(mean.tolist()), tuple(std.tolist()), tuple(weights), tuple(bias))
