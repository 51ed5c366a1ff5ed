"""The reference display's drawing and keys, without a window or an agent: one clear paused state,
alert banners that stay on screen, and the surgeon's view options (issue 13 item 18)."""

import cv2
import numpy as np
import pytest

from or_agent.agent.display import (
    OPACITY_MAX,
    OPACITY_MIN,
    Canvas,
    DisplayState,
    ModelClasses,
    ScreenMode,
    ViewState,
    alert_banner_rows,
    compose,
    draw_alerts,
    fit_text,
    overlay_on_video,
    screen_mode,
)
from or_agent.pipelines.manifest import find_model
from or_agent.pipelines.overlay import FONT, SEVERITY_COLOURS, OverlayRenderer
from or_agent.proto.oragent.v1 import agent_pb2 as pb
from tests.conftest import ROOT

NOW = 1000.0
STALE_S = 0.25
TARGET = "or3-box:50051"
RED, GREEN = (0, 0, 255), (0, 255, 0)
LABELS = {("anatomy", 1): RED, ("anatomy", 2): GREEN}
MODELS = (ModelClasses("anatomy", ((1, "Liver"), (2, "Gallbladder"), (3, "Cystic Duct"))),
          ModelClasses("tools", ((1, "Grasper"), (2, "Hook"))))


def _square(x0, y0, x1, y1) -> pb.Polygon:
    return pb.Polygon(xy=[x0, y0, x1, y0, x1, y1, x0, y1])


def _overlay(**kw) -> pb.Overlay:
    kw.setdefault("media_ms", 40.0)
    return pb.Overlay(models=[pb.ModelInfo(task="segmentation", name="anatomy")], **kw)


LIVE = _overlay(anatomy=[pb.AnatomyRegion(model="anatomy", class_id=1, name="Liver", polygons=[_square(100, 100, 200, 200)]),
                         pb.AnatomyRegion(model="anatomy", class_id=2, name="Gallbladder",
                                          polygons=[_square(300, 100, 400, 200)])],
                phase=pb.PhaseState(name="CalotTriangleDissection", confidence=0.9, time_in_phase_s=75),
                classifications=[pb.Classification(name="critical_view_of_safety", labels=[
                    pb.LabelProbability(label="cvs_two_structures", probability=0.8)])])
PAUSED = _overlay(ai_paused=True, paused_reason="pipeline stalled: anatomy stage")


def _state(newest: pb.Overlay | None, connected=True, age_s=0.01, jpeg=None, jpeg_of_newest=False, alerts=()):
    s = DisplayState(connected=connected, status_text="connected" if connected else "UNAVAILABLE: refused",
                     newest=newest, newest_at=NOW - age_s, newest_jpeg=jpeg, jpeg_of_newest=jpeg_of_newest)
    if newest is not None:
        s.by_media_ms[int(newest.media_ms)] = newest
    s.alerts = {a.alert_id: a for a in alerts}
    return s


def _alert(i, severity=pb.WARNING, message=None, acknowledged=False) -> pb.AlertEvent:
    return pb.AlertEvent(sequence=i, alert_id=f"alert-{i}", severity=severity, message=message or f"alert {i}",
                         kind=pb.AlertEvent.ACKNOWLEDGED if acknowledged else pb.AlertEvent.RAISED)


def _grey(h=480, w=854, v=100):
    return np.full((h, w, 3), v, np.uint8)


def _mentions(texts, word):
    return [t for t in texts if word in t]


def _inside(d, img):
    h, w = img.shape[:2]
    return d.x0 >= 0 and d.y0 >= 0 and d.x1 <= w and d.y1 <= h


# ----- 1. one clear paused state -------------------------------------------------------------


def test_the_agents_pause_shows_its_reason_once_and_no_ai_off():
    # the agent says paused without a picture of its own (stalled pipeline): the display says so, once
    old_picture = _grey()
    frame = compose(_state(PAUSED, jpeg=old_picture, jpeg_of_newest=False), ViewState(), TARGET, NOW, STALE_S)
    assert frame.mode.kind == "paused"
    assert _mentions(frame.canvas.texts, "AI PAUSED") == ["AI PAUSED"]
    assert _mentions(frame.canvas.texts, "pipeline stalled: anatomy stage") == ["pipeline stalled: anatomy stage"]
    assert not _mentions(frame.canvas.texts, "AI OFF")
    assert frame.img.mean() < old_picture.mean(), "the old picture is dimmed: nothing on it is current"


def test_on_the_agents_own_paused_picture_the_display_adds_no_notice():
    labels = find_model("segmentation", ROOT / "models" / "synthetic").labels
    agent_picture = OverlayRenderer(labels).draw(_grey(), None, paused_reason="camera out of body")
    frame = compose(_state(PAUSED, jpeg=agent_picture, jpeg_of_newest=True), ViewState(), TARGET, NOW, STALE_S)
    assert frame.mode.kind == "paused"
    assert not _mentions(frame.canvas.texts, "AI OFF") and not _mentions(frame.canvas.texts, "AI PAUSED")
    assert not _mentions(frame.canvas.texts, "pipeline stalled")
    h, w = agent_picture.shape[:2]
    centre = (slice(h // 4, 3 * h // 4), slice(w // 6, 5 * w // 6))
    assert np.array_equal(frame.img[centre], agent_picture[centre]), "the agent's AI PAUSED is left as it drew it"


def test_without_a_fresh_overlay_the_display_says_ai_off_with_its_own_reason():
    down = compose(_state(PAUSED, connected=False), ViewState(), TARGET, NOW, STALE_S)
    assert down.mode.kind == "off" and "stream down" in down.mode.reason
    assert _mentions(down.canvas.texts, "AI OFF") == ["AI OFF"] and not _mentions(down.canvas.texts, "AI PAUSED")
    # an old pause is no longer the agent's word: the overlay is stale, so AI OFF, and not the old reason
    stale = compose(_state(PAUSED, age_s=2.0), ViewState(), TARGET, NOW, STALE_S)
    assert stale.mode.kind == "off" and "no fresh overlay" in stale.mode.reason
    assert not _mentions(stale.canvas.texts, "pipeline stalled") and not _mentions(stale.canvas.texts, "AI PAUSED")
    assert screen_mode(_state(None), STALE_S, NOW).reason == "no overlay yet"
    assert screen_mode(_state(LIVE), STALE_S, NOW).kind == "live"


def test_overlays_hidden_by_the_surgeon_never_say_ai_off_beside_the_agents_pause():
    hidden = ViewState(models=MODELS).apply_key("o")
    live = compose(_state(LIVE), hidden, TARGET, NOW, STALE_S, LABELS, True, _grey(), 40.0)
    assert _mentions(live.canvas.texts, "AI OFF") == ["AI OFF (o)"], "the small reminder when the surgeon hid them"
    paused = compose(_state(PAUSED), hidden, TARGET, NOW, STALE_S, LABELS, True, _grey(), 40.0)
    texts = paused.canvas.texts
    assert "AI PAUSED" in texts and "pipeline stalled: anatomy stage" in texts
    assert not _mentions(texts, "AI OFF") and "overlays hidden (o)" in texts
    boxes = paused.canvas.drawn
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "no text over another"


def test_local_video_paused_frames_say_so_and_draw_no_anatomy():
    frame = compose(_state(PAUSED), ViewState(), TARGET, NOW, STALE_S, LABELS, True, _grey(), 40.0)
    assert frame.mode.kind == "paused" and not frame.matched
    assert "AI PAUSED" in frame.canvas.texts and not _mentions(frame.canvas.texts, "AI OFF")
    # a frame whose own overlay is paused, while the newest is live
    s = _state(LIVE)
    s.by_media_ms[80] = _overlay(ai_paused=True, paused_reason="camera out of body", media_ms=80.0)
    frame = compose(s, ViewState(), TARGET, NOW, STALE_S, LABELS, True, _grey(), 80.0)
    assert frame.mode == ScreenMode("paused", "camera out of body")
    assert (frame.img[150, 150] == 100).all(), "no anatomy drawn"


# ----- 2. alert banners stay on screen -------------------------------------------------------


def _twelve_alerts():
    long = "energy device close to the cystic duct, check the critical view of safety before clipping " * 3
    alerts = [_alert(1, pb.CRITICAL, "CRITICAL BLEED near the hepatocystic triangle")]  # the oldest
    alerts += [_alert(i, pb.WARNING if i % 2 else pb.INFO, f"{i}: {long}") for i in range(2, 13)]
    return alerts


@pytest.mark.parametrize("h,w", [(480, 854), (240, 320), (1080, 1920), (60, 320), (60, 100), (30, 200)])
def test_twelve_alerts_stay_within_the_frame_critical_first(h, w):
    img = _grey(h, w)
    canvas = draw_alerts(img, _twelve_alerts(), ViewState())
    assert canvas.drawn and all(_inside(d, img) for d in canvas.drawn), canvas.drawn
    texts = canvas.texts
    rows = alert_banner_rows(_twelve_alerts(), w, h)
    assert [r.text for r in rows] == texts
    assert rows[0].severity == "critical", "the critical alert is drawn, on the bottom row"
    if w >= 320:
        assert texts[0].startswith("CRITICAL: CRITICAL BLEED")  # the severity and some of the message first
    summary = [t for t in texts if t.startswith("+")]
    if summary:  # the rest summarised in one line, and nothing lost in the count
        assert len(texts) - 1 + int(summary[0].split()[0]) == 12 and summary == texts[-1:]
    elif len(texts) < 12:  # one row only: the count is on the banner (where there is room for it)
        assert len(texts) == 1 and ("+11 more" in texts[0] or w < 200)
    fs = max(0.45, h / 1000)
    for t in texts:  # each banner's text is cut to the frame's width
        assert cv2.getTextSize(t, FONT, fs, max(1, int(fs * 2)))[0][0] <= w - 20
    red = (img == np.array(SEVERITY_COLOURS["critical"], np.uint8)).all(axis=2)
    assert red.any(), "the critical banner's colour is on screen"


def test_on_480p_twelve_alerts_take_a_bounded_share_and_summarise_the_rest():
    rows = alert_banner_rows(_twelve_alerts(), 854, 480)
    assert 2 <= len(rows) <= 6
    assert rows[-1].text.startswith(f"+{12 - (len(rows) - 1)} more alerts")
    assert all(r.text.endswith("...") or "acknowledge" in r.text for r in rows[1:-1]), "long messages are cut with ..."
    assert rows[0].severity == "critical" and "[a = acknowledge]" in rows[0].text


def test_more_critical_alerts_than_fit_hide_only_the_least_severe():
    alerts = [_alert(i, pb.CRITICAL) for i in range(1, 9)] + [_alert(i, pb.INFO) for i in range(9, 12)]
    rows = alert_banner_rows(alerts, 854, 480)
    assert all(r.severity == "critical" for r in rows), "critical first; the summary is in the colour of what it hides"
    assert rows[-1].text.startswith("+") and "critical" in rows[-1].text and "info" in rows[-1].text


def test_acknowledged_alerts_say_so_and_the_hint_is_on_the_one_a_acknowledges():
    rows = alert_banner_rows([_alert(1, pb.CRITICAL, acknowledged=True), _alert(2, pb.WARNING), _alert(3, pb.WARNING)],
                             854, 480)
    assert [r.text for r in rows] == ["CRITICAL: alert 1 (ack)", "WARNING: alert 3  [a = acknowledge]", "WARNING: alert 2"]


def test_fit_text_cuts_with_an_ellipsis_and_keeps_the_suffix():
    text = fit_text("x" * 500, 0.5, 1, 200, keep=" (ack)")
    assert text.endswith("... (ack)")
    assert cv2.getTextSize(text, FONT, 0.5, 1)[0][0] <= 200
    assert fit_text("short", 0.5, 1, 200) == "short"


def test_classifications_stay_above_the_alert_banners():
    alerts = _twelve_alerts()
    frame = compose(_state(LIVE, alerts=alerts), ViewState(), TARGET, NOW, STALE_S, LABELS, True, _grey(), 40.0)
    cvs = [d for d in frame.canvas.drawn if d.text.startswith("CVS")]
    banners = [d for d in frame.canvas.drawn if d.text.startswith(("CRITICAL", "WARNING", "INFO", "+"))]
    assert cvs and banners and not any(c.overlaps(b) for c in cvs for b in banners)


# ----- 3. keys -------------------------------------------------------------------------------


def test_keys_change_the_view_state():
    v = ViewState(models=MODELS)
    assert v.apply_key("o").overlays_shown is False and v.apply_key("o").apply_key("o").overlays_shown is True
    assert v.apply_key(ord("o")) == v.apply_key("o"), "cv2.waitKey codes and characters alike"
    assert v.apply_key("h").help_shown is False
    assert v.apply_key("+").opacity == pytest.approx(0.5) and v.apply_key("-").opacity == pytest.approx(0.3)
    assert v.apply_key("=").opacity == pytest.approx(0.5), "+ without shift"
    up, down = v, v
    for _ in range(20):
        up, down = up.apply_key("+"), down.apply_key("-")
    assert up.opacity == OPACITY_MAX == 1.0 and down.opacity == OPACITY_MIN == 0.1
    # the number keys toggle the current model's classes by their position
    assert v.apply_key("2").hidden == {("anatomy", 2)}
    assert v.apply_key("2").apply_key("2").hidden == frozenset()
    assert v.apply_key("9") == v, "no ninth class: nothing changes"
    # m: the next model; the keys then address its classes, the other's choices kept
    t = v.apply_key("1").apply_key("m").apply_key("2")
    assert t.current.name == "tools" and t.hidden == {("anatomy", 1), ("tools", 2)}
    assert t.apply_key("m").current.name == "anatomy"
    # c: each class alone in turn, then all again
    c1 = v.apply_key("c")
    assert c1.hidden == {("anatomy", 2), ("anatomy", 3)}
    assert v.apply_key("c").apply_key("c").hidden == {("anatomy", 1), ("anatomy", 3)}
    assert v.apply_key("c").apply_key("c").apply_key("c").apply_key("c").hidden == frozenset()
    assert c1.filter_note() == "anatomy only: Liver" and t.filter_note() == "anatomy hidden: Liver; tools hidden: Hook"
    assert ViewState(models=MODELS[:1]).apply_key("2").filter_note() == "hidden: Gallbladder"
    # a, q, nothing pressed (255, -1) and unknown keys leave the view as it is
    for k in ("a", "q", "z", 255, -1, 0):
        assert v.apply_key(k) == v
    assert ViewState().apply_key("1") == ViewState(), "no model known yet: number keys do nothing"


def test_view_keeps_its_model_when_the_list_changes():
    v = ViewState(models=MODELS).apply_key("m")
    assert v.with_models(tuple(reversed(MODELS))).current.name == "tools"
    assert v.with_models(MODELS[:1]).current.name == "anatomy"


def test_help_line_is_shown_and_toggled_by_h():
    live = _state(LIVE)
    shown = compose(live, ViewState(models=MODELS), TARGET, NOW, STALE_S, LABELS, True, _grey(), 40.0)
    help_texts = _mentions(shown.canvas.texts, "q quit")
    assert len(help_texts) == 1 and "o overlays" in help_texts[0] and "+/- opacity" in help_texts[0]
    assert "m model" in help_texts[0], "two models: m switches"
    hidden = compose(live, ViewState(models=MODELS).apply_key("h"), TARGET, NOW, STALE_S, LABELS, True, _grey(), 40.0)
    assert not _mentions(hidden.canvas.texts, "q quit")
    jpeg = compose(_state(LIVE, jpeg=_grey(), jpeg_of_newest=True), ViewState(), TARGET, NOW, STALE_S)
    assert "--video" in _mentions(jpeg.canvas.texts, "q quit")[0], "on the agent's picture the overlay keys do not apply"


def test_opacity_changes_the_blended_pixels():
    frame = _grey()
    inside = (150, 150)  # in the red square (class 1)
    for opacity in (0.1, 0.4, 1.0):
        out = overlay_on_video(frame, LIVE, LABELS, ViewState(opacity=opacity))
        expected = np.array(RED) * opacity + 100 * (1 - opacity)
        assert np.allclose(out[inside], expected, atol=2), (opacity, out[inside], expected)
    assert (frame == 100).all(), "the caller's frame is not drawn on"


def test_a_hidden_class_is_not_drawn():
    view = ViewState(models=MODELS).apply_key("1")  # Liver (class 1, the red square) hidden
    out = overlay_on_video(_grey(), LIVE, LABELS, view)
    assert (out[150, 150] == 100).all() and (out[100:201, 100:201] == 100).all(), "no fill nor outline"
    assert not (out[150, 350] == 100).all(), "the other class still is"
    nothing = overlay_on_video(_grey(), LIVE, LABELS, view.apply_key("o"))
    assert (nothing == 100).all(), "o hides every overlay: polygons, phase, classifications"


def test_drawn_texts_are_recorded_with_their_boxes():
    c = Canvas(_grey(100, 200))
    d = c.text("hello", (10, 50), 0.5, background=(0, 0, 0))
    assert c.texts == ["hello"] and d.x0 < 10 < d.x1 and d.y0 < 50 < d.y1


def test_the_banner_block_has_no_gap_for_the_agents_own_banners_to_show_through():
    alerts = _twelve_alerts()[:4]
    picture = np.random.default_rng(0).integers(0, 255, (480, 854, 3), dtype=np.uint8)  # the agent's, anything
    frame = compose(_state(LIVE, jpeg=picture, jpeg_of_newest=True, alerts=alerts), ViewState(), TARGET, NOW, STALE_S)
    banners = [d for d in frame.canvas.drawn if d.text.startswith(("CRITICAL", "WARNING", "INFO"))]
    help_top = next(d for d in frame.canvas.drawn if "q quit" in d.text).y0
    top = min(d.y0 for d in banners)
    colours = {tuple(c) for c in SEVERITY_COLOURS.values()}
    edge = frame.img[top:help_top, -2]  # the right edge, where no text reaches
    assert all(tuple(int(v) for v in px) in colours for px in edge), "banner colours from the block's top down to the help"
