"""Per-display fan-out: every result and notice, once serialised, to each display's own bounded queue.

Separate from the service's state because its one job is a real-time guarantee: a slow or stuck
display must never slow the pipeline or the other displays. The pipeline's publish thread turns each
result into wire bytes once (with and without anatomy, as subscribers asked) and offers them to every
subscriber's queue on the event loop; a full queue drops its oldest overlay. A display is judged by the
age of what it is being sent (since its frame was captured), whatever kind of stream it asked for: once
the overlay it is to receive next is older than the limit, its stream is ended
(``OrAgentHandlers.StreamOverlays``), and a stale display loses its slot to a live one. What gRPC's
transport has taken is not what the display has shown: a slow reader's flow-control window grows
until it holds tens of seconds, so a display that reports progress (``ReportProgress``) is judged by
the oldest overlay it was sent and has not reported shown. Composited JPEGs
are made once per frame and quality, on their own thread, only when someone asked. Alert streams are
woken here too, whenever the alert log records an event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import cv2

from or_agent.agent.alert_log import AlertLog, AlertRecord
from or_agent.agent.wire import active_alerts_to_pb, jpeg_field, overlay_to_pb, unavailable_to_pb
from or_agent.pipelines.messages import FrameResult
from or_agent.pipelines.overlay import AlertBanner, OverlayRenderer
from or_agent.pipelines.sinks import QueuedSubscriber

log = logging.getLogger("or-agent.service")  # the service's: log lines keep the source they always had
# The last item of a stream's queue at shutdown: the stream ends with OK after what it had queued.
SHUTDOWN = object()


@dataclass(eq=False)
class Subscriber:
    """One display's overlay stream: its wishes, its bounded queue of (payload, when its frame was
    captured, monotonic seconds), and how old what it is being sent is."""
    client_id: str
    peer: str
    include_anatomy: bool
    jpeg_key: tuple[int, int] | None  # (quality, max side) when the display wants composited JPEG
    queue: asyncio.Queue
    reserved: bool = False  # a configured display: it always gets a slot
    dropped: int = 0
    sent: int = 0
    writing: float | None = None  # capture time of the overlay whose write is under way
    displaced: bool = False  # its slot went to a live display: its stream ends
    reports_progress: bool = False  # it calls ReportProgress with what it has shown
    shown: int = 0  # the newest stream position it reported shown
    # (stream position, capture time) of what was sent and not yet reported shown, oldest first
    unshown: deque = field(default_factory=deque)

    def age_s(self, now: float | None = None) -> float:
        """How old the oldest overlay this display has yet to show is: one sent but not reported shown
        (when it reports progress), else the one being written, else the oldest queued one; 0 when it
        holds nothing (it is up to date)."""
        now = time.monotonic() if now is None else now
        oldest = self.writing
        if oldest is None and not self.queue.empty():
            oldest = self.queue._queue[0][1]  # type: ignore[attr-defined]  # asyncio.Queue's deque, read only
        if self.unshown:
            oldest = self.unshown[0][1]  # sent before anything still queued or being written
        return 0.0 if oldest is None else max(0.0, now - oldest)

    def written(self, made_at: float) -> int:
        """One more message written to its transport; its stream position (1 for the first)."""
        self.sent += 1
        if self.reports_progress:
            self.unshown.append((self.sent, made_at))
        return self.sent

    def report_shown(self, position: int) -> None:
        """The display has shown everything up to ``position`` (reports may arrive out of order)."""
        if position > self.sent:
            raise ValueError(f"stream_position {position} is beyond what was sent to display {self.client_id} ({self.sent})")
        self.shown = max(self.shown, position)
        while self.unshown and self.unshown[0][0] <= self.shown:
            self.unshown.popleft()

    def over_limit(self, limit_s: float) -> bool:
        return self.age_s() > limit_s

    def offer(self, payload, made_at: float | None = None) -> None:
        """On the event loop: enqueue, dropping the oldest overlay when full. ``made_at`` is when the
        overlay's frame was captured (monotonic seconds); now, for notices."""
        if self.queue.full():
            try:
                self.queue.get_nowait()
                self.dropped += 1
            except asyncio.QueueEmpty:
                pass
        self.queue.put_nowait((payload, time.monotonic() if made_at is None else made_at))


class Fanout:
    """The displays subscribed to overlays and the delivery of results, notices and alert wakeups to them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, alerts: AlertLog, model_info: list, model_set: str,
                 renderer: OverlayRenderer, queue_size: int):
        self.loop = loop
        self.alerts = alerts
        self.model_info = model_info
        self.model_set = model_set
        self.renderer = renderer
        self.queue_size = queue_size
        self.subscribers: set[Subscriber] = set()
        self.closed = False
        self._alert_wakeup = asyncio.Event()
        self._jpeg_worker: QueuedSubscriber | None = None

    # ----- displays (on the event loop) ---------------------------------------------------------
    def subscribe(self, client_id: str, peer: str, include_anatomy: bool, jpeg_key: tuple[int, int] | None,
                  reserved: bool = False, reports_progress: bool = False) -> Subscriber:
        sub = Subscriber(client_id, peer, include_anatomy, jpeg_key, asyncio.Queue(self.queue_size), reserved,
                         reports_progress=reports_progress)
        self.subscribers.add(sub)
        return sub

    def stream_of(self, client_id: str, peer: str) -> Subscriber | None:
        """The overlay stream a progress report is about: the display's on the same connection, else
        its only one; None when it has none (or several elsewhere, which one is meant is unknown)."""
        mine = [s for s in self.subscribers if s.client_id == client_id]
        same_peer = [s for s in mine if s.peer == peer]
        if len(same_peer) == 1:
            return same_peer[0]
        return mine[0] if len(mine) == 1 else None

    def make_room(self, limit: int, reserved: bool, stale_s: float) -> Subscriber | None:
        """With ``limit`` displays subscribed, the one whose slot goes to a newcomer (its stream is ended),
        or None if none may be displaced: a stale display (what it is to receive next is older than
        ``stale_s``) for anyone, the stalest other unreserved display for a configured (reserved) one."""
        if len(self.subscribers) < limit:
            return None
        now = time.monotonic()
        by_age = sorted(self.subscribers, key=lambda s: (s.reserved, -s.age_s(now), -s.dropped))
        candidates = [s for s in by_age if not s.reserved and (reserved or s.age_s(now) > stale_s)]
        if not candidates:
            return None
        victim = candidates[0]
        self.subscribers.discard(victim)
        victim.displaced = True
        if victim.queue.empty():  # wake a stream waiting for its next overlay
            victim.queue.put_nowait((None, time.monotonic()))
        return victim

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    # ----- from the pipeline's publish thread -------------------------------------------------
    def publish(self, r: FrameResult) -> None:
        """Serialise the result once per kind of subscriber and hand it to the event loop (or, for
        displays that asked for composited JPEG, to the JPEG thread)."""
        subs = list(self.subscribers)
        if not subs:
            return
        active = self._active_alerts_pb()
        payload = {}
        for want in {s.include_anatomy for s in subs}:
            payload[want] = overlay_to_pb(r, self.model_info, active, want, self.model_set).SerializeToString()
        made_at = r.marks_ns["capture"] / 1e9  # its age is judged from the frame's capture
        plain = [s for s in subs if s.jpeg_key is None]
        if plain:
            self.loop.call_soon_threadsafe(self._deliver, [(s, payload[s.include_anatomy]) for s in plain], made_at)
        if len(plain) < len(subs) and self._jpeg_worker is not None:
            self._jpeg_worker((r, payload, [s for s in subs if s.jpeg_key is not None]))

    def _compose_jpegs(self, item) -> None:
        r, payload, subs = item
        banners = [AlertBanner(a.severity, a.message) for a in self.alerts.active()]
        composed = self.renderer.draw(r.image, r, banners)
        encoded: dict[tuple[int, int], bytes] = {}
        deliveries = []
        for s in subs:
            if s.jpeg_key not in encoded:
                quality, max_side = s.jpeg_key
                img = composed
                h, w = img.shape[:2]
                if max_side and max(w, h) > max_side:
                    k = max_side / max(w, h)
                    img = cv2.resize(img, (max(1, int(w * k)), max(1, int(h * k))), interpolation=cv2.INTER_AREA)
                ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
                encoded[s.jpeg_key] = jpeg_field(buf.tobytes()) if ok else b""
            deliveries.append((s, payload[s.include_anatomy] + encoded[s.jpeg_key]))
        self.loop.call_soon_threadsafe(self._deliver, deliveries, r.marks_ns["capture"] / 1e9)

    def _active_alerts_pb(self) -> list:
        return active_alerts_to_pb(self.alerts.active())

    # ----- on the event loop ------------------------------------------------------------------
    def publish_unavailable(self, reason: str) -> None:
        """On the event loop: tell every display, explicitly, that there is no current AI result.
        Sent while the pipeline is stalled or the source lost, so no display keeps an old overlay."""
        data = unavailable_to_pb(reason, self._active_alerts_pb(), self.model_info).SerializeToString()
        self._deliver([(s, data) for s in self.subscribers])

    def _deliver(self, deliveries, made_at: float | None = None) -> None:
        if self.closed:
            return  # each stream's queue ends with the shutdown marker; nothing may push it out
        for s, data in deliveries:
            if s in self.subscribers:
                s.offer(data, made_at)

    def close(self) -> None:
        """Deliver nothing more: from now on only the shutdown markers of ``end_streams`` go out."""
        self.closed = True

    def end_streams(self) -> None:
        """At shutdown: each overlay stream ends with OK after what it had queued, each alert stream
        wakes to see the agent stopping."""
        for sub in list(self.subscribers):
            sub.offer(SHUTDOWN)
        self.wake_alert_streams()

    # ----- alert streams ----------------------------------------------------------------------
    def alert_recorded(self, _rec: AlertRecord) -> None:
        """An ``AlertLog`` listener, called on whichever thread recorded the event."""
        self.loop.call_soon_threadsafe(self.wake_alert_streams)

    @property
    def alert_wakeup(self) -> asyncio.Event:
        """The event the next recorded alert sets; an alert stream takes it before reading the log."""
        return self._alert_wakeup

    def wake_alert_streams(self) -> None:
        """On the event loop: wake every alert stream. Each waits on the event that was current when
        it last read the log, so none can miss a wakeup another stream has already consumed."""
        wakeup, self._alert_wakeup = self._alert_wakeup, asyncio.Event()
        wakeup.set()

    # ----- the JPEG thread --------------------------------------------------------------------
    def start_worker(self) -> None:
        self._jpeg_worker = QueuedSubscriber(self._compose_jpegs, maxsize=1, drop_oldest=True, name="jpeg").start()

    def stop_worker(self) -> None:
        if self._jpeg_worker is not None:
            try:
                self._jpeg_worker.stop(timeout_s=2.0)
            except Exception:
                log.exception("JPEG worker failed")
