"""Scene familiarity: how far a frame's encoder features lie from the real training frames'.

The distance is the squared Mahalanobis distance of the pooled encoder features to the training
frames' mean, under a shrunk covariance, divided by the feature dimension (about 1 for a frame like
the training frames). It is computed inside the phase model's ONNX graph as ``sum(((x - mu) @ L)^2) / D``
with ``L`` a square root of the shrunk precision matrix, so the agent gets it with the phase for free.

Thresholds are calibrated leave-one-video-out: for every real video (the four cholect50-val operations,
the four clips' videos, video01, each Endoscapes video) the statistics are fitted without it and its
frames' distances measured, so the in-domain figures are for videos the statistics never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from or_agent.pipelines.familiarity import FamiliarityCheck, SceneFamiliarity


@dataclass(frozen=True)
class FeatureStatistics:
    mean: np.ndarray  # [D]
    root_precision: np.ndarray  # [D, D]: precision = L @ L.T
    shrinkage: float

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance per row of ``x`` [N, D], divided by D."""
        z = (np.asarray(x, np.float64) - self.mean) @ self.root_precision
        return (z * z).sum(-1) / x.shape[-1]


def fit_statistics(x: np.ndarray, shrinkage: float = 0.2) -> FeatureStatistics:
    """Mean and shrunk covariance ``(1 - s) * S + s * mean(diag(S)) * I`` of ``x`` [N, D]."""
    x = np.asarray(x, np.float64)
    mu = x.mean(0)
    cov = np.cov(x - mu, rowvar=False)
    cov = (1 - shrinkage) * cov + shrinkage * np.mean(np.diag(cov)) * np.eye(len(mu))
    vals, vecs = np.linalg.eigh(cov)
    root = vecs / np.sqrt(np.maximum(vals, 1e-12))  # L = V diag(1/sqrt(lambda)): L @ L.T = cov^-1
    return FeatureStatistics(mu, root, shrinkage)


def paused_steps(distances: np.ndarray, pause_above: float, resume_below: float, pause_after: int = 2,
                 resume_after: int = 2) -> np.ndarray:
    """Which steps of one video, in time order, the agent would pause (its own hysteresis)."""
    check = SceneFamiliarity(FamiliarityCheck("feature_distance", pause_above, resume_below, pause_after, resume_after))
    return np.array([not check.update(float(d)) for d in distances], bool)
