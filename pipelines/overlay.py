"""Drawing what the agent concluded onto the frame: shared by replay and the OR display.

Every segmentation model's classes are drawn as translucent masks in its manifest's colours, each
labelled at its centre; image-level classifications (the Critical View of Safety) as a line each;
the phase as a banner with its confidence and time in phase; alerts as banners coloured by
severity. When there is nothing current to show (camera out of the body, a scene the models do not
know, results stale, AI unavailable) the frame is dimmed and says so in large letters, so a surgeon
can never mistake an old overlay for a live one. Out-of-body frames show the operating room and its
staff, so they are redacted (blacked out) rather than drawn: nothing of them reaches a recording or a
stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from or_agent.pipelines.cvs import cvs_text
from or_agent.pipelines.manifest import Label
from or_agent.pipelines.messages import CVS_OUTPUT, ClassificationEstimate, FrameResult, SegmentationEstimate

FONT = cv2.FONT_HERSHEY_SIMPLEX
SEVERITY_COLOURS = {"info": (160, 110, 30), "warning": (0, 150, 230), "critical": (20, 20, 210)}  # BGR


@dataclass(frozen=True)
class AlertBanner:
    severity: str  # info, warning, critical
    message: str

    def __post_init__(self):
        if self.severity not in SEVERITY_COLOURS:
            raise ValueError(f"unknown severity {self.severity!r}")


def _text(img, text, org, scale, colour=(255, 255, 255), thickness=1, background=None, pad=4):
    (tw, th), base = cv2.getTextSize(text, FONT, scale, thickness)
    x, y = int(org[0]), int(org[1])
    if background is not None:
        cv2.rectangle(img, (x - pad, y - th - pad), (x + tw + pad, y + base + pad), background, -1)
    cv2.putText(img, text, (x, y), FONT, scale, colour, thickness, cv2.LINE_AA)
    return tw, th + base


def format_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 60:02d}:{s % 60:02d}" if s < 3600 else f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


MAX_ALERT_ROWS = 6  # banners (the summary line included) at most, whatever the frame's height ...
MAX_ALERT_FRACTION = 0.4  # ... and at most this share of it: the surgical field stays visible
SEVERITY_RANK = {"critical": 2, "warning": 1, "info": 0}


def fit_text(text: str, fs: float, thickness: int, max_w: int, keep: str = "") -> str:
    """``text + keep``, with ``text`` cut and ended by "..." so that the whole is at most ``max_w``
    pixels wide (``keep``, e.g. "+3 more", is kept whole while it fits at all)."""
    def width(s: str) -> int:
        return cv2.getTextSize(s, FONT, fs, thickness)[0][0]

    if width(text + keep) <= max_w:
        return text + keep
    if keep and width("..." + keep) > max_w:
        return fit_text(text + keep, fs, thickness, max_w)
    lo, hi = 0, len(text)  # the longest prefix that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if width(text[:mid].rstrip() + "..." + keep) <= max_w:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "..." + keep if lo or width("..." + keep) <= max_w else ""


def alert_metrics(h: int) -> tuple[float, int, int]:
    """Font scale, row height and thickness of the alert banners on a frame ``h`` pixels high (the
    agent's composited picture and the display use the same, so the display's cover the agent's)."""
    fs = max(0.45, h / 1000)
    return fs, int(34 * fs * 1.3), max(1, int(fs * 2))


def alert_rows_fit(h: int, bottom: int = 0) -> int:
    """How many banner rows (the summary line included) the frame takes, ``bottom`` pixels kept free below."""
    _, row, _ = alert_metrics(h)
    return max(1, min(MAX_ALERT_ROWS, int(h * MAX_ALERT_FRACTION) // row, (h - bottom - 6) // row))


def draw_alert_banners(out: np.ndarray, alerts: Sequence[AlertBanner], suffix: str = "") -> None:
    """One coloured banner per alert, stacked up from the bottom edge, most severe at the bottom: as many
    as fit (``alert_rows_fit``), the rest summed up in one line "+K more alerts", every text cut to the
    frame's width, so a critical alert is never the one pushed off the screen."""
    h, w = out.shape[:2]
    fs, row, thickness = alert_metrics(h)
    ordered = sorted(alerts, key=lambda a: -SEVERITY_RANK[a.severity])
    fit = alert_rows_fit(h)
    shown = ordered if len(ordered) <= fit else ordered[:max(1, fit - 1)]
    rest = ordered[len(shown):]
    rows = [(a.severity, fit_text(f"{a.severity.upper()}: {a.message}{suffix}", fs, thickness, w - 20)) for a in shown]
    if rest:
        rows.append((rest[0].severity, fit_text(f"+{len(rest)} more alerts", fs, thickness, w - 20)))
    for i, (severity, text) in enumerate(rows[:fit]):
        y = h - 10 - i * row
        cv2.rectangle(out, (0, y - row + 4), (w, y + 4), SEVERITY_COLOURS[severity], -1)
        cv2.putText(out, text, (10, y - 6), FONT, fs, (255, 255, 255), thickness, cv2.LINE_AA)


class _Palette:
    """One segmentation model's class names and colours, as lookup tables."""

    def __init__(self, labels: Sequence[Label], hidden_classes: Sequence[int]):
        self.names = [lab.name for lab in labels]
        lut = np.zeros((256, 3), np.uint8)
        for lab in labels:
            lut[lab.id] = lab.color[::-1]  # manifests give RGB
        self.channel_luts = [np.ascontiguousarray(lut[:, i]) for i in range(3)]  # B, G, R: one table per plane
        self.hidden = np.zeros(256, bool)
        self.hidden[list(hidden_classes)] = True
        self.shown_lut = np.where(self.hidden, 0, 1).astype(np.uint8)  # 1: the class is drawn


def classification_text(c: ClassificationEstimate) -> str:
    """One line for an image-level output: the CVS in its own words, any other as ``name: label p ...``."""
    if c.name == CVS_OUTPUT:
        return cvs_text(c.items())
    return f"{c.name}: " + "  ".join(f"{label} {p:.2f}" for label, p in c.items())


def _scaled_crop(area, frame_size: tuple[int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """The content crop in an image of ``width`` x ``height``: the frame's own size, or a scaled copy of
    it (a recording at reduced resolution is drawn after scaling, which is cheaper per pixel)."""
    if (width, height) == tuple(frame_size):
        return area.x0, area.y0, area.x1, area.y1
    fx, fy = width / frame_size[0], height / frame_size[1]
    x0, y0 = min(width - 1, int(round(area.x0 * fx))), min(height - 1, int(round(area.y0 * fy)))
    return x0, y0, max(x0 + 1, min(width, int(round(area.x1 * fx)))), max(y0 + 1, min(height, int(round(area.y1 * fy))))


class OverlayRenderer:
    """Draws results; ``labels`` are the segmentation classes, per model name (or one list for any model)."""

    def __init__(self, labels: Sequence[Label] | Mapping[str, Sequence[Label]], alpha: float = 0.4,
                 min_label_fraction: float = 0.004, hidden_classes: Sequence[int] = (0,)):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.min_label_fraction = min_label_fraction
        per_model = labels if isinstance(labels, Mapping) else {None: labels}
        self._palettes = {model: _Palette(labs, hidden_classes) for model, labs in per_model.items()}
        self._kernel = np.ones((3, 3), np.uint8)
        self._grid_cache: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None
        self._stripes_cache: tuple[tuple[int, int], np.ndarray] | None = None

    @classmethod
    def for_models(cls, manifests, **kw) -> OverlayRenderer:
        """For a model set's models (``ModelManifest``s): the segmentation models' labels by name."""
        return cls({m.name: m.labels for m in manifests if m.task == "segmentation"}, **kw)

    def _palette(self, model: str) -> _Palette | None:
        return self._palettes.get(model) or self._palettes.get(None)

    def draw(self, image: np.ndarray, result: FrameResult | None, alerts: Sequence[AlertBanner] = (),
             paused_reason: str | None = None) -> np.ndarray:
        """A copy of ``image`` with the overlay. ``paused_reason`` (e.g. "results stale") forces
        the paused state; a missing result and a result that is paused itself (out of body, an
        unfamiliar scene: ``FrameResult.paused_reason``) pause it on their own."""
        if result is not None and result.out_of_body:
            # The room and the staff must not appear in anything recorded or streamed.
            out = np.zeros_like(image)
            self._paused(out, "camera out of body - frame redacted")
            self._alerts(out, alerts)
            return out
        out = image.copy()
        if paused_reason is None:
            paused_reason = "no AI result" if result is None else result.paused_reason
        if paused_reason is not None:
            self._paused(out, paused_reason)
        elif result is not None:
            for seg in result.segmentations:
                self._segmentation(out, seg, result.frame_size)
            if result.phase is not None:
                self._phase_banner(out, result)
            for output, why in result.withheld:  # where the output would be: that it is not shown, and why
                _text(out, f"{output.capitalize()} not shown: {why}", (10, 26), out.shape[0] / 1000, (255, 255, 255), 1,
                      (70, 70, 70))
            h = out.shape[0]
            for i, c in enumerate(result.classifications):
                # image-level outputs (the critical view of safety), a line each above the alerts
                _text(out, classification_text(c), (10, h - 12 - 34 * (len(alerts) + 1 + i)), h / 1100, (255, 255, 255), 1,
                      (40, 40, 40))
            if result.visibility is not None and result.visibility.low_visibility:
                h = out.shape[0]
                _text(out, "LOW VISIBILITY", (10, h - 12 - 34 * len(alerts)), h / 900, (0, 220, 255), 2, (0, 0, 0))
        self._alerts(out, alerts)
        return out

    def _segmentation(self, out: np.ndarray, est: SegmentationEstimate, frame_size: tuple[int, int]) -> None:
        pal = self._palette(est.model)
        if pal is None:
            return  # a model this renderer was not given colours for
        x0, y0, x1, y1 = _scaled_crop(est.area, frame_size, out.shape[1], out.shape[0])
        w, h = x1 - x0, y1 - y0
        cmap = est.class_map
        # Colour at the model's resolution, then scale up: the class map has no finer detail anyway.
        shown_lut = pal.shown_lut.copy()
        shown_lut[[c for c in range(len(est.confidence)) if not est.drawn(c)]] = 0  # not confident enough
        shown_small = cv2.LUT(cmap, shown_lut)  # OpenCV's table look-ups: several times numpy's indexing
        edges_small = cv2.morphologyEx(cmap, cv2.MORPH_GRADIENT, self._kernel)
        edges_small = cv2.bitwise_and(cv2.threshold(edges_small, 0, 1, cv2.THRESH_BINARY)[1], shown_small)
        how_small = cv2.add(shown_small, edges_small)  # 0 not drawn, 1 blended, 2 outlined
        # One pixel = four bytes (B, G, R and how it is drawn; a one-channel look-up per plane beats one
        # three-channel look-up), scaled up as one 32-bit plane: one nearest-neighbour resize instead of three
        # (``python -m bench.cpu_paths_bench``, section 8).
        small = cv2.merge([*(cv2.LUT(cmap, table) for table in pal.channel_luts), how_small])
        packed = small.view(np.int32).reshape(small.shape[:2])
        big = cv2.resize(packed, (w, h), interpolation=cv2.INTER_NEAREST).view(np.uint8).reshape(h, w, 4)
        colour = cv2.cvtColor(big, cv2.COLOR_BGRA2BGR)
        how = cv2.extractChannel(big, 3)
        shown = cv2.threshold(how, 0, 255, cv2.THRESH_BINARY)[1]  # how > 0
        edges = cv2.threshold(how, 1, 255, cv2.THRESH_BINARY)[1]  # how == 2
        roi = out[y0:y1, x0:x1]
        blended = cv2.addWeighted(roi, 1.0 - self.alpha, colour, self.alpha, 0.0)
        cv2.copyTo(blended, shown, roi)
        # Outline each region so boundaries stay readable where colours are close.
        cv2.copyTo(colour, edges, roi)
        # Label positions from every other pixel of a large map: a quarter of the work, and the centre
        # of a region that is labelled at all (>= 0.4 % of the map) moves by about a pixel of the map.
        step = 2 if cmap.size >= 40_000 else 1
        grid = np.ascontiguousarray(cmap[::step, ::step])
        scale_x, scale_y = w / cmap.shape[1] * step, h / cmap.shape[0] * step
        ys, xs = self._grid(grid.shape)
        flat = grid.ravel()
        counts = np.bincount(flat, minlength=len(pal.names))
        cx = np.bincount(flat, xs, minlength=len(pal.names))
        cy = np.bincount(flat, ys, minlength=len(pal.names))
        fs = max(0.35, out.shape[0] / 1400)
        for c in np.flatnonzero(counts > self.min_label_fraction * flat.size):
            if c >= len(pal.names) or pal.hidden[c] or not est.drawn(c):
                continue
            x = x0 + cx[c] / counts[c] * scale_x
            y = y0 + cy[c] / counts[c] * scale_y
            _text(out, pal.names[c], (x - 30, y), fs, (255, 255, 255), 1, (40, 40, 40), pad=2)

    def _grid(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Flattened pixel coordinates of a class map, cached per size."""
        if self._grid_cache is None or self._grid_cache[0] != shape:
            ys, xs = np.indices(shape)
            self._grid_cache = (shape, ys.ravel().astype(np.float64), xs.ravel().astype(np.float64))
        return self._grid_cache[1], self._grid_cache[2]

    def _stripes(self, h: int, w: int) -> np.ndarray:
        """The paused frame's yellow and black hazard band for a ``w``-wide frame ``h`` high, cached per size
        (drawn on every frame while paused)."""
        if self._stripes_cache is None or self._stripes_cache[0] != (h, w):
            stripe = min(max(6, h // 60), max(1, h // 4))
            xs = np.arange(w)[None, :] + np.arange(stripe)[:, None]
            band = np.zeros((stripe, w, 3), np.uint8)
            band[(xs // (2 * stripe)) % 2 == 0] = (0, 210, 255)
            self._stripes_cache = ((h, w), band)
        return self._stripes_cache[1]

    def _phase_banner(self, out: np.ndarray, result: FrameResult) -> None:
        p = result.phase
        h = out.shape[0]
        fs = max(0.45, h / 1000)
        text = f"{p.name}  {100 * p.confidence:.0f}%  {format_duration(p.time_in_phase_s)}"
        _text(out, text, (12, 12 + 26 * fs * 1.2), fs, (255, 255, 255), max(1, int(fs * 2)), (60, 40, 0))

    def _alerts(self, out: np.ndarray, alerts: Sequence[AlertBanner]) -> None:
        draw_alert_banners(out, alerts)

    def _paused(self, out: np.ndarray, reason: str) -> None:
        h, w = out.shape[:2]
        cv2.convertScaleAbs(out, dst=out, alpha=0.4)  # dim: nothing on screen is current
        stripes = self._stripes(h, w)
        out[:stripes.shape[0]] = stripes
        out[h - stripes.shape[0]:] = stripes
        fs = max(0.8, h / 300)
        (tw, th), _ = cv2.getTextSize("AI PAUSED", FONT, fs, max(2, int(fs * 2)))
        _text(out, "AI PAUSED", ((w - tw) / 2, h / 2), fs, (0, 210, 255), max(2, int(fs * 2)), (0, 0, 0), pad=10)
        fs2 = fs / 2.5
        (tw2, _), _ = cv2.getTextSize(reason, FONT, fs2, 1)
        _text(out, reason, ((w - tw2) / 2, h / 2 + th + 20), fs2, (255, 255, 255), max(1, int(fs2 * 2)), (0, 0, 0))
