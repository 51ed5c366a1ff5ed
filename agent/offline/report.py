"""What a clinical team reviews after a replay: the phase ribbon picture and the HTML summary."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from or_agent.pipelines.files import atomic_path, atomic_write_text
from or_agent.pipelines.overlay import format_duration

RIBBON_LEFT, RIBBON_WIDTH = 70, 1200  # where the bands are in the ribbon picture: the report maps clicks to time


def phase_ribbon(pred: np.ndarray, truth: np.ndarray | None, names: Sequence[str],
                 colours_rgb: Sequence[tuple[int, int, int]], fps: float, width: int = RIBBON_WIDTH) -> np.ndarray:
    """Prediction (and ground truth below it) as coloured bands over time, with a legend."""
    n = len(pred)
    rows = [("AI", pred)] + ([("truth", truth[:n])] if truth is not None else [])
    band_h, left, legend_h = 36, RIBBON_LEFT, 28 + 22 * ((len(names) + 2) // 3)
    img = np.full((20 + len(rows) * (band_h + 10) + 30 + legend_h, left + width + 20, 3), 255, np.uint8)
    lut = np.array([c[::-1] for c in colours_rgb] + [(200, 200, 200)], np.uint8)  # last: unknown
    cols = np.minimum((np.arange(width) * n / width).astype(int), max(0, n - 1))
    for r, (label, seq) in enumerate(rows):
        y = 20 + r * (band_h + 10)
        s = np.where((seq >= 0) & (seq < len(names)), seq, len(names))
        img[y:y + band_h, left:left + width] = lut[s[cols]][None, :, :]
        cv2.putText(img, label, (8, y + band_h - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    y_axis = 20 + len(rows) * (band_h + 10) + 12
    duration = n / fps
    for k in range(6):
        x = left + int(k * (width - 1) / 5)
        cv2.line(img, (x, y_axis - 8), (x, y_axis - 2), (0, 0, 0), 1)
        cv2.putText(img, format_duration(duration * k / 5), (x - 18, y_axis + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    y0 = y_axis + 30
    for i, name in enumerate(names):
        x = left + (i % 3) * (width // 3)
        y = y0 + (i // 3) * 22
        cv2.rectangle(img, (x, y - 12), (x + 16, y + 2), tuple(int(v) for v in lut[i]), -1)
        cv2.putText(img, name, (x + 22, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def write_png(path: Path, img: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), img):
            raise OSError(f"cannot write {path}")


class _Html(str):
    """A table cell that is already HTML (a seek link), so ``_table`` does not escape it."""


def _cell(c) -> str:
    return c if isinstance(c, _Html) else html.escape(str(c))


def _seek_link(t_s: float) -> _Html:
    return _Html(f"<a href='#' class='seek' data-t='{t_s:.3f}' title='play the video from here'>{format_duration(t_s)}</a>")


# Seeking without a server: the ribbon's x maps to media time, each alert's time link seeks to it.
# The loaded duration is written into the page, which also lets a headless browser check playback.
_SCRIPT = """
const v = document.getElementById('video'), rb = document.getElementById('ribbon');
function seek(t) { if (!v) return; v.currentTime = t; v.scrollIntoView({block: 'nearest'}); v.play().catch(() => {}); }
if (v) {
  v.addEventListener('loadedmetadata', () => {
    v.dataset.loadedDuration = v.duration.toFixed(3);
    document.getElementById('video-duration').textContent = v.duration.toFixed(1) + ' s';
  });
  v.addEventListener('error', () => { v.dataset.error = v.error ? v.error.code + ' ' + v.error.message : 'error'; });
}
if (rb && v) rb.addEventListener('click', e => {
  const x = e.offsetX * rb.naturalWidth / rb.clientWidth, f = (x - +rb.dataset.left) / +rb.dataset.width;
  if (f >= 0 && f <= 1) seek(f * (v.duration || +rb.dataset.duration));
});
document.querySelectorAll('a.seek').forEach(a => a.addEventListener('click', e => { e.preventDefault(); seek(+a.dataset.t); }));
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f} %"


def write_html_report(path: Path, summary: dict, ribbon_name: str, video_name: str,
                      annotated_video: str | None = None) -> None:
    """One self-explaining page: the annotated video (when recorded) with the ribbon under it, both
    seekable by clicking, the figures, what went wrong. Plain HTML and a few lines of script: opened
    from disk, no server."""
    s = summary
    parts = [f"<h1>Replay of {html.escape(video_name)}</h1>",
             "<p class='warn'>Reference models trained on synthetic data: not for clinical use.</p>",
             _table(["frames", "duration", "processed at", "capture→publish p50 / p99", "dropped"],
                    [[s["frames"], format_duration(s["duration_s"]), f"{s['fps_processed']:.1f} fps",
                      f"{s['latency_ms']['p50_ms']:.1f} / {s['latency_ms']['p99_ms']:.1f} ms", s["frames_dropped"]]]),
             ]
    if annotated_video:
        parts.append(f"<h2>Annotated video <small id='video-duration'></small></h2>"
                     f"<video id='video' controls preload='metadata' src='{html.escape(annotated_video)}'></video>")
    paused = s.get("paused_s")
    if paused:
        parts.append("<p>AI paused (no overlay, no alert from the models): "
                     + ", ".join(f"{html.escape(reason)} {seconds:.1f} s" for reason, seconds in paused.items()) + ".</p>")
    ribbon_duration = s["frames"] / s["fps"] if s.get("fps") else 0.0
    parts.append(f"<h2>Phase timeline</h2><img id='ribbon' src='{html.escape(ribbon_name)}' alt='phase ribbon' "
                 f"data-left='{RIBBON_LEFT}' data-width='{RIBBON_WIDTH}' data-duration='{ribbon_duration:.3f}'"
                 + (" title='click to play the video from that time'>" if annotated_video else ">"))
    ph = s.get("phase_metrics")
    if ph:
        official = ph.get("official")
        parts.append(f"<p>Frame accuracy {_pct(ph['strict']['accuracy'])}" + (
            f"; official {_pct(official['accuracy'])} (the Cholec80 evaluation: in the first {official['window_s']:g} s "
            f"of each labelled phase the previous phase counts as right, in its last {official['window_s']:g} s the "
            "next; '-': undefined)" if official else "") + ".</p>")
        rows = []
        for name, m in ph["strict"]["per_phase"].items():
            r = official["per_phase"].get(name, {}) if official else {}
            rows.append([name, m["frames"], _pct(m["precision"]), _pct(m["recall"]), _pct(m["f1"]), _pct(m["jaccard"]),
                         *((_pct(r.get("precision")), _pct(r.get("recall")), _pct(r.get("jaccard"))) if official else ())])
        parts.append(_table(["phase", "frames", "precision", "recall", "F1", "Jaccard",
                             *(("precision (official)", "recall (official)", "Jaccard (official)") if official else ())],
                            rows))
    else:
        parts.append("<p>No phase labels given: no phase accuracy.</p>")
    an = s.get("anatomy_metrics")
    if an:
        parts.append(f"<h2>Anatomy</h2><p>Mean IoU over the classes present: {_pct(an['miou'])} "
                     f"({an['frames']} annotated frames).</p>")
        parts.append(_table(["class", "IoU", "Dice"], [[k, _pct(v["iou"]), _pct(v["dice"])] for k, v in an["per_class"].items()]))
    alerts = s.get("alerts", [])
    parts.append(f"<h2>Alerts</h2><p>{sum(a['event'] == 'raised' for a in alerts)} raised by the decision-support rules.</p>")
    if alerts:
        parts.append(_table(["time", "frame", "rule", "severity", "event", "message", "evidence"],
                            [[_seek_link(a["time_s"]) if annotated_video else format_duration(a["time_s"]),
                              a["frame"], a["rule"], a["severity"], a["event"], a["message"],
                              "; ".join(f"{k}={v}" for k, v in a["evidence"].items())] for a in alerts]))
    if s.get("events"):
        parts.append("<h2>Source events</h2>" + _table(["kind", "message"], [[e["kind"], e["message"]] for e in s["events"]]))
    parts.append("<h2>All figures</h2><pre>" + html.escape(json.dumps(s, indent=1)) + "</pre>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1300px} table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right} th{background:#eee}"
             "td:first-child{text-align:left} img{max-width:100%} .warn{color:#a00}"
             " video{max-width:100%;max-height:70vh;background:#000;display:block} #ribbon{cursor:pointer}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Replay {html.escape(video_name)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}<script>{_SCRIPT}</script></body></html>\n")
    atomic_write_text(path, page)
