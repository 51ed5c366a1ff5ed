"""Anatomy masks as simplified polygons in the frame's own coordinates: compact for the wire.

A 1080p class map is 2 MB; its regions' outlines, simplified to about one model pixel, are a
few hundred vertices. Outlines are traced on the model-sized class map (cheap) and mapped through
the content crop, so a display draws them at any resolution.
"""

from __future__ import annotations

import cv2
import numpy as np

from or_agent.pipelines.messages import SegmentationEstimate


def segmentation_polygons(est: SegmentationEstimate, epsilon_px: float = 1.0, min_area_px: float = 12.0,
                     skip: tuple[int, ...] = (0,)) -> dict[int, list[np.ndarray]]:
    """class id -> list of int32 (N, 2) outer boundaries in frame pixels.

    ``epsilon_px`` is the Douglas-Peucker tolerance and ``min_area_px`` the smallest region kept,
    both in model pixels; holes are not kept (overlays fill regions, and the class drawn inside a
    hole is its own region). Classes the estimate does not draw (background, and those below its
    ``draw_min_confidence``) get no polygons.
    """
    cmap = est.class_map
    h, w = cmap.shape
    cw, ch = est.area.crop_size
    scale = np.array([cw / w, ch / h], np.float32)
    offset = np.array([est.area.x0, est.area.y0], np.float32)
    out: dict[int, list[np.ndarray]] = {}
    for c in np.flatnonzero(np.bincount(cmap.ravel(), minlength=1)):
        if c in skip or not est.drawn(c):  # a region not confident enough is not outlined at all
            continue
        mask = (cmap == c).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        polys = []
        for cnt in contours:
            if cv2.contourArea(cnt) < min_area_px:
                continue
            simple = cv2.approxPolyDP(cnt, epsilon_px, True).reshape(-1, 2).astype(np.float32)
            if len(simple) >= 3:
                # pixel centres: model pixel i covers [i, i+1) -> frame x0 + (i + 0.5) * scale
                polys.append(np.round((simple + 0.5) * scale + offset).astype(np.int32))
        if polys:
            out[int(c)] = polys
    return out


def rasterise(polygons: dict[int, list[np.ndarray]], width: int, height: int) -> np.ndarray:
    """Polygons back to a class map (for checking and for displays that want masks)."""
    cmap = np.zeros((height, width), np.uint8)
    for c, polys in sorted(polygons.items(), key=lambda kv: -sum(cv2.contourArea(p) for p in kv[1])):
        cv2.fillPoly(cmap, polys, int(c))
    return cmap
