"""The quick-start job: a synthetic surgery played live through the agent to the reference display.

Generates a synthetic laparoscopic cholecystectomy (with its ground truth), starts ``or-agent
serve`` in this process on loopback with the surgery as its live (paced) source, and runs
``or-agent display`` against it: in a window when there is a screen, otherwise headless into a
video file. A second subscriber records every overlay that crossed the wire, and at the end the
demo prints the recognised phase timeline beside the ground truth, the out-of-body spans, each
anatomy class's mean area (predicted and true), and the latency the display saw.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import cv2
import grpc
import numpy as np

from or_agent.agent.config import load_config
from or_agent.agent.display import Display, has_screen
from or_agent.agent.offline.progress import Progress
from or_agent.agent.server import AgentServer
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.files import refuse_file_in_the_way
from or_agent.pipelines.messages import PAUSED_OUT_OF_BODY
from or_agent.pipelines.metrics import accuracy, official_phase_scores
from or_agent.pipelines.surgery import ANATOMY_NAMES, PHASES
from or_agent.proto.oragent.v1 import agent_pb2 as pb
from or_agent.proto.oragent.v1 import agent_pb2_grpc as pbg
from or_agent.synth.dataset import SynthConfig, read_phase_file, write_dataset

MASK_EVERY = 5  # frames with ground-truth masks in the demo surgery


def segments(per_frame: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal values: (value, first frame, end frame)."""
    out = []
    start = 0
    for i in range(1, len(per_frame) + 1):
        if i == len(per_frame) or per_frame[i] != per_frame[start]:
            out.append((int(per_frame[start]), start, i))
            start = i
    return out


def ensure_surgery(out_dir: Path, seed: int, time_scale: float) -> dict:
    cfg = SynthConfig(videos=1, seed=seed, time_scale=time_scale, mask_every=MASK_EVERY)
    meta_path = out_dir / "video01.json"
    if meta_path.exists() and (out_dir / "video01.mp4").exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("seed") == cfg.video_seed(1) and meta.get("time_scale") == time_scale:
            print(f"reusing the synthetic surgery in {out_dir}")
            return meta
    bar: list[Progress] = []

    def progress(_v, _n, frame, frames):
        if not bar:
            bar.append(Progress("generating a synthetic surgery", frames))
        bar[0].update(frame + 1)

    meta = write_dataset(out_dir, cfg, progress)[0]
    if bar:
        bar[0].close()
    return meta


async def _record(target: str, frames: int, record: dict, done: asyncio.Event) -> None:
    """Every overlay the agent sends, as a display receives it."""
    bar = Progress("live: agent -> display", frames)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pbg.OrAgentStub(channel)
        stream = stub.StreamOverlays(pb.SubscribeRequest(client_id="demo-recorder", include_anatomy=True))
        try:
            async for ov in stream:
                # out of the body, not any pause (an unfamiliar scene pauses too): the spans compared with the truth
                record[ov.sequence] = (ov.phase.id if ov.HasField("phase") else -1, ov.paused_reason == PAUSED_OUT_OF_BODY,
                                       {r.class_id: r.area_fraction for r in ov.anatomy}, ov.capture_to_publish_ms)
                bar.update(ov.sequence + 1)
                if ov.sequence + 1 >= frames:
                    break
        finally:
            bar.close()
            done.set()


async def _live(video: Path, frames: int, fps: float, time_scale: float, headless: str | None,
                models_dir) -> tuple[dict, Display]:
    cfg = load_config(None).with_overrides(**{
        "server.listen": "127.0.0.1:0", "case.source": str(video), "case.case_id": "demo", "case.paced": True,
        "pipeline.models": models_dir, "audit.directory": str(video.parent / "audit"),
        "alerts.time_scale": time_scale})
    server = AgentServer(cfg)
    port = await server.start()
    target = f"127.0.0.1:{port}"
    record: dict = {}
    done = asyncio.Event()
    display = Display(target, client_id="demo-display", headless=headless)
    try:
        recorder = asyncio.create_task(_record(target, frames, record, done))
        shown = asyncio.create_task(display.run())
        deadline = time.monotonic() + frames / fps + 15.0
        while not done.is_set() and time.monotonic() < deadline and not shown.done():
            await asyncio.sleep(0.2)
        display.stop()
        await asyncio.gather(shown, return_exceptions=False)
        recorder.cancel()
        await asyncio.gather(recorder, return_exceptions=True)
    finally:
        await server.stop()
    return record, display


def _true_areas(mask_dir: Path, frames: list[int]) -> np.ndarray:
    total = np.zeros(len(ANATOMY_NAMES))
    n = 0
    for f in frames:
        m = cv2.imread(str(mask_dir / f"frame{f:06d}.png"), cv2.IMREAD_UNCHANGED)
        if m is not None:
            total += np.bincount(m.ravel(), minlength=len(ANATOMY_NAMES))[:len(ANATOMY_NAMES)] / m.size
            n += 1
    return total / max(1, n)


def run_demo(out_dir: Path, seed: int, time_scale: float, models_dir=None, headless: str | None = None) -> int:
    refuse_file_in_the_way(out_dir)
    meta = ensure_surgery(out_dir, seed, time_scale)
    video, fps, frames = out_dir / "video01.mp4", float(meta["fps"]), int(meta["frames"])
    if headless is None and not has_screen():
        headless = str(out_dir / "display.mp4")
        print(f"no screen found: the display runs headless and records what it shows to {headless}")
    print(f"starting the agent on {video} ({frames / fps:.0f} s, played live at {fps:g} fps) and the display")
    record, display = asyncio.run(_live(video, frames, fps, time_scale, headless, models_dir))
    if not record:
        raise InputError("the display received no overlay from the agent")

    truth = read_phase_file(out_dir / "video01-phase.txt")
    seqs = np.array(sorted(record))
    pred = np.full(frames, -1, np.int64)
    paused = np.zeros(frames, bool)
    for s in seqs:  # the phase shown holds until the next overlay
        pred[s:] = record[s][0]
        paused[s:] = record[s][1]
    lat = np.array([record[s][3] for s in seqs])
    print(f"\nThe display received {len(seqs)} of {frames} frames' overlays; capture->publish latency "
          f"p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms")
    print(f"\nPhase timeline ({frames / fps:.0f} s)")
    print(f"  {'from':>7} {'to':>7}  recognised phase")
    for p, a, b in segments(pred):
        print(f"  {a / fps:6.1f}s {b / fps:6.1f}s  {PHASES[p] if p >= 0 else '(starting)'}")
    print(f"  {'from':>7} {'to':>7}  ground truth")
    for p, a, b in segments(truth):
        print(f"  {a / fps:6.1f}s {b / fps:6.1f}s  {PHASES[p]}")
    official = official_phase_scores(truth, pred[:len(truth)], np.arange(len(truth)) / fps, PHASES)
    print(f"  frame accuracy {100 * accuracy(truth, pred[:len(truth)]):.1f} % "
          f"({100 * official['accuracy']:.1f} % by the official Cholec80 evaluation, +-{official['window_s']:g} s "
          "at phase changes)")

    oob_true = [e for e in meta["events"] if e["kind"] == "out_of_body"]
    spans = [(a, b) for v, a, b in segments(paused.astype(np.int64)) if v == 1]
    print("\nOut of body (AI paused on the display, no overlay, no alert):")
    print("  detected: " + (", ".join(f"{a / fps:.1f}-{b / fps:.1f}s" for a, b in spans) or "none"))
    print("  truth:    " + (", ".join(f"{e['start'] / fps:.1f}-{e['end'] / fps:.1f}s" for e in oob_true) or "none"))

    in_body = [s for s in seqs if not record[s][1]]
    pred_area = np.zeros(len(ANATOMY_NAMES))
    for s in in_body:
        for c, a in record[s][2].items():
            pred_area[c] += a
    pred_area /= max(1, len(in_body))
    true_area = _true_areas(out_dir / "masks" / "video01", [s for s in in_body if s % MASK_EVERY == 0])
    print("\nAnatomy: mean area per class over the in-body frames (% of the frame)")
    print(f"  {'class':<24} {'predicted':>9} {'truth':>7}")
    for c, name in enumerate(ANATOMY_NAMES):
        if c and (pred_area[c] > 0 or true_area[c] > 0):
            print(f"  {name:<24} {100 * pred_area[c]:8.2f}% {100 * true_area[c]:6.2f}%")
    if headless:
        print(f"\nThe display's recording: {headless} ({display.frames_shown} frames)")
    print(f"Offline review of the same surgery: or-agent replay {video} --out {out_dir / 'replay'}")
    print("These reference models are trained on synthetic data: they show the pipeline working "
          "and are not for clinical use.")
    return 0
