"""Rendering one synthetic laparoscopic cholecystectomy, frame by frame, with exact labels.

The anatomy lives in a world canvas larger than the frame; the camera (pan, zoom, roll,
tremor) warps it into view. The world changes with the surgery (fat dissected away, clips on
the duct, the gallbladder lifted off the liver and bagged), but only in steps of phase
progress, so it is rebuilt rarely and cached. Per frame we only warp, draw instruments, blood
and the bag, and apply the optics (vignette, circular field of view, smoke, fog). Every pixel
drawn is drawn into the colour frame and the CholecSeg8k label map together, so the masks
are exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from or_agent.pipelines.surgery import PHASES, TOOLS, Anatomy
from or_agent.synth.textures import make_room, make_texture_stack
from or_agent.synth.timeline import Timeline

P = {name: i for i, name in enumerate(PHASES)}
#: Bumped whenever rendering changes what a seed produces, so cached datasets are rebuilt.
GENERATOR_VERSION = 2
WORLD_SCALE = 1.5  # world canvas size relative to the frame
PROGRESS_STEPS = 40  # world rebuilt at most this many times per phase


@dataclass(frozen=True)
class FieldOfView:
    """The endoscope's circular image in frame pixels."""

    cx: float
    cy: float
    radius: float


@dataclass(frozen=True)
class RenderedFrame:
    image: np.ndarray  # HxWx3 uint8 BGR
    labels: np.ndarray  # HxW uint8 CholecSeg8k ids
    phase: int
    out_of_body: bool
    smoke: bool
    blur: bool
    bleeding: bool
    tools: tuple[bool, ...]  # presence per pipelines.surgery.TOOLS


# Where the camera looks in each phase (world fraction) and how close it is.
CAMERA_TARGETS = {
    P["Preparation"]: ((0.50, 0.48), 0.95),
    P["CalotTriangleDissection"]: ((0.52, 0.60), 1.25),
    P["ClippingCutting"]: ((0.55, 0.62), 1.35),
    P["GallbladderDissection"]: ((0.42, 0.45), 1.10),
    P["GallbladderPackaging"]: ((0.50, 0.58), 1.00),
    P["CleaningCoagulation"]: ((0.44, 0.42), 1.10),
    P["GallbladderRetraction"]: ((0.60, 0.55), 0.92),
}

# Which instruments are in the field in each phase: (tool name, entry side)
PHASE_TOOLS = {
    P["Preparation"]: ("Grasper",),
    P["CalotTriangleDissection"]: ("Grasper", "Hook"),
    P["ClippingCutting"]: ("Grasper", "Clipper"),
    P["GallbladderDissection"]: ("Grasper", "Hook"),
    P["GallbladderPackaging"]: ("Grasper", "SpecimenBag"),
    P["CleaningCoagulation"]: ("Irrigator", "Bipolar"),
    P["GallbladderRetraction"]: ("Grasper", "SpecimenBag"),
}


def _ellipse(img, lab, centre, axes, angle, colour_or_none, cls):
    c = (int(centre[0]), int(centre[1]))
    a = (max(1, int(axes[0])), max(1, int(axes[1])))
    cv2.ellipse(lab, c, a, angle, 0, 360, int(cls), -1)
    if img is not None:
        cv2.ellipse(img, c, a, angle, 0, 360, colour_or_none, -1, cv2.LINE_AA)


class SurgeryRenderer:
    """Renders the frames of one synthetic surgery. Deterministic for a given seed."""

    def __init__(self, timeline: Timeline, seed: int, width: int = 854, height: int = 480):
        if width < 64 or height < 64:
            raise ValueError(f"frame size {width}x{height} too small (minimum 64x64)")
        self.timeline = timeline
        self.width, self.height = width, height
        rng = np.random.default_rng(seed)
        self._rng_seed = seed
        self.world_w, self.world_h = int(width * WORLD_SCALE), int(height * WORLD_SCALE)
        self.textures = make_texture_stack(rng, (self.world_h, self.world_w))
        self._flat_textures = self.textures.reshape(-1, 3)
        self._pixel_index = np.arange(self.world_w * self.world_h, dtype=np.int64)
        self.room = make_room(rng, (int(height * 1.3), int(width * 1.3)))
        self.mirror = bool(rng.random() < 0.5)
        self.fov = FieldOfView(
            cx=width / 2 + rng.uniform(-0.04, 0.04) * width,
            cy=height / 2 + rng.uniform(-0.04, 0.04) * height,
            radius=rng.uniform(0.31, 0.40) * width,
        )
        self._layout = self._sample_layout(rng)
        self._optics = self._make_optics(rng)
        self._tool_params = self._sample_tools(rng)
        self._motion = rng.uniform(0, 2 * np.pi, 16)
        self._bleed_sites = {ev: rng.uniform(-0.05, 0.05, 2) for ev in timeline.events if ev.kind == "bleeding"}
        self._smoke_img = self._make_smoke(rng)
        self._world_cache: dict[tuple[int, int, bool], tuple[np.ndarray, np.ndarray]] = {}
        self._highlights = rng.uniform(0, 1, (10, 2))

    # ----- per-video random layout -------------------------------------------------------
    def _sample_layout(self, rng) -> dict:
        j = lambda s=0.03: rng.uniform(-s, s)  # noqa: E731 - tiny jitter helper
        return {
            "liver_edge": [(x, 0.44 + 0.06 * np.sin(3 * x + j(1)) + j()) for x in np.linspace(-0.05, 1.05, 12)],
            "gb_fundus": (0.28 + j(), 0.30 + j()),
            "gb_neck": (0.52 + j(), 0.50 + j()),
            "gb_width": 0.085 + j(0.01),
            "duct_end": (0.66 + j(), 0.80 + j()),
            "gi_centre": (0.84 + j(), 0.86 + j()),
            "fat_centre": (0.20 + j(), 0.82 + j()),
            "ligament_x": 0.64 + j(0.06),
            "hepatic_vein": rng.random() < 0.7,
            "vein_offset": (j(0.04), 0.02 + j(0.02)),
        }

    def _make_optics(self, rng) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.height, self.width
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        d = np.sqrt((xx - self.fov.cx) ** 2 + (yy - self.fov.cy) ** 2) / self.fov.radius
        light = np.clip(1.25 - 0.55 * d ** 2, 0.25, 1.2)  # the scope's light falls off to the rim
        vignette = np.clip(light * 200, 0, 255).astype(np.uint8)
        vignette = cv2.merge([vignette] * 3)
        inside = (d <= 1.0).astype(np.uint8) * 255
        return vignette, inside

    def _make_smoke(self, rng) -> np.ndarray:
        from or_agent.synth.textures import smooth_noise
        h, w = self.height, self.width
        n = 0.6 * smooth_noise(rng, (h, w), 5) + 0.4 * smooth_noise(rng, (h, w), 11)
        grey = np.clip(200 + 40 * n, 0, 255).astype(np.uint8)
        return cv2.merge([grey, grey, np.clip(grey.astype(np.int16) + 8, 0, 255).astype(np.uint8)])

    def _sample_tools(self, rng) -> dict:
        params = {}
        for _i, name in enumerate(TOOLS):
            # Trocars: graspers from the upper right, energy and clip applier from the left.
            side = {"Grasper": 0.15, "Bipolar": 0.3, "Hook": 3.6, "Scissors": 3.5, "Clipper": 3.4,
                    "Irrigator": 2.6, "SpecimenBag": 1.4}[name]
            params[name] = {
                "angle": side + rng.uniform(-0.3, 0.3),
                "freq": rng.uniform(0.15, 0.5, 2),
                "phase": rng.uniform(0, 2 * np.pi, 2),
                "reach": rng.uniform(0.08, 0.16),
            }
        return params

    # ----- the world for a phase and its progress ----------------------------------------
    def _w(self, u: float, v: float) -> tuple[float, float]:
        """World fraction to world pixels, mirrored for half the videos."""
        if self.mirror:
            u = 1.0 - u
        return u * self.world_w, v * self.world_h

    def _world(self, phase: int, progress: float, seen_packaging: bool) -> tuple[np.ndarray, np.ndarray]:
        step = min(PROGRESS_STEPS - 1, int(progress * PROGRESS_STEPS))
        key = (phase, step, seen_packaging)
        cached = self._world_cache.get(key)
        if cached is not None:
            return cached
        if len(self._world_cache) > 4:
            self._world_cache.clear()
        labels = self._draw_world_labels(phase, step / PROGRESS_STEPS, seen_packaging)
        idx = labels.ravel().astype(np.int64) * labels.size + self._pixel_index
        colour = self._flat_textures[idx].reshape(self.world_h, self.world_w, 3)
        self._draw_world_details(colour, labels, phase, step / PROGRESS_STEPS)
        colour = self._shade_edges(colour, labels)
        self._world_cache[key] = (colour, labels)
        return colour, labels

    def _draw_world_labels(self, phase: int, p: float, seen_packaging: bool) -> np.ndarray:
        L = self._layout
        W, H = self.world_w, self.world_h
        lab = np.full((H, W), Anatomy.ABDOMINAL_WALL, np.uint8)
        s = min(W, H)
        # Bowel and omentum low in the field.
        _ellipse(None, lab, self._w(*L["gi_centre"]), (0.28 * W, 0.2 * H), 10, None, Anatomy.GI_TRACT)
        _ellipse(None, lab, self._w(*L["fat_centre"]), (0.3 * W, 0.22 * H), -8, None, Anatomy.FAT)
        # Liver fills the top; its lower edge undulates.
        edge = [self._w(u, v) for u, v in L["liver_edge"]]
        liver = np.int32(edge + [self._w(1.05, -0.05), self._w(-0.05, -0.05)])
        cv2.fillPoly(lab, [liver], Anatomy.LIVER)
        lx = L["ligament_x"]
        band = np.int32([self._w(lx - 0.03, -0.05), self._w(lx + 0.03, -0.05), self._w(lx + 0.07, 0.47), self._w(lx, 0.49)])
        cv2.fillPoly(lab, [band], Anatomy.LIVER_LIGAMENT)
        fundus, neck = np.array(L["gb_fundus"]), np.array(L["gb_neck"])
        gb_present = phase <= P["GallbladderDissection"] or (phase == P["GallbladderPackaging"] and p < 0.6 and not seen_packaging)
        lift = 0.0
        if phase == P["GallbladderDissection"]:
            lift = p
        elif phase > P["GallbladderDissection"]:
            lift = 1.0
        # Hepatocystic triangle: connective tissue under the neck, the duct running through it.
        tri = [neck + (-0.08, 0.02), neck + (0.16, 0.06), np.array(L["duct_end"]) + (-0.12, 0.0)]
        if phase <= P["ClippingCutting"]:
            cv2.fillPoly(lab, [np.int32([self._w(*t) for t in tri])], Anatomy.CONNECTIVE_TISSUE)
        duct_w = int(0.022 * s)
        duct_start, duct_end = neck + (0.02, 0.03), np.array(L["duct_end"])
        if phase <= P["ClippingCutting"]:
            cut = phase == P["ClippingCutting"] and p > 0.7
            if cut:  # two stumps with a gap where the scissors went through
                mid = duct_start + 0.45 * (duct_end - duct_start)
                gap = 0.04 * (duct_end - duct_start) / np.linalg.norm(duct_end - duct_start)
                cv2.line(lab, np.int32(self._w(*duct_start)), np.int32(self._w(*(mid - gap))), Anatomy.CYSTIC_DUCT, duct_w)
                cv2.line(lab, np.int32(self._w(*(mid + gap))), np.int32(self._w(*duct_end)), Anatomy.CYSTIC_DUCT, duct_w)
            else:
                cv2.line(lab, np.int32(self._w(*duct_start)), np.int32(self._w(*duct_end)), Anatomy.CYSTIC_DUCT, duct_w)
        else:  # clipped stump left on the patient's side
            stump = duct_start + 0.55 * (duct_end - duct_start)
            cv2.line(lab, np.int32(self._w(*stump)), np.int32(self._w(*duct_end)), Anatomy.CYSTIC_DUCT, duct_w)
        # Fat hides the triangle until it is dissected away.
        cover = {P["Preparation"]: 1.0, P["CalotTriangleDissection"]: 1.0 - 0.85 * p}.get(phase, 0.12)
        if cover > 0.02:
            c = neck + (0.06, 0.12)
            _ellipse(None, lab, self._w(*c), (0.17 * W * cover + 4, 0.15 * H * cover + 4), 15, None, Anatomy.FAT)
        # Liver bed: exposed once the gallbladder comes off; connective tissue while it is peeled.
        bed_c = (fundus + neck) / 2 + (0.0, -0.04)
        axis = neck - fundus
        angle = float(np.degrees(np.arctan2(axis[1], axis[0] if not self.mirror else -axis[0])))
        length = float(np.linalg.norm(axis * (W, H))) / 2 + 0.04 * W
        if lift > 0:
            _ellipse(None, lab, self._w(*bed_c), (length * (0.2 + 0.8 * min(1, lift * 1.3)), L["gb_width"] * H * 1.1), angle,
                     None, Anatomy.CONNECTIVE_TISSUE if lift < 1 else Anatomy.LIVER)
        if L["hepatic_vein"] and lift > 0.5:
            # a branch of the middle hepatic vein shows through the cleared gallbladder bed
            a = bed_c + L["vein_offset"] - (0.1, 0.02)
            b = bed_c + L["vein_offset"] + (0.1, 0.03)
            cv2.line(lab, np.int32(self._w(*a)), np.int32(self._w(*b)), Anatomy.HEPATIC_VEIN, int(0.03 * s))
        if gb_present:
            shift = np.array((0.05, 0.16)) * lift
            if phase == P["GallbladderPackaging"]:
                shift = np.array((0.05, 0.16)) + np.array((0.05, 0.1)) * (p / 0.6)
            centre = (fundus + neck) / 2 + shift
            shrink = 1.0 if phase != P["GallbladderPackaging"] else max(0.2, 1 - p / 0.6)
            _ellipse(None, lab, self._w(*centre), (length * shrink, L["gb_width"] * H * shrink), angle, None, Anatomy.GALLBLADDER)
        if phase == P["CleaningCoagulation"]:  # old blood pooled in the liver bed
            for k in range(3):
                at = bed_c + (0.05 * (k - 1), 0.06 + 0.02 * k)
                axes = (0.02 * W * (1 - 0.7 * p) + 2, 0.012 * H * (1 - 0.7 * p) + 2)
                _ellipse(None, lab, self._w(*at), axes, 20 * k, None, Anatomy.BLOOD)
        return lab

    def _shade_edges(self, colour: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Darken tissue towards region borders, so organs look rounded rather than cut out."""
        edges = (cv2.morphologyEx(labels, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0).astype(np.float32)
        shade = 1.0 - 0.45 * np.minimum(1.0, cv2.GaussianBlur(edges, (0, 0), 9) * 4.0)
        return cv2.multiply(colour, cv2.merge([shade] * 3), dtype=cv2.CV_8U)

    def _draw_world_details(self, colour, labels, phase, p) -> None:
        """Colour-only details that keep the labels: clips on the duct, specular glints."""
        L = self._layout
        s = min(self.world_w, self.world_h)
        neck, duct_end = np.array(L["gb_neck"]), np.array(L["duct_end"])
        duct_start = neck + (0.02, 0.03)
        clips = 0
        if phase == P["ClippingCutting"]:
            clips = min(3, int(p * 5))
        elif phase > P["ClippingCutting"]:
            clips = 2
        direction = (duct_end - duct_start)
        normal = np.array((-direction[1], direction[0])) / np.linalg.norm(direction)
        for k in range(clips):
            t = (0.58 + 0.08 * k) if k < 2 else 0.32
            at = duct_start + t * direction
            a, b = at + 0.035 * normal, at - 0.035 * normal
            pa, pb = np.int32(self._w(*a)), np.int32(self._w(*b))
            # Clips only go on the duct, so recolour only where it is duct.
            stripe = np.zeros(labels.shape, np.uint8)
            cv2.line(stripe, pa, pb, 255, max(3, int(0.012 * s)))
            colour[(stripe > 0) & (labels == Anatomy.CYSTIC_DUCT)] = (205, 210, 215)
        for u, v in self._highlights:
            x, y = int(u * self.world_w), int(v * self.world_h)
            if labels[y, x] in (Anatomy.LIVER, Anatomy.GALLBLADDER, Anatomy.GI_TRACT):
                cv2.ellipse(colour, (x, y), (int(0.012 * s), int(0.005 * s)), int(u * 180), 0, 360, (245, 248, 250), -1, cv2.LINE_AA)

    # ----- per-frame pieces ---------------------------------------------------------------
    def _camera(self, frame: int, phase: int, progress: float) -> np.ndarray:
        t = frame / self.timeline.fps
        (tu, tv), zoom = CAMERA_TARGETS[phase]
        # Ease from the previous phase's view over the first seconds of a phase.
        seg = next(s for s in self.timeline.segments if s.start <= frame < s.end)
        prev = [s for s in self.timeline.segments if s.end <= seg.start]
        if prev:
            (pu, pv), pz = CAMERA_TARGETS[prev[-1].phase]
            a = min(1.0, (frame - seg.start) / (2.0 * self.timeline.fps))
            a = a * a * (3 - 2 * a)
            tu, tv, zoom = pu + a * (tu - pu), pv + a * (tv - pv), pz + a * (zoom - pz)
        m = self._motion
        tu += 0.04 * np.sin(0.21 * t + m[0]) + 0.008 * np.sin(2.1 * t + m[1])
        tv += 0.03 * np.sin(0.17 * t + m[2]) + 0.006 * np.sin(2.7 * t + m[3])
        zoom *= 1.0 + 0.08 * np.sin(0.13 * t + m[4])
        roll = np.radians(4.0 * np.sin(0.11 * t + m[5]))
        cx, cy = self._w(tu, tv)
        half_w, half_h = self.width / (2 * zoom), self.height / (2 * zoom)
        cx = float(np.clip(cx, half_w, self.world_w - half_w))
        cy = float(np.clip(cy, half_h, self.world_h - half_h))
        c, s = np.cos(roll) * zoom, np.sin(roll) * zoom
        return np.array([[c, -s, self.width / 2 - (c * cx - s * cy)],
                         [s, c, self.height / 2 - (s * cx + c * cy)]], np.float32)

    def _tool_tip(self, name: str, frame: int, cam: np.ndarray, phase: int) -> np.ndarray:
        t = frame / self.timeline.fps
        prm = self._tool_params[name]
        L = self._layout
        focus = {
            "Grasper": np.array(L["gb_fundus"]) * 0.4 + np.array(L["gb_neck"]) * 0.6,
            "Hook": np.array(L["gb_neck"]) + (0.05, 0.08),
            "Clipper": np.array(L["gb_neck"]) + (0.07, 0.12),
            "Scissors": np.array(L["gb_neck"]) + (0.07, 0.12),
            "Irrigator": np.array(L["gb_neck"]) + (-0.08, -0.05),
            "Bipolar": np.array(L["gb_neck"]) + (-0.12, -0.07),
            "SpecimenBag": np.array(L["gb_neck"]) + (0.02, 0.12),
        }[name]
        if phase == P["GallbladderDissection"] and name == "Hook":
            focus = np.array(L["gb_fundus"]) * 0.5 + np.array(L["gb_neck"]) * 0.5 + (0.02, 0.02)
        wobble = prm["reach"] * np.array([np.sin(prm["freq"][0] * t * 2 * np.pi / 3 + prm["phase"][0]),
                                          np.sin(prm["freq"][1] * t * 2 * np.pi / 3 + prm["phase"][1])])
        wx, wy = self._w(*(focus + 0.5 * wobble))
        return cam[:, :2] @ np.array([wx, wy], np.float32) + cam[:, 2]

    def _draw_tool(self, img, lab, name: str, tip: np.ndarray, frame: int) -> None:
        prm = self._tool_params[name]
        angle = prm["angle"] if not self.mirror else np.pi - prm["angle"]
        fov = self.fov
        entry = np.array([fov.cx + 1.15 * fov.radius * np.cos(angle), fov.cy - 1.15 * fov.radius * np.sin(angle)])
        axis = tip - entry
        n = np.linalg.norm(axis)
        if n < 1:
            return
        u = axis / n
        v = np.array([-u[1], u[0]])
        r = self.fov.radius
        w_entry, w_tip = 0.075 * r, 0.035 * r
        cls = Anatomy.L_HOOK if name == "Hook" else Anatomy.GRASPER
        t = frame / self.timeline.fps
        if name == "SpecimenBag":
            centre = tip
            axes = (0.28 * r, 0.2 * r)
            ang = float(np.degrees(np.arctan2(u[1], u[0])))
            _ellipse(img, lab, centre, axes, ang, (200, 205, 200), cls)
            cv2.ellipse(img, (int(centre[0]), int(centre[1])), (int(axes[0] * 0.7), int(axes[1] * 0.5)), ang, 200, 340,
                        (240, 240, 240), 3, cv2.LINE_AA)
            # the bag's drawstring runs back to the trocar
            cv2.line(lab, np.int32(centre), np.int32(entry), int(cls), 4)
            cv2.line(img, np.int32(centre), np.int32(entry), (215, 215, 210), 4, cv2.LINE_AA)
            return
        shaft_colour = {"Hook": (215, 215, 220), "Irrigator": (190, 195, 195)}.get(name, (35, 35, 38))
        shaft_end = tip - u * (0.06 * r if name != "Irrigator" else 0.0)
        quad = np.array([entry + v * w_entry, entry - v * w_entry, shaft_end - v * w_tip, shaft_end + v * w_tip])
        q = np.int32(np.round(quad))
        cv2.fillConvexPoly(lab, q, int(cls))
        cv2.fillConvexPoly(img, q, shaft_colour, cv2.LINE_AA)
        # a specular line along the shaft
        cv2.line(img, np.int32(entry + v * w_entry * 0.4), np.int32(shaft_end + v * w_tip * 0.4), (235, 235, 235), 2, cv2.LINE_AA)
        metal = (180, 180, 185)
        if name == "Hook":
            bend = tip + v * 0.035 * r
            pts = np.int32([shaft_end, tip, bend])
            cv2.polylines(lab, [pts], False, int(cls), max(2, int(0.018 * r)))
            cv2.polylines(img, [pts], False, metal, max(2, int(0.018 * r)), cv2.LINE_AA)
        elif name == "Irrigator":
            cv2.circle(lab, np.int32(tip), int(w_tip), int(cls), -1)
            cv2.circle(img, np.int32(tip), int(w_tip), (150, 150, 150), -1, cv2.LINE_AA)
        else:
            opening = 0.5 + 0.5 * np.sin(1.3 * t + prm["phase"][0]) if name in ("Grasper", "Bipolar", "Scissors") else 0.35
            jaw_len = (0.11 if name != "Scissors" else 0.14) * r
            for sign in (1, -1):
                d = u * np.cos(0.35 * opening) + sign * v * np.sin(0.35 * opening)
                jaw = np.array([shaft_end + sign * v * w_tip * 0.9, shaft_end + d * jaw_len,
                                shaft_end + d * jaw_len * 0.9 - sign * v * 2, shaft_end])
                jq = np.int32(np.round(jaw))
                cv2.fillConvexPoly(lab, jq, int(cls))
                cv2.fillConvexPoly(img, jq, (120, 90, 70) if name == "Bipolar" else metal, cv2.LINE_AA)
            if name == "Clipper":
                cv2.line(img, np.int32(shaft_end + u * jaw_len * 0.5), np.int32(shaft_end + u * jaw_len * 0.95), (220, 225, 230), 3)

    def _tools_in_view(self, phase: int, progress: float) -> tuple[str, ...]:
        names = list(PHASE_TOOLS[phase])
        if phase == P["ClippingCutting"] and progress > 0.62:
            names[1] = "Scissors" if progress < 0.92 else names[1]
            if progress >= 0.92:
                names = names[:1]
        if phase == P["CleaningCoagulation"] and not (0.3 < progress < 0.7):
            names = names[:1]  # the bipolar only comes in to coagulate mid-phase
        if progress < 0.04 or progress > 0.97:
            names = names[:1]  # the second instrument is still entering or already out
        return tuple(names)

    # ----- the frame ----------------------------------------------------------------------
    def render(self, frame: int) -> RenderedFrame:
        tl = self.timeline
        phase, progress = tl.phase_at(frame)
        seen_packaging = P["GallbladderPackaging"] in tl.phases_seen_before(frame) and phase != P["GallbladderPackaging"]
        oob = tl.active("out_of_body", frame) is not None
        tools_present = [False] * len(TOOLS)
        bleeding = False
        if oob:
            t = frame / tl.fps
            dx = (0.5 + 0.4 * np.sin(0.7 * t + self._motion[6])) * (self.room.shape[1] - self.width)
            dy = (0.5 + 0.4 * np.sin(0.5 * t + self._motion[7])) * (self.room.shape[0] - self.height)
            img = self.room[int(dy):int(dy) + self.height, int(dx):int(dx) + self.width].copy()
            lab = np.zeros((self.height, self.width), np.uint8)
        else:
            cam = self._camera(frame, phase, progress)
            world_colour, world_labels = self._world(phase, progress, seen_packaging)
            size = (self.width, self.height)
            img = cv2.warpAffine(world_colour, cam, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            lab = cv2.warpAffine(world_labels, cam, size, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT)
            bleed = tl.active("bleeding", frame)
            if bleed is not None:
                bleeding = self._draw_bleed(img, lab, bleed, frame, cam)
            for name in self._tools_in_view(phase, progress):
                self._draw_tool(img, lab, name, self._tool_tip(name, frame, cam, phase), frame)
                tools_present[TOOLS.index(name)] = True
        vignette, inside = self._optics
        img = cv2.multiply(img, vignette, scale=1 / 200.0)
        smoke_ev = tl.active("smoke", frame)
        smoke = False
        if smoke_ev is not None:
            density = 0.75 * np.sin(np.pi * (frame - smoke_ev.start + 0.5) / (smoke_ev.end - smoke_ev.start))
            img = cv2.addWeighted(img, 1.0 - density, self._smoke_img, density, 0.0)
            smoke = density >= 0.3
        blur_ev = tl.active("blur", frame)
        blurred = False
        if blur_ev is not None:
            sigma = 6.0 * np.sin(np.pi * (frame - blur_ev.start + 0.5) / (blur_ev.end - blur_ev.start))
            if sigma > 0.5:
                img = cv2.GaussianBlur(img, (0, 0), sigma)
            blurred = sigma >= 2.5
        img = cv2.bitwise_and(img, img, mask=inside)
        lab = cv2.bitwise_and(lab, inside // 255 * 255)
        return RenderedFrame(img, lab, phase, oob, bool(smoke), bool(blurred), bleeding, tuple(tools_present))

    def _draw_bleed(self, img, lab, ev, frame, cam) -> bool:
        L = self._layout
        k = (frame - ev.start + 1) / (ev.end - ev.start)
        grow = min(1.0, k / 0.7) if k < 0.7 else max(0.15, (1 - k) / 0.3)
        site = np.array(L["gb_neck"]) + (0.04, 0.06) + self._bleed_sites[ev]
        wx, wy = self._w(*site)
        c = cam[:, :2] @ np.array([wx, wy], np.float32) + cam[:, 2]
        zoom = float(np.hypot(cam[0, 0], cam[1, 0]))
        r = (4 + 0.09 * self.fov.radius * grow) * zoom
        _ellipse(img, lab, c, (r, r * 0.7), 30, (15, 10, 110), Anatomy.BLOOD)
        cv2.ellipse(img, (int(c[0] - r * 0.3), int(c[1] - r * 0.2)), (max(1, int(r * 0.25)), max(1, int(r * 0.1))), 30, 0, 360,
                    (170, 170, 230), -1)
        inside = 0 <= c[0] < self.width and 0 <= c[1] < self.height
        return bool(inside)
