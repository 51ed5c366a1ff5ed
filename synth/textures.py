"""Tissue textures: smooth colour variation, fine grain and vessels, made once per video."""

from __future__ import annotations

import cv2
import numpy as np

from or_agent.pipelines.surgery import Anatomy

# Base colours (BGR) picked from the real Cholec80 footage, with how strongly each tissue
# varies in brightness and whether it shows vessels.
TISSUE_LOOKS: dict[int, tuple[tuple[int, int, int], float, bool]] = {
    Anatomy.BACKGROUND: ((0, 0, 0), 0.0, False),
    Anatomy.ABDOMINAL_WALL: ((110, 120, 195), 0.22, True),
    Anatomy.LIVER: ((45, 50, 140), 0.25, False),
    Anatomy.GI_TRACT: ((155, 115, 170), 0.25, True),
    Anatomy.FAT: ((95, 170, 215), 0.22, False),
    Anatomy.GRASPER: ((60, 60, 60), 0.1, False),
    Anatomy.CONNECTIVE_TISSUE: ((195, 200, 230), 0.30, True),
    Anatomy.BLOOD: ((20, 15, 120), 0.25, False),
    Anatomy.CYSTIC_DUCT: ((185, 215, 225), 0.10, False),
    Anatomy.L_HOOK: ((200, 200, 205), 0.1, False),
    Anatomy.GALLBLADDER: ((195, 190, 220), 0.18, True),
    Anatomy.HEPATIC_VEIN: ((120, 40, 60), 0.15, False),
    Anatomy.LIVER_LIGAMENT: ((200, 215, 235), 0.12, True),
}


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Value noise in [-1, 1]: random values on a coarse grid, upsampled smoothly."""
    h, w = shape
    coarse = rng.uniform(-1.0, 1.0, (max(2, cells * h // w), cells)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _draw_vessels(rng: np.random.Generator, img: np.ndarray, count: int, colour) -> None:
    h, w = img.shape[:2]
    for _ in range(count):
        pts = [rng.uniform((0, 0), (w, h))]
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(6, 14))):
            heading += rng.normal(0, 0.5)
            step = rng.uniform(15, 40)
            pts.append(pts[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
        cv2.polylines(img, [np.int32(pts)], False, colour, int(rng.integers(1, 3)), cv2.LINE_AA)


def make_texture(rng: np.random.Generator, cls: int, shape: tuple[int, int]) -> np.ndarray:
    base, variation, vessels = TISSUE_LOOKS[cls]
    h, w = shape
    if cls == Anatomy.BACKGROUND:
        return np.zeros((h, w, 3), np.uint8)
    tint = np.array(base, np.float32) * rng.uniform(0.85, 1.12, 3).astype(np.float32)
    shade = 1.0 + variation * (0.7 * smooth_noise(rng, shape, 6) + 0.3 * smooth_noise(rng, shape, 24))
    tex = np.clip(tint[None, None, :] * shade[..., None], 0, 255).astype(np.uint8)
    grain = rng.integers(-6, 7, (h, w, 1), dtype=np.int16)
    tex = np.clip(tex.astype(np.int16) + grain, 0, 255).astype(np.uint8)
    if vessels:
        vessel_colour = tuple(int(c) for c in np.clip(tint * np.array([0.55, 0.45, 0.9]), 0, 255))
        _draw_vessels(rng, tex, int(h * w / 40000), vessel_colour)
    return tex


def make_texture_stack(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Textures for every class, as one (classes, H, W, 3) array for gathering by label."""
    return np.stack([make_texture(rng, cls, shape) for cls in sorted(TISSUE_LOOKS)])


def make_room(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """An operating room as the endoscope sees it outside the patient: walls, lamps, staff."""
    h, w = shape
    wall = np.array(rng.choice([(150, 160, 120), (170, 175, 165), (140, 150, 150)]), np.float32)
    grad = np.linspace(1.15, 0.7, h, dtype=np.float32)[:, None, None]
    room = np.clip(wall[None, None, :] * grad * (1 + 0.08 * smooth_noise(rng, shape, 5)[..., None]), 0, 255)
    room = room.astype(np.uint8)
    floor_y = int(h * rng.uniform(0.65, 0.8))
    room[floor_y:] = np.array(rng.choice([(110, 115, 105), (95, 100, 100)]), np.uint8)
    for _ in range(int(rng.integers(2, 4))):  # ceiling lamps
        c = (int(rng.uniform(0.1, 0.9) * w), int(rng.uniform(0.05, 0.3) * h))
        cv2.ellipse(room, c, (int(w * 0.06), int(h * 0.05)), 0, 0, 360, (245, 250, 250), -1, cv2.LINE_AA)
    cv2.rectangle(room, (int(0.3 * w), int(0.55 * h)), (int(0.75 * w), int(0.62 * h)), (180, 170, 150), -1)
    for _ in range(int(rng.integers(2, 5))):  # staff in scrubs
        x = int(rng.uniform(0.05, 0.95) * w)
        y = int(rng.uniform(0.35, 0.5) * h)
        scrub = tuple(int(v) for v in rng.choice([(120, 140, 60), (150, 110, 40), (110, 120, 70)]))
        cv2.ellipse(room, (x, y + int(0.22 * h)), (int(0.06 * w), int(0.2 * h)), 0, 0, 360, scrub, -1)
        cv2.circle(room, (x, y), int(0.045 * w), (120, 150, 200), -1, cv2.LINE_AA)
        cv2.ellipse(room, (x, y - int(0.02 * h)), (int(0.05 * w), int(0.03 * h)), 0, 180, 360, scrub, -1)
    return cv2.GaussianBlur(room, (0, 0), 2.0)
