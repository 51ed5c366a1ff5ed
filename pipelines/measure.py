"""Measurements on class maps shared by the alert rules and the CVS assessment."""

from __future__ import annotations

import math

import cv2
import numpy as np


def class_distance_px(class_map: np.ndarray, a: int, b: int, px_per_cell: float = 1.0) -> float:
    """Smallest distance between any cell of class a and any of class b, in frame pixels (``px_per_cell``
    frame pixels per cell); inf if either is absent."""
    ma, mb = class_map == a, class_map == b
    if not ma.any() or not mb.any():
        return math.inf
    # distance from every cell to the nearest b cell, read at the a cells
    dist = cv2.distanceTransform((~mb).astype(np.uint8), cv2.DIST_L2, 3)
    return float(dist[ma].min()) * px_per_cell
