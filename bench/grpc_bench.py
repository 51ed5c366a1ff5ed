"""The gRPC fan-out against the no-subscriber pipeline, and the size and cost of one overlay.

    python -m bench.grpc_bench [--seconds S]

For 0, 1, 4 and 16 subscribers (in a separate client process, as displays are separate machines):
the pipeline's frame rate (unpaced synthetic 854x480 surgery, so any cost shows as lost frames)
and publish-to-receive latency p50/p99, each beside the no-subscriber run. Then an overlay for a
1080p frame with anatomy: bytes on the wire and serialisation time.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from bench.common import models_option, select_models


def _subscribers(target: str, n: int, seconds: float, out: mp.Queue) -> None:
    import grpc

    from or_agent.proto.oragent.v1 import agent_pb2 as pb
    from or_agent.proto.oragent.v1 import agent_pb2_grpc as pbg

    async def one(i, lat, counts):
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pbg.OrAgentStub(ch)
            end = time.time() + seconds
            try:
                async for ov in stub.StreamOverlays(pb.SubscribeRequest(client_id=f"bench-{i}", include_anatomy=True)):
                    now = time.time() * 1000
                    published = ov.capture_unix_ms + ov.capture_to_publish_ms
                    lat.append(now - published)
                    counts[i] += 1
                    if time.time() > end:
                        break
            except grpc.aio.AioRpcError:
                pass

    async def main():
        lat, counts = [], [0] * n
        await asyncio.gather(*(one(i, lat, counts) for i in range(n)))
        out.put((lat, counts))

    asyncio.run(main())


async def _run(video: Path, subs: int, seconds: float) -> tuple[float, list[float], list[int]]:
    from or_agent.agent.config import load_config
    from or_agent.agent.server import AgentServer

    cfg = load_config(None).with_overrides(**{"server.listen": "127.0.0.1:0", "server.max_subscribers": 32,
                                              "audit.directory": tempfile.mkdtemp(prefix="or-agent-audit-")})
    server = AgentServer(cfg)
    port = await server.start()
    q: mp.Queue = mp.get_context("spawn").Queue()
    proc = None
    try:
        if subs:
            proc = mp.get_context("spawn").Process(target=_subscribers, args=(f"127.0.0.1:{port}", subs, seconds + 2, q))
            proc.start()
            await asyncio.sleep(2.5)  # let the client process import and connect
        await server.service.start_case(_spec(video))
        svc = server.service
        await asyncio.sleep(1.0)  # warm-up
        n0, t0 = svc.published, time.monotonic()
        await asyncio.sleep(seconds)
        fps = (svc.published - n0) / (time.monotonic() - t0)
        lat, counts = ([], [])
        if proc is not None:
            lat, counts = await asyncio.get_running_loop().run_in_executor(None, q.get, True, 60)
            proc.join(10)
        return fps, lat, counts
    finally:
        await server.stop()
        if proc is not None and proc.is_alive():
            proc.terminate()


def _spec(video: Path):
    from or_agent.agent.session import CaseSpec

    return CaseSpec(str(video), "bench", paced=False)


def overlay_cost() -> tuple[int, float, int]:
    """Bytes and serialisation time of an overlay for a 1080p frame with anatomy."""
    from or_agent.agent.session import LoadedModels
    from or_agent.agent.wire import overlay_to_pb
    from or_agent.pipelines.masks import segmentation_polygons
    from or_agent.pipelines.messages import FrameResult, SegmentationEstimate
    from or_agent.pipelines.preprocess import detect_content_area
    from or_agent.synth.render import SurgeryRenderer
    from or_agent.synth.timeline import sample_timeline

    tl = sample_timeline(np.random.default_rng(3), time_scale=20)
    img = cv2.resize(SurgeryRenderer(tl, seed=4).render(tl.frames // 3).image, (1920, 1080))
    m = LoadedModels()
    area = detect_content_area(img)
    ests = [stage(img, area) for stage in m.stages.stages]
    an = next(e for e in ests if isinstance(e, SegmentationEstimate))
    r = FrameResult.of(ests, seq=1, media_ms=40.0, frame_size=(1920, 1080),
                       marks_ns={"capture": time.monotonic_ns(), "preprocess": 0, "inference": 0, "postprocess": 0,
                                 "publish": time.monotonic_ns()}, polygons={an.model: segmentation_polygons(an)})
    from or_agent.proto.oragent.v1 import agent_pb2 as pb
    info = [pb.ModelInfo(task="segmentation", name="anatomy", version="1.0.0", sha256="0" * 64)] * 3
    runs = 200
    t0 = time.perf_counter()
    for _ in range(runs):
        data = overlay_to_pb(r, info, [], True).SerializeToString()
    ms = (time.perf_counter() - t0) / runs * 1000
    vertices = sum(len(p) for ps in r.polygons[an.model].values() for p in ps)
    m.close()
    return len(data), ms, vertices


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="measurement window per run (default 8)")
    models_option(ap)
    args = ap.parse_args(argv)
    print(select_models(args))
    from or_agent.synth.dataset import SynthConfig, write_dataset

    tmp = Path(tempfile.mkdtemp(prefix="or-agent-grpc-bench-"))
    write_dataset(tmp, SynthConfig(videos=1, seed=12, time_scale=10.0, mask_every=100_000))
    video = tmp / "video01.mp4"
    print(f"gRPC fan-out: unpaced synthetic 854x480 surgery, {args.seconds:g} s per run, subscribers in a separate process")
    print(f"  {'subscribers':>11} {'pipeline fps':>12} {'vs none':>8} {'received/s each':>16} {'publish->receive p50':>21} {'p99':>8}")
    base = None
    for subs in (0, 1, 4, 16):
        fps, lat, counts = asyncio.run(_run(video, subs, args.seconds))
        base = base or fps
        if subs:
            p50, p99 = np.percentile(lat, [50, 99]) if lat else (float("nan"),) * 2
            each = np.mean(counts) / (args.seconds + 2)
            print(f"  {subs:>11} {fps:12.1f} {fps / base:7.2f}x {each:16.1f} {p50:18.1f} ms {p99:6.1f} ms")
        else:
            print(f"  {subs:>11} {fps:12.1f} {1.0:7.2f}x {'-':>16} {'-':>21} {'-':>8}")
    size, ms, vertices = overlay_cost()
    print(f"overlay for a 1920x1080 frame with anatomy: {size} bytes ({size / 1024:.1f} KB; goal <= 20 KB, "
          f"ratio {size / 20480:.2f}), {vertices} polygon vertices, serialised in {ms:.3f} ms (goal <= 1 ms, ratio {ms:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
