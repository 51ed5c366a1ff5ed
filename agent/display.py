"""``or-agent display``: the reference OR display client.

Subscribes to a running agent and shows the video with its overlays full screen (OpenCV window):

- by default the agent's composited JPEG stream;
- with ``--video FILE``, a local copy of the video played at its own rate, with each overlay drawn
  on the frame whose media timestamp it carries (the video pass-through never waits for the AI).

The connection state is always on screen. There is one notice in the middle of the screen at most:

- **AI PAUSED** and the agent's reason when the newest overlay is fresh and the agent paused it (out
  of body, stalled stage, source lost). When the picture is the agent's own composited JPEG of that
  overlay, the agent already wrote it there and the display adds nothing.
- **AI OFF** and the display's reason when there is no agent to vouch for anything: the stream is
  down, no overlay yet, or the newest is older than ``--stale-ms`` (default 250 ms). An old overlay
  is never drawn as if it were current.

Alert banners are stacked up from the bottom edge, most severe first, never more than fit the
frame (the rest in one line "+K more alerts"), each cut to the frame's width. Keys (all in
:class:`ViewState`, a pure state object, except ``a`` and ``q``): ``o`` hides or shows the
overlays (a small "AI OFF (o)" says they are hidden), ``1``-``9`` hide or show the current model's
classes, ``c`` cycles showing one class alone, ``m`` the next segmentation model, ``+``/``-`` the
opacity, ``h`` the help line, ``a`` acknowledges the most severe unacknowledged alert, ``q`` quits.
The overlay keys act on what the display draws itself (``--video``); the agent's composited JPEG
has its overlays drawn in. It reconnects with backoff and resumes the alert stream after the last
alert it saw (so no alert is lost). ``--headless OUT.mp4`` (automatic when there is no screen)
writes what it would show to a video file instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import cv2
import grpc
import numpy as np

from or_agent.pipelines.cvs import cvs_text
from or_agent.pipelines.errors import InputError, OrAgentError
from or_agent.pipelines.overlay import FONT, SEVERITY_COLOURS, alert_metrics, alert_rows_fit, fit_text, format_duration
from or_agent.pipelines.video_out import H264Writer
from or_agent.proto.oragent.v1 import agent_pb2 as pb
from or_agent.proto.oragent.v1 import agent_pb2_grpc as pbg

log = logging.getLogger("or-agent.display")
SEVERITY_NAME = {pb.INFO: "info", pb.WARNING: "warning", pb.CRITICAL: "critical"}
WINDOW = "or-agent"
YELLOW = (0, 210, 255)  # BGR, the agent's "AI PAUSED" colour
WHITE = (255, 255, 255)
OPACITY_STEP, OPACITY_MIN, OPACITY_MAX = 0.1, 0.1, 1.0
ACK_HINT = "  [a = acknowledge]"
REPORT_PROGRESS_EVERY_S = 1.0


@dataclass
class DisplayState:
    connected: bool = False
    status_text: str = "connecting"
    newest: pb.Overlay | None = None
    newest_at: float = 0.0  # monotonic time the newest overlay arrived
    newest_jpeg: np.ndarray | None = None
    jpeg_of_newest: bool = False  # newest_jpeg is the newest overlay's own composited picture
    newest_position: int = 0  # the newest overlay's position in the current stream (0: none yet)
    shown_position: int = 0  # the stream position of the newest overlay drawn on screen
    by_media_ms: dict[int, pb.Overlay] = field(default_factory=dict)  # recent overlays for --video matching
    classes_seen: dict[str, dict[int, str]] = field(default_factory=dict)  # model -> class id -> name, from regions
    alerts: dict[str, pb.AlertEvent] = field(default_factory=dict)  # active alerts by id
    last_alert_seq: int = 0
    agent_instance: str = ""  # the agent instance that numbered last_alert_seq
    alert_log: list[pb.AlertEvent] = field(default_factory=list)  # every event seen, in order (bounded)


# ----- what the surgeon chose to see ------------------------------------------------------------


@dataclass(frozen=True)
class ModelClasses:
    """A segmentation model and its classes (background excluded), in the order the keys number them."""

    name: str
    classes: tuple[tuple[int, str], ...]  # (class id, name)


@dataclass(frozen=True)
class ViewState:
    """The display's view options, changed only by keys: ``apply_key`` returns the new state."""

    overlays_shown: bool = True
    opacity: float = 0.4
    hidden: frozenset[tuple[str, int]] = frozenset()  # (model, class id) not drawn
    help_shown: bool = True
    models: tuple[ModelClasses, ...] = ()  # the agent's segmentation models, as far as known
    model_index: int = 0  # the model the class keys address

    @property
    def current(self) -> ModelClasses | None:
        return self.models[self.model_index] if 0 <= self.model_index < len(self.models) else None

    def shows(self, model: str, class_id: int) -> bool:
        return self.overlays_shown and (model, class_id) not in self.hidden

    def with_models(self, models: Sequence[ModelClasses]) -> ViewState:
        models = tuple(models)
        if models == self.models:
            return self
        keep = self.current.name if self.current is not None else None
        names = [m.name for m in models]
        return replace(self, models=models, model_index=names.index(keep) if keep in names else 0)

    def apply_key(self, key: int | str) -> ViewState:
        """The state after ``key`` (a character or a ``cv2.waitKey`` code); unknown keys change nothing."""
        if isinstance(key, int):
            if not 0 < key < 256:
                return self
            key = chr(key)
        if key == "o":
            return replace(self, overlays_shown=not self.overlays_shown)
        if key == "h":
            return replace(self, help_shown=not self.help_shown)
        if key in ("+", "="):
            return replace(self, opacity=round(min(OPACITY_MAX, self.opacity + OPACITY_STEP), 1))
        if key in ("-", "_"):
            return replace(self, opacity=round(max(OPACITY_MIN, self.opacity - OPACITY_STEP), 1))
        if key == "m" and self.models:
            return replace(self, model_index=(self.model_index + 1) % len(self.models))
        cur = self.current
        if cur is None:
            return self
        if len(key) == 1 and key in "123456789":
            i = int(key) - 1
            if i >= len(cur.classes):
                return self
            k = (cur.name, cur.classes[i][0])
            return replace(self, hidden=self.hidden - {k} if k in self.hidden else self.hidden | {k})
        if key == "c":  # all classes -> the first alone -> the second alone -> ... -> all again
            ids = [c for c, _ in cur.classes]
            if not ids:
                return self
            shown = [c for c in ids if (cur.name, c) not in self.hidden]
            others = self.hidden - {(cur.name, c) for c in ids}
            nxt = ids.index(shown[0]) + 1 if len(shown) == 1 else 0
            if len(shown) == 1 and nxt >= len(ids):
                return replace(self, hidden=others)
            return replace(self, hidden=others | {(cur.name, c) for c in ids if c != ids[nxt]})
        return self

    def filter_note(self) -> str | None:
        """The class filter in words, per model: "hidden: Liver" or, when most are hidden, "only: Liver"."""
        notes = []
        for m in self.models:
            hidden = [n for c, n in m.classes if (m.name, c) in self.hidden]
            if not hidden:
                continue
            shown = [n for c, n in m.classes if (m.name, c) not in self.hidden]
            note = f"only: {', '.join(shown) or 'none'}" if len(shown) < len(hidden) else f"hidden: {', '.join(hidden)}"
            notes.append(f"{m.name} {note}" if len(self.models) > 1 else note)
        return "; ".join(notes) or None


def help_line(view: ViewState, local_video: bool) -> str:
    if not local_video:
        return "a acknowledge  h help  q quit  (o, 1-9, +/-: need --video, the agent draws this picture)"
    model = view.current
    classes = f"1-9 c {model.name} classes" if model is not None else "1-9 c classes"
    return (f"o overlays  {classes}{'  m model' if len(view.models) > 1 else ''}  +/- opacity "
            f"{100 * view.opacity:.0f}%  a acknowledge  h help  q quit")


# ----- drawing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drawn:
    """One text the display drew, with its box (background included) in image pixels."""

    text: str
    x0: int
    y0: int
    x1: int
    y1: int

    def overlaps(self, other: Drawn) -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1


class Canvas:
    """An image and the texts drawn on it, so what is on screen can be checked without a window."""

    def __init__(self, img: np.ndarray):
        self.img = img
        self.drawn: list[Drawn] = []

    @property
    def texts(self) -> list[str]:
        return [d.text for d in self.drawn]

    def text(self, text: str, org: tuple[float, float], fs: float, colour=WHITE, thickness: int = 1,
             background=None, pad: int = 4, box: tuple[int, int, int, int] | None = None) -> Drawn:
        """``text`` with its baseline at ``org``; on ``background`` padded by ``pad``, or over ``box``."""
        (tw, th), base = cv2.getTextSize(text, FONT, fs, thickness)
        x, y = int(org[0]), int(org[1])
        rect = box or (x - pad, y - th - pad, x + tw + pad, y + base + pad)
        if background is not None:
            cv2.rectangle(self.img, rect[:2], rect[2:], background, -1)
        cv2.putText(self.img, text, (x, y), FONT, fs, colour, thickness, cv2.LINE_AA)
        d = Drawn(text, *rect) if background is not None else Drawn(text, x, y - th, x + tw, y + base)
        self.drawn.append(d)
        return d


def _help_metrics(h: int) -> tuple[float, int]:
    fs = max(0.35, h / 1400)
    return fs, cv2.getTextSize("Ag", FONT, fs, 1)[0][1] + 12


def sort_alerts(alerts: Sequence[pb.AlertEvent]) -> list[pb.AlertEvent]:
    """Most severe first; within a severity unacknowledged first, newest first."""
    return sorted(alerts, key=lambda a: (-a.severity, a.kind == pb.AlertEvent.ACKNOWLEDGED, -a.sequence))


@dataclass(frozen=True)
class BannerRow:
    severity: str
    text: str


def _banner_text(sev: str, message: str, extras: tuple[str, str, str], fs: float, thickness: int, max_w: int) -> str:
    """"SEVERITY: message" and its ``extras`` (ack, hint, count of the rest) cut to ``max_w``: where the
    frame is narrow the hint goes first, then the ack, rather than all but a few letters of the
    message; the count of the rest goes last of all."""
    ack, hint, more = extras
    full = f"{sev.upper()}: {message}"
    some = len(sev) + 2 + min(16, len(message))  # the severity and the message's first words
    for keep, least in ((ack + hint + more, some), (ack + more, some), (more, some), ("", some), (more, len(sev) + 1)):
        text = fit_text(full, fs, thickness, max_w, keep)
        if text.endswith(keep) and len(text.removesuffix(keep).removesuffix("...")) >= least:
            return text
    return fit_text(full, fs, thickness, max_w)


def alert_banner_rows(alerts: Sequence[pb.AlertEvent], w: int, h: int, bottom: int = 0) -> list[BannerRow]:
    """The banners to draw, bottom row first: the most severe alerts that fit, then, if any are left
    over, one line "+K more alerts" (in the colour of the most severe of those); texts cut to ``w``."""
    fs, _, thickness = alert_metrics(h)
    ordered = sort_alerts(alerts)
    if not ordered:
        return []
    fit = alert_rows_fit(h, bottom)
    shown = ordered if len(ordered) <= fit else ordered[:max(1, fit - 1)]
    rest = ordered[len(shown):]
    hint_on = next((a.alert_id for a in ordered if a.kind != pb.AlertEvent.ACKNOWLEDGED), None)
    max_w = w - 20
    rows = []
    for i, a in enumerate(shown):
        sev = SEVERITY_NAME.get(a.severity, "warning")
        ack = " (ack)" if a.kind == pb.AlertEvent.ACKNOWLEDGED else ""
        hint = ACK_HINT if a.alert_id == hint_on else ""
        more = f"  +{len(rest)} more" if rest and fit == 1 and i == len(shown) - 1 else ""  # no summary row
        rows.append(BannerRow(sev, _banner_text(sev, a.message, (ack, hint, more), fs, thickness, max_w)))
    if rest and fit > 1:
        counts = Counter(SEVERITY_NAME.get(a.severity, "warning") for a in rest)  # most severe first, as sorted
        detail = ", ".join(f"{n} {sev}" for sev, n in counts.items())
        sev = SEVERITY_NAME.get(rest[0].severity, "warning")
        rows.append(BannerRow(sev, fit_text(f"+{len(rest)} more alerts ({detail})", fs, thickness, max_w)))
    return rows


def draw_alerts(canvas: Canvas | np.ndarray, alerts: Sequence[pb.AlertEvent], view: ViewState = ViewState()) -> Canvas:
    """Alert banners stacked up from the bottom edge (above the help line when shown), all on screen."""
    canvas = canvas if isinstance(canvas, Canvas) else Canvas(canvas)
    h, w = canvas.img.shape[:2]
    bottom = _help_metrics(h)[1] if view.help_shown else 0
    fs, row, thickness = alert_metrics(h)
    for i, r in enumerate(alert_banner_rows(alerts, w, h, bottom)):
        y = h - 10 - bottom - i * row
        # the bottom banner reaches down to the help line (or the edge): the block has no gap through
        # which the agent's own banners, drawn into its composited picture, show
        canvas.text(r.text, (10, y - 6), fs, WHITE, thickness, SEVERITY_COLOURS[r.severity],
                    box=(0, max(0, y - row + 4), w, h - bottom if i == 0 else y + 4))
    return canvas


def alerts_height(alerts: Sequence[pb.AlertEvent], h: int, w: int, view: ViewState) -> int:
    """Pixels the alert banners and the help line take at the bottom: what is drawn above them starts there."""
    bottom = _help_metrics(h)[1] if view.help_shown else 0
    return bottom + len(alert_banner_rows(alerts, w, h, bottom)) * alert_metrics(h)[1] + (6 if alerts else 0)


def draw_help(canvas: Canvas, view: ViewState, local_video: bool) -> None:
    if not view.help_shown:
        return
    h, w = canvas.img.shape[:2]
    fs, row = _help_metrics(h)
    text = fit_text(help_line(view, local_video), fs, 1, w - 16)
    canvas.text(text, (8, h - 8), fs, (230, 230, 230), 1, (25, 25, 25), box=(0, h - row, w, h))


@dataclass(frozen=True)
class ScreenMode:
    """What the middle of the screen says: nothing ("live"), the agent's pause, or the display's AI OFF."""

    kind: str  # live | paused | off
    reason: str | None = None


def screen_mode(state: DisplayState, stale_s: float, now: float) -> ScreenMode:
    """The agent's own pause wins while its overlay is fresh; without a fresh overlay (stream down,
    none yet, stale) the display says AI OFF with its own reason: any pause reason is old by then."""
    if not state.connected:
        return ScreenMode("off", f"stream down ({state.status_text})")
    if state.newest is None:
        return ScreenMode("off", "no overlay yet")
    age = now - state.newest_at
    if age > stale_s:
        return ScreenMode("off", f"no fresh overlay for {1000 * age:.0f} ms")
    if state.newest.ai_paused:
        return ScreenMode("paused", state.newest.paused_reason or "AI paused")
    return ScreenMode("live")


def ai_off_reason(state: DisplayState, stale_s: float, now: float) -> str | None:
    """Why no current overlay is drawn (the agent's pause reason or the display's), or None."""
    return screen_mode(state, stale_s, now).reason


def draw_centre_notice(canvas: Canvas, mode: ScreenMode) -> None:
    """"AI PAUSED" or "AI OFF" across the middle with its reason under it; nothing when live."""
    if mode.kind == "live":
        return
    h, w = canvas.img.shape[:2]
    title = "AI PAUSED" if mode.kind == "paused" else "AI OFF"
    big = max(1.0, h / 260)
    thick = max(2, int(big * 2))
    (bw, bh), _ = cv2.getTextSize(title, FONT, big, thick)
    x, y = (w - bw) // 2, h // 2
    canvas.text(title, (x, y), big, YELLOW, thick, (0, 0, 0), box=(x - 20, y - bh - 20, x + bw + 20, y + 20))
    if mode.reason:
        fs, th = big / 3, max(1, int(big / 2))
        reason = fit_text(mode.reason, fs, th, w - 20)
        (rw, _), _ = cv2.getTextSize(reason, FONT, fs, th)
        canvas.text(reason, ((w - rw) // 2, y + int(50 * big / 2)), fs, WHITE, th, (0, 0, 0))


def draw_status(canvas: Canvas | np.ndarray, state: DisplayState, target: str, view: ViewState = ViewState(),
                mode: ScreenMode = ScreenMode("live"), local_video: bool = True) -> Canvas:
    """Top right: the connection state and, under it, what the surgeon hid or changed."""
    canvas = canvas if isinstance(canvas, Canvas) else Canvas(canvas)
    img = canvas.img
    h, w = img.shape[:2]
    fs = max(0.4, h / 1100)
    dot = (60, 200, 60) if state.connected else (40, 40, 220)
    cv2.circle(img, (w - int(14 * fs * 2), int(16 * fs * 2)), int(7 * fs * 2), dot, -1, cv2.LINE_AA)
    label = fit_text(f"{target}: {'connected' if state.connected else state.status_text}", fs, 1, w // 2)
    (tw, th), _ = cv2.getTextSize(label, FONT, fs, 1)
    y = int(22 * fs * 2)
    canvas.text(label, (w - tw - int(30 * fs * 2), y), fs, WHITE, 1)
    if not local_video:
        return canvas  # the agent drew this picture's overlays: the view options do not apply to it
    notes = []
    if not view.overlays_shown:
        # the small reminder that the surgeon switched the overlays off; with a notice in the middle
        # (AI PAUSED or AI OFF) it does not say AI OFF a second time
        notes.append("AI OFF (o)" if mode.kind == "live" else "overlays hidden (o)")
    else:
        if view.filter_note():
            notes.append(view.filter_note())
        if view.opacity != ViewState.opacity:
            notes.append(f"opacity {100 * view.opacity:.0f}%")
    for note in notes:
        y += th + 14
        note = fit_text(note, fs, 1, w // 2)
        (nw, _), _ = cv2.getTextSize(note, FONT, fs, 1)
        canvas.text(note, (w - nw - 12, y), fs, YELLOW if note.startswith("AI OFF") else WHITE, 1, (30, 30, 30))
    return canvas


def segmentation_labels() -> dict[str, list[tuple[int, str, tuple[int, int, int]]]]:
    """Every bundled set's segmentation models: (class id, name, BGR colour) by model, background excluded."""
    from or_agent.pipelines.manifest import set_names
    from or_agent.pipelines.model_set import load_model_set

    out: dict[str, list[tuple[int, str, tuple[int, int, int]]]] = {}
    for name in set_names():
        try:
            models = load_model_set(name, verify=False).models
        except OrAgentError:
            continue  # a set that does not load draws in white; the display still runs
        for m in models:
            if m.task == "segmentation":
                out[m.name] = [(lab.id, lab.name, tuple(lab.color[::-1])) for lab in m.labels if lab.id != 0]
    return out


def segmentation_colours() -> dict[tuple[str, int], tuple[int, int, int]]:
    """BGR colours of every bundled set's segmentation classes, by (model, class id): regions name their model."""
    return {(model, c): colour for model, labs in segmentation_labels().items() for c, _, colour in labs}


def model_classes(ov: pb.Overlay, catalogue: Mapping[str, Sequence[tuple]],
                  seen: Mapping[str, Mapping[int, str]]) -> list[ModelClasses]:
    """The overlay's segmentation models and their classes: from the bundled manifests, else as seen."""
    names = [m.name for m in ov.models if m.task == "segmentation"]
    names += [m for m in seen if m not in names]
    out = []
    for n in names:
        if n in catalogue:
            out.append(ModelClasses(n, tuple((c, name) for c, name, *_ in catalogue[n])))
        elif seen.get(n):
            out.append(ModelClasses(n, tuple(sorted(seen[n].items()))))
    return out


def overlay_on_video(frame: np.ndarray, ov: pb.Overlay, labels: Mapping[tuple[str, int], tuple[int, int, int]],
                     view: ViewState = ViewState(), bottom: int = 0, canvas: Canvas | None = None) -> np.ndarray:
    """Draw an overlay on a local video frame as ``view`` says: its anatomy polygons (every model's,
    in its colours, at the view's opacity, hidden classes left out), phase banner, withheld outputs
    and image-level outputs (those above ``bottom`` pixels from the lower edge). Nothing at all when
    the view hides the overlays."""
    out = frame.copy()
    if canvas is not None:
        canvas.img = out
    if not view.overlays_shown:
        return out
    canvas = canvas or Canvas(out)
    layer = out.copy()
    for region in ov.anatomy:
        if not view.shows(region.model, region.class_id):
            continue
        colour = labels.get((region.model, region.class_id), WHITE)
        polys = [np.array(p.xy, np.int32).reshape(-1, 2) for p in region.polygons]
        cv2.fillPoly(layer, polys, colour)
        cv2.polylines(out, polys, True, colour, 1, cv2.LINE_AA)
    cv2.addWeighted(layer, view.opacity, out, 1 - view.opacity, 0, dst=out)
    y = 8
    if ov.HasField("phase"):
        y = _top_banner(canvas, f"{ov.phase.name}  {100 * ov.phase.confidence:.0f}%  "
                                f"{format_duration(ov.phase.time_in_phase_s)}", (60, 40, 0), 2, y)
    for w in ov.withheld:  # where the output would be: that it is not shown, and why
        y = _top_banner(canvas, f"{w.output.capitalize()} not shown: {w.reason}", (70, 70, 70), 1, y)
    draw_classifications(canvas, ov, bottom)
    return out


def _top_banner(canvas: Canvas, text: str, background: tuple[int, int, int], thickness: int, y: int = 8) -> int:
    """A banner at the top left with its top at ``y``; returns where the next one starts."""
    img = canvas.img
    fs = max(0.45, img.shape[0] / 1000)
    text = fit_text(text, fs, thickness, img.shape[1] // 2)
    (tw, th), _ = cv2.getTextSize(text, FONT, fs, thickness)
    canvas.text(text, (12, y + 4 + th), fs, WHITE, thickness, background, box=(8, y, 16 + tw, y + 14 + th))
    return y + 18 + th


def draw_classifications(canvas: Canvas | np.ndarray, ov: pb.Overlay, bottom: int = 0) -> None:
    """Image-level outputs (the critical view of safety) as one line each, bottom left, above
    ``bottom`` pixels: a criterion is shown as met only at probability 0.5 or more, with the
    probability beside it."""
    canvas = canvas if isinstance(canvas, Canvas) else Canvas(canvas)
    h, w = canvas.img.shape[:2]
    fs = max(0.4, h / 1200)
    y = h - 12 - bottom
    for c in reversed(ov.classifications):
        text = cvs_text((lab.label, lab.probability) for lab in c.labels)
        if c.name != "critical_view_of_safety":
            text = f"{c.name}: " + text.removeprefix("CVS: ")
        text = fit_text(text, fs, 1, w - 24)
        (tw, th), _ = cv2.getTextSize(text, FONT, fs, 1)
        if y - th - 6 < 0:
            break
        canvas.text(text, (12, y), fs, WHITE, 1, (40, 40, 40), box=(8, y - th - 6, 16 + tw, y + 4))
        y -= th + 14


@dataclass
class Composed:
    """One frame of the display: the picture, what was written on it, and whether an overlay was
    drawn on the local video."""

    img: np.ndarray
    canvas: Canvas
    mode: ScreenMode
    matched: bool = False


def compose(state: DisplayState, view: ViewState, target: str, now: float, stale_s: float,
            labels: Mapping[tuple[str, int], tuple[int, int, int]] | None = None, local_video: bool = False,
            local_frame: np.ndarray | None = None, local_ms: float | None = None) -> Composed:
    """Everything the display shows on one frame (pure: no window, no clock of its own)."""
    labels = labels or {}
    mode = screen_mode(state, stale_s, now)
    alerts = list(state.alerts.values())
    matched = False
    if local_video and local_frame is not None:
        img = local_frame.copy()
        canvas = Canvas(img)
        if mode.kind == "live":
            ov = state.by_media_ms.get(int(round(local_ms or 0.0)))
            if ov is None:
                mode = ScreenMode("off", "no overlay for this frame")
            elif ov.ai_paused:  # this frame's own overlay says paused: its reason
                mode = ScreenMode("paused", ov.paused_reason or "AI paused")
            else:
                h, w = img.shape[:2]
                img = overlay_on_video(local_frame, ov, labels, view, alerts_height(alerts, h, w, view), canvas)
                matched = True
        draw_centre_notice(canvas, mode)
    else:
        local_video = False
        if state.newest_jpeg is not None:
            img = state.newest_jpeg.copy()
        else:
            img = np.zeros((480, 854, 3), np.uint8)
        canvas = Canvas(img)
        # the agent's own picture of its paused overlay already says AI PAUSED and why: not twice
        agent_said_it = mode.kind == "paused" and state.jpeg_of_newest and state.newest_jpeg is not None
        if mode.kind != "live" and not agent_said_it:
            if state.newest_jpeg is not None:
                img[:] = (img.astype(np.uint16) * 2 // 5).astype(np.uint8)  # the picture is not current: dim it
            draw_centre_notice(canvas, mode)
    draw_alerts(canvas, alerts, view)
    draw_help(canvas, view, local_video)
    draw_status(canvas, state, target, view, mode, local_video)
    return Composed(canvas.img, canvas, mode, matched)


def must_resubscribe(ack: pb.ProgressAck | None, code: grpc.StatusCode | None) -> bool:
    """Whether a progress report's answer means what the overlay stream still holds is too old to show:
    the agent says the display is behind its limit, or it no longer has the display's stream."""
    if ack is not None:
        return ack.limit_s > 0 and ack.behind_s > ack.limit_s
    return code == grpc.StatusCode.FAILED_PRECONDITION


class Display:
    def __init__(self, target: str, client_id: str = "display", video: str | None = None, headless: str | None = None,
                 stale_ms: float = 250.0, fps: float = 25.0, credentials: grpc.ChannelCredentials | None = None,
                 duration_s: float | None = None, backoff_max_s: float = 5.0):
        self.target = target
        self.client_id = client_id
        self.video_path = video
        self.headless = headless
        self.stale_s = stale_ms / 1000.0
        self.fps = fps
        self.credentials = credentials
        self.duration_s = duration_s
        self.backoff_max_s = backoff_max_s
        self.state = DisplayState()
        self._stop = asyncio.Event()
        self._writer: H264Writer | None = None
        self.frames_shown = 0
        self.overlays_matched = 0  # --video: local frames drawn with the overlay of their media timestamp
        self.resubscribed = 0  # times the agent said this display was behind and it subscribed again
        self._labels: dict[tuple[str, int], tuple[int, int, int]] = {}
        self._catalogue: dict[str, list[tuple[int, str, tuple[int, int, int]]]] = {}
        self.view = ViewState()
        self._channel: grpc.aio.Channel | None = None

    def _channel_for(self) -> grpc.aio.Channel:
        opts = [("grpc.keepalive_time_ms", 10000), ("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        if self.credentials is not None:
            return grpc.aio.secure_channel(self.target, self.credentials, options=opts)
        return grpc.aio.insecure_channel(self.target, options=opts)

    async def _overlays(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            self._channel = self._channel_for()
            stub = pbg.OrAgentStub(self._channel)
            self.state.newest_position = self.state.shown_position = 0  # positions are per stream
            req = pb.SubscribeRequest(client_id=self.client_id, include_jpeg=self.video_path is None,
                                      include_anatomy=self.video_path is not None, jpeg_quality=80,
                                      reports_progress=True)
            call = stub.StreamOverlays(req)
            behind = asyncio.Event()
            reporter = asyncio.create_task(self._report_progress(stub, call, behind))
            try:
                async for ov in call:
                    s = self.state
                    s.connected, s.status_text = True, "connected"
                    delay = 0.2
                    s.newest, s.newest_at, s.newest_position = ov, time.monotonic(), ov.stream_position
                    s.jpeg_of_newest = False
                    if ov.composited_jpeg:
                        img = cv2.imdecode(np.frombuffer(ov.composited_jpeg, np.uint8), cv2.IMREAD_COLOR)
                        if img is not None:
                            s.newest_jpeg, s.jpeg_of_newest = img, True
                    for region in ov.anatomy:
                        s.classes_seen.setdefault(region.model, {})[region.class_id] = region.name
                    if self.video_path is not None:
                        s.by_media_ms[int(round(ov.media_ms))] = ov
                        if len(s.by_media_ms) > 256:
                            for k in sorted(s.by_media_ms)[:64]:
                                del s.by_media_ms[k]
                    if self._stop.is_set():
                        break
                self.state.status_text = "stream ended by the agent"
            except grpc.aio.AioRpcError as exc:
                self.state.status_text = f"{exc.code().name}: {exc.details()}"[:120]
            except asyncio.CancelledError:
                if not behind.is_set() or self._stop.is_set():
                    raise
            finally:
                self.state.connected = False
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
                await self._channel.close()
            if self._stop.is_set():
                return
            if behind.is_set():  # what the transport still held was too old to show: dropped with the call
                self.state.status_text = "behind the agent: subscribing again"
                self.resubscribed += 1
            log.info("overlay stream down (%s); reconnecting in %.1f s", self.state.status_text, delay)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
            delay = min(self.backoff_max_s, delay * 2)

    async def _report_progress(self, stub: pbg.OrAgentStub, call, behind: asyncio.Event) -> None:
        """Tell the agent, about once a second, which overlay is on screen: what gRPC's transport holds
        for a display that draws slowly is invisible to the agent otherwise (see ``ReportProgress``).
        When the answer says this display is behind, or the stream is gone, what the transport still
        holds is old: ``call`` is cancelled (``behind`` set) and the display subscribes again."""
        reported = 0
        while True:
            await asyncio.sleep(REPORT_PROGRESS_EVERY_S)
            shown = self.state.shown_position
            if shown <= reported:
                continue
            ack, code = None, None
            try:
                ack = await stub.ReportProgress(pb.ProgressReport(client_id=self.client_id, stream_position=shown), timeout=2.0)
                reported = shown
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                log.debug("progress report not taken: %s", exc.details())
            if must_resubscribe(ack, code):
                log.warning("behind the agent (%s): dropping what the stream holds and subscribing again",
                            f"{ack.behind_s:.1f} s" if ack is not None else "its stream is gone")
                behind.set()
                call.cancel()
                return

    async def _alerts(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            channel = self._channel_for()
            stub = pbg.OrAgentStub(channel)
            try:
                req = pb.AlertSubscribeRequest(client_id=self.client_id, after_sequence=self.state.last_alert_seq,
                                               agent_instance=self.state.agent_instance)
                async for ev in stub.StreamAlerts(req):
                    delay = 0.2
                    self._record_alert(ev)
                    if self._stop.is_set():
                        break
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.OUT_OF_RANGE:  # the agent restarted: its numbering did too
                    self.state.last_alert_seq = 0
                    self.state.alerts.clear()  # the old agent's alerts; the new one's history restores its own
            finally:
                await channel.close()
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
            delay = min(self.backoff_max_s, delay * 2)

    def _record_alert(self, ev: pb.AlertEvent) -> None:
        s = self.state
        if ev.kind == pb.AlertEvent.INSTANCE_CHANGED:  # another agent: its alerts and numbering start over
            log.warning("%s", ev.message)
            s.alerts.clear()
            s.last_alert_seq = 0
        elif ev.kind == pb.AlertEvent.HISTORY_TRUNCATED:
            log.warning("alert history truncated: %s", ev.message)
        else:
            s.last_alert_seq = max(s.last_alert_seq, ev.sequence)
        if ev.agent_instance:
            s.agent_instance = ev.agent_instance
        s.alert_log.append(ev)
        del s.alert_log[:-1000]
        if ev.kind in (pb.AlertEvent.RAISED, pb.AlertEvent.UPDATED, pb.AlertEvent.REANNOUNCED, pb.AlertEvent.ACKNOWLEDGED):
            s.alerts[ev.alert_id] = ev
        elif ev.kind == pb.AlertEvent.CLEARED:
            s.alerts.pop(ev.alert_id, None)

    async def acknowledge_newest(self) -> pb.AlertEvent | None:
        pending = [a for a in self.state.alerts.values() if a.kind != pb.AlertEvent.ACKNOWLEDGED]
        if not pending:
            return None
        newest = max(pending, key=lambda a: (a.severity, a.sequence))
        channel = self._channel_for()
        try:
            resp = await pbg.OrAgentStub(channel).AcknowledgeAlert(
                pb.AcknowledgeRequest(alert_id=newest.alert_id, client_id=self.client_id), timeout=2.0)
            return resp.event
        finally:
            await channel.close()

    def _frame(self, local_frame: np.ndarray | None, local_ms: float | None) -> np.ndarray:
        s = self.state
        if s.newest is not None:
            self.view = self.view.with_models(model_classes(s.newest, self._catalogue, s.classes_seen))
        frame = compose(s, self.view, self.target, time.monotonic(), self.stale_s, self._labels,
                        self.video_path is not None, local_frame, local_ms)
        s.shown_position = s.newest_position
        self.overlays_matched += frame.matched
        return frame.img

    def _show(self, img: np.ndarray) -> int:
        if self.headless:
            if self._writer is None:
                # H.264 MP4 that a browser plays, encoded on its own thread; a later frame of another
                # size (the stream's size changed) is scaled to the first one's
                self._writer = H264Writer(self.headless, self.fps).start()
            self._writer.write(img)
            return -1
        cv2.imshow(WINDOW, img)
        return cv2.waitKey(1) & 0xFF

    async def run(self) -> int:
        if not self.headless and not opencv_has_gui():
            raise InputError("the display window needs OpenCV's GUI build, and this one is headless: "
                             "pip install 'or-agent[display]' (see README), or record with --headless OUT.mp4")
        self._catalogue = segmentation_labels()
        self._labels = {(model, c): colour for model, labs in self._catalogue.items() for c, _, colour in labs}
        cap = None
        if self.video_path is not None:
            cap = cv2.VideoCapture(self.video_path)
            if not cap.isOpened():
                raise InputError(f"{self.video_path}: cannot open the local video")
            self.fps = cap.get(cv2.CAP_PROP_FPS) or self.fps
        if not self.headless:
            cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
            cv2.setWindowProperty(WINDOW, cv2.WND_PROP_FULLSCREEN, cv2.WINDOW_FULLSCREEN)
        tasks = [asyncio.create_task(self._overlays()), asyncio.create_task(self._alerts())]
        t0 = time.monotonic()
        period = 1.0 / self.fps
        next_tick = t0
        ok = False
        try:
            while not self._stop.is_set():
                frame, media_ms = None, None
                if cap is not None:
                    got, frame = cap.read()
                    if not got:
                        cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                        got, frame = cap.read()
                    media_ms = cap.get(cv2.CAP_PROP_POS_MSEC)
                key = self._show(self._frame(frame, media_ms))
                self.frames_shown += 1
                if key in (ord("q"), 27):
                    break
                if key == ord("a"):
                    await self.acknowledge_newest()
                elif key == ord("h") or (self.video_path is not None and key not in (-1, 255)):
                    self.view = self.view.apply_key(key)  # the overlay keys only where the display draws them
                if self.duration_s is not None and time.monotonic() - t0 >= self.duration_s:
                    break
                next_tick += period
                await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            ok = True
        finally:
            self._stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if cap is not None:
                cap.release()
            if self._writer is not None:
                self._writer.close(commit=ok)
            if not self.headless:
                cv2.destroyAllWindows()
        return 0

    def stop(self) -> None:
        self._stop.set()


def opencv_has_gui() -> bool:
    """Whether cv2 can open a window: opencv-python-headless (the agent's) is built without a GUI."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GUI:"):
            return line.split(":", 1)[1].strip().upper() not in ("", "NONE")
    return False


def has_screen() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
