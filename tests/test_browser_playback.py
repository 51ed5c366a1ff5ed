"""report.html in a real headless browser: the annotated H.264 video plays (its duration is known to the
page), clicking an alert or the phase ribbon seeks it, and a screenshot is taken to look at."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from or_agent.agent.offline.report import RIBBON_LEFT, RIBBON_WIDTH, phase_ribbon, write_html_report, write_png
from or_agent.pipelines.video_out import H264Writer

FPS, FRAMES, SIZE = 25.0, 100, (320, 240)  # a 4 s clip
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium here (Debian: apt-get install chromium; .ci/run installs it)")

# Run after the report's own script: click the first alert's time, then the middle of the ribbon's bands,
# and write where the video was sent into the page, for --dump-dom.
_PROBE = """<script>
const probeVideo = document.getElementById('video');
probeVideo.addEventListener('loadedmetadata', () => {
  document.querySelector('a.seek').click();
  document.body.dataset.afterAlertClick = probeVideo.currentTime.toFixed(3);
  const rb = document.getElementById('ribbon'), r = rb.getBoundingClientRect();
  const x = r.left + (LEFT + WIDTH / 2) * rb.clientWidth / rb.naturalWidth;
  rb.dispatchEvent(new MouseEvent('click', {clientX: x, clientY: r.top + 20, bubbles: true}));
  document.body.dataset.afterRibbonClick = probeVideo.currentTime.toFixed(3);
});
</script>""".replace("LEFT", str(RIBBON_LEFT)).replace("WIDTH", str(RIBBON_WIDTH))


def _report(folder):
    with H264Writer(folder / "annotated.mp4", FPS) as w:
        for i in range(FRAMES):
            img = np.zeros((SIZE[1], SIZE[0], 3), np.uint8)
            img[:, : int(SIZE[0] * (i + 1) / FRAMES)] = (40, 160, 40)  # a bar that grows over the clip
            w.write(img)
    pred = np.repeat(np.arange(4), FRAMES // 4)
    names = ["Preparation", "CalotTriangleDissection", "ClippingCutting", "GallbladderDissection"]
    write_png(folder / "phase_ribbon.png", phase_ribbon(pred, None, names, [(200, 60, 60), (60, 200, 60), (60, 60, 200),
                                                                            (200, 200, 60)], FPS))
    summary = {"frames": FRAMES, "fps": FPS, "duration_s": FRAMES / FPS, "fps_processed": 80.0, "frames_dropped": 0,
               "latency_ms": {"p50_ms": 20.0, "p99_ms": 41.0}, "events": [],
               "alerts": [{"frame": 75, "time_s": 3.0, "rule": "phase_too_long", "severity": "warning", "event": "raised",
                           "message": "Calot triangle dissection is taking long", "evidence": {"phase_s": 3.0}}]}
    write_html_report(folder / "report.html", summary, "phase_ribbon.png", "clip.mp4", "annotated.mp4")
    return folder / "report.html"


def _chromium(*args, timeout=120):
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--mute-audio",
                           "--autoplay-policy=no-user-gesture-required", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_the_report_embeds_the_video_and_the_browser_plays_and_seeks_it(tmp_path):
    report = _report(tmp_path)
    page = report.read_text()
    assert "<video id='video' controls preload='metadata' src='annotated.mp4'></video>" in page
    assert "capture→publish" in page and "&amp;rarr;" not in page  # escaped once, not twice
    assert page.index("<video") < page.index("id='ribbon'")  # the ribbon under the video
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _PROBE + "</body>"))
    proc = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    dom = proc.stdout
    assert "data-error" not in dom, dom[-2000:]
    duration = re.search(r'data-loaded-duration="([0-9.]+)"', dom)
    assert duration, f"the video's metadata never loaded; chromium said: {proc.stderr[-1500:]}"
    assert float(duration.group(1)) == pytest.approx(FRAMES / FPS, abs=0.05)
    assert float(re.search(r'data-after-alert-click="([0-9.]+)"', dom).group(1)) == pytest.approx(3.0, abs=0.05)
    assert float(re.search(r'data-after-ribbon-click="([0-9.]+)"', dom).group(1)) == pytest.approx(FRAMES / FPS / 2, abs=0.1)


def test_a_screenshot_of_the_report(tmp_path):
    report = _report(tmp_path)
    shot = tmp_path / "report.png"
    proc = _chromium("--virtual-time-budget=5000", "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1300,900",
                     report.as_uri())
    assert shot.is_file() and shot.stat().st_size > 0, proc.stderr[-1500:]
    import cv2

    img = cv2.imread(str(shot))
    assert img.shape[:2] == (900, 1300)
    # the video's first frame is drawn: its dark picture area, not only the white page
    assert (img.reshape(-1, 3).max(axis=1) < 60).sum() > 0.5 * SIZE[0] * SIZE[1]
