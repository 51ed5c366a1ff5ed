"""``or-agent display``: the reference OR display client.

Subscribes to a running agent and shows the video with its overlays full screen (OpenCV window):

- by default the agent's composited JPEG stream;
- with ``--video FILE``, a local copy of the video played at its own rate, with each overlay drawn
  on the frame whose media timestamp it carries (the video pass-through never waits for the AI).

The connection state is always on screen. When the newest overlay is older than ``--stale-ms``
(default 250 ms) or the stream is down, it shows "AI OFF" in large letters and draws no overlay:
an old overlay is never drawn as if it were current. It reconnects with backoff, resumes the alert
stream after the last alert it saw (so no alert is lost), and the ``a`` key acknowledges the newest
unacknowledged alert. ``--headless OUT.mp4`` (automatic when there is no screen) writes what it
would show to a video file instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import grpc
import numpy as np

from or_agent.pipelines.cvs import cvs_text
from or_agent.pipelines.errors import InputError, OrAgentError
from or_agent.pipelines.files import part_path
from or_agent.pipelines.overlay import FONT, AlertBanner, draw_alert_banners, format_duration
from or_agent.proto.oragent.v1 import agent_pb2 as pb
from or_agent.proto.oragent.v1 import agent_pb2_grpc as pbg

log = logging.getLogger("or-agent.display")
SEVERITY_NAME = {pb.INFO: "info", pb.WARNING: "warning", pb.CRITICAL: "critical"}
WINDOW = "or-agent"


@dataclass
class DisplayState:
    connected: bool = False
    status_text: str = "connecting"
    newest: pb.Overlay | None = None
    newest_at: float = 0.0  # monotonic time the newest overlay arrived
    newest_jpeg: np.ndarray | None = None
    by_media_ms: dict[int, pb.Overlay] = field(default_factory=dict)  # recent overlays for --video matching
    alerts: dict[str, pb.AlertEvent] = field(default_factory=dict)  # active alerts by id
    last_alert_seq: int = 0
    agent_instance: str = ""  # the agent instance that numbered last_alert_seq
    alert_log: list[pb.AlertEvent] = field(default_factory=list)  # every event seen, in order (bounded)


def ai_off_reason(state: DisplayState, stale_s: float, now: float) -> str | None:
    if not state.connected:
        return f"stream down ({state.status_text})"
    if state.newest is None:
        return "no overlay yet"
    age = now - state.newest_at
    if age > stale_s:
        return f"no fresh overlay for {1000 * age:.0f} ms"
    if state.newest.ai_paused:
        return state.newest.paused_reason or "AI paused"
    return None


def draw_status(img: np.ndarray, state: DisplayState, off_reason: str | None, target: str) -> np.ndarray:
    """Connection state in a corner; AI OFF across the middle when there is nothing current."""
    h, w = img.shape[:2]
    fs = max(0.4, h / 1100)
    dot = (60, 200, 60) if state.connected else (40, 40, 220)
    cv2.circle(img, (w - int(14 * fs * 2), int(16 * fs * 2)), int(7 * fs * 2), dot, -1, cv2.LINE_AA)
    label = f"{target}: {'connected' if state.connected else state.status_text}"
    (tw, _th), _ = cv2.getTextSize(label, FONT, fs, 1)
    cv2.putText(img, label, (w - tw - int(30 * fs * 2), int(22 * fs * 2)), FONT, fs, (255, 255, 255), 1, cv2.LINE_AA)
    if off_reason is not None:
        big = max(1.0, h / 260)
        (bw, bh), _ = cv2.getTextSize("AI OFF", FONT, big, max(2, int(big * 2)))
        x, y = (w - bw) // 2, h // 2
        cv2.rectangle(img, (x - 20, y - bh - 20), (x + bw + 20, y + 20), (0, 0, 0), -1)
        cv2.putText(img, "AI OFF", (x, y), FONT, big, (0, 210, 255), max(2, int(big * 2)), cv2.LINE_AA)
        (rw, _), _ = cv2.getTextSize(off_reason, FONT, big / 3, 1)
        cv2.putText(img, off_reason, ((w - rw) // 2, y + int(50 * big / 2)), FONT, big / 3, (255, 255, 255),
                    max(1, int(big / 2)), cv2.LINE_AA)
    return img


def segmentation_colours() -> dict[tuple[str, int], tuple[int, int, int]]:
    """BGR colours of every bundled set's segmentation classes, by (model, class id): regions name their model."""
    from or_agent.pipelines.manifest import set_names
    from or_agent.pipelines.model_set import load_model_set

    colours: dict[tuple[str, int], tuple[int, int, int]] = {}
    for name in set_names():
        try:
            models = load_model_set(name, verify=False).models
        except OrAgentError:
            continue  # a set that does not load draws in white; the display still runs
        for m in models:
            if m.task == "segmentation":
                colours.update({(m.name, lab.id): tuple(lab.color[::-1]) for lab in m.labels})
    return colours


def overlay_on_video(frame: np.ndarray, ov: pb.Overlay, labels: dict[tuple[str, int], tuple[int, int, int]],
                     alpha: float = 0.4) -> np.ndarray:
    """Draw an overlay's anatomy polygons (every model's, in its colours) and phase banner on a local video frame."""
    out = frame.copy()
    layer = out.copy()
    for region in ov.anatomy:
        colour = labels.get((region.model, region.class_id), (255, 255, 255))
        polys = [np.array(p.xy, np.int32).reshape(-1, 2) for p in region.polygons]
        cv2.fillPoly(layer, polys, colour)
        cv2.polylines(out, polys, True, colour, 1, cv2.LINE_AA)
    out = cv2.addWeighted(layer, alpha, out, 1 - alpha, 0)
    if ov.HasField("phase"):
        _top_banner(out, f"{ov.phase.name}  {100 * ov.phase.confidence:.0f}%  {format_duration(ov.phase.time_in_phase_s)}",
                    (60, 40, 0), 2)
    for w in ov.withheld:  # where the output would be: that it is not shown, and why
        _top_banner(out, f"{w.output.capitalize()} not shown: {w.reason}", (70, 70, 70), 1)
    draw_classifications(out, ov)
    return out


def _top_banner(img: np.ndarray, text: str, background: tuple[int, int, int], thickness: int) -> None:
    fs = max(0.45, img.shape[0] / 1000)
    (tw, th), _ = cv2.getTextSize(text, FONT, fs, thickness)
    cv2.rectangle(img, (8, 8), (16 + tw, 16 + th + 6), background, -1)
    cv2.putText(img, text, (12, 12 + th), FONT, fs, (255, 255, 255), thickness, cv2.LINE_AA)


def draw_classifications(img: np.ndarray, ov: pb.Overlay) -> None:
    """Image-level outputs (the critical view of safety) as one line each, bottom left: a criterion
    is shown as met only at probability 0.5 or more, with the probability beside it."""
    h = img.shape[0]
    fs = max(0.4, h / 1200)
    y = h - 12
    for c in reversed(ov.classifications):
        text = cvs_text((lab.label, lab.probability) for lab in c.labels)
        if c.name != "critical_view_of_safety":
            text = f"{c.name}: " + text.removeprefix("CVS: ")
        (tw, th), _ = cv2.getTextSize(text, FONT, fs, 1)
        cv2.rectangle(img, (8, y - th - 6), (16 + tw, y + 4), (40, 40, 40), -1)
        cv2.putText(img, text, (12, y), FONT, fs, (255, 255, 255), 1, cv2.LINE_AA)
        y -= th + 14


def draw_alerts(img: np.ndarray, alerts: list[AlertBanner]) -> None:
    draw_alert_banners(img, alerts[:3], "  [a = acknowledge]")


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
        self._writer: cv2.VideoWriter | None = None
        self._writer_tmp: Path | None = None
        self.frames_shown = 0
        self.overlays_matched = 0  # --video: local frames drawn with the overlay of their media timestamp
        self._labels: dict[tuple[str, int], tuple[int, int, int]] = {}
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
            try:
                req = pb.SubscribeRequest(client_id=self.client_id, include_jpeg=self.video_path is None,
                                          include_anatomy=self.video_path is not None, jpeg_quality=80)
                async for ov in stub.StreamOverlays(req):
                    s = self.state
                    s.connected, s.status_text = True, "connected"
                    delay = 0.2
                    s.newest, s.newest_at = ov, time.monotonic()
                    if ov.composited_jpeg:
                        s.newest_jpeg = cv2.imdecode(np.frombuffer(ov.composited_jpeg, np.uint8), cv2.IMREAD_COLOR)
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
            finally:
                self.state.connected = False
                await self._channel.close()
            if self._stop.is_set():
                return
            log.info("overlay stream down (%s); reconnecting in %.1f s", self.state.status_text, delay)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
            delay = min(self.backoff_max_s, delay * 2)

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
        now = time.monotonic()
        off = ai_off_reason(s, self.stale_s, now)
        if self.video_path is not None and local_frame is not None:
            img = local_frame
            ov = s.by_media_ms.get(int(round(local_ms))) if off is None else None
            if off is None and ov is None:
                off = "no overlay for this frame"
            if ov is not None:
                img = overlay_on_video(local_frame, ov, self._labels)
                self.overlays_matched += 1
        elif s.newest_jpeg is not None:
            img = s.newest_jpeg.copy()
            if off is not None:
                img = (img.astype(np.uint16) * 2 // 5).astype(np.uint8)  # the picture is old: dim it
        else:
            img = np.zeros((480, 854, 3), np.uint8)
        banners = [AlertBanner(SEVERITY_NAME.get(a.severity, "warning"),
                               a.message + (" (ack)" if a.kind == pb.AlertEvent.ACKNOWLEDGED else ""))
                   for a in sorted(s.alerts.values(), key=lambda a: -a.severity)]
        draw_alerts(img, banners)
        return draw_status(img, s, off, self.target)

    def _show(self, img: np.ndarray) -> int:
        if self.headless:
            if self._writer is None:
                h, w = img.shape[:2]
                self._writer_tmp = part_path(Path(self.headless))
                self._writer = cv2.VideoWriter(str(self._writer_tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
                if not self._writer.isOpened():
                    raise InputError(f"{self.headless}: cannot write a video there")
                self._size = (w, h)
            if (img.shape[1], img.shape[0]) != self._size:  # the stream's size changed: keep the file's
                img = cv2.resize(img, self._size)
            self._writer.write(img)
            return -1
        cv2.imshow(WINDOW, img)
        return cv2.waitKey(1) & 0xFF

    async def run(self) -> int:
        self._labels = segmentation_colours()
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
                self._writer.release()
                if ok:
                    os.replace(self._writer_tmp, self.headless)
                elif self._writer_tmp.exists():
                    self._writer_tmp.unlink()
            if not self.headless:
                cv2.destroyAllWindows()
        return 0

    def stop(self) -> None:
        self._stop.set()


def has_screen() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
