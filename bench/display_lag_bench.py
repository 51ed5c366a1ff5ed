"""How old the overlays a slow display shows get before the agent ends its stream, against the limit.

    python -m bench.display_lag_bench [--seconds S] [--reads-per-s R] [--limit-s L]

The agent serves a paced synthetic surgery (25 fps); in a separate process (displays are separate
machines) two displays read R overlays a second (no JPEG, so each overlay is small and gRPC's
flow-control window, grown by its bandwidth probing, holds many seconds of them):

- ``without reports``: a display that does not call ``ReportProgress``. The agent can only judge
  what its transport has not taken yet, so it may be shown overlays far older than the limit.
- ``with reports``: the reference display's behaviour, ``reports_progress`` and a report of what it
  has shown after each read. The agent ends the stream once what it sent and was not shown is older
  than the limit; the display, told so by the report's answer (or by its refusal once the stream is
  gone), drops what its transport still holds and subscribes again.

For each: overlays read, the age (now minus capture) of the oldest overlay it read, and how its
stream ended, with the oldest age as a ratio of the agent's limit (the reference: <= about 1 plus
the read interval means the display was never shown anything much older than the limit).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from bench.common import models_option, select_models


def _displays(target: str, seconds: float, reads_per_s: float, out: mp.Queue) -> None:
    import grpc

    from or_agent.proto.oragent.v1 import agent_pb2 as pb
    from or_agent.proto.oragent.v1 import agent_pb2_grpc as pbg

    async def one(name: str, reports: bool) -> dict:
        """A display reading ``reads_per_s`` overlays a second; with ``reports`` it keeps the contract:
        it reports each overlay it shows and, when the agent says it is behind (or its stream is gone),
        drops what its transport holds and subscribes again."""
        read, oldest, resubscribed, ended = 0, 0.0, 0, f"still open after {seconds:g} s"
        end = time.monotonic() + seconds
        async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = pbg.OrAgentStub(ch)
            while time.monotonic() < end:
                call = stub.StreamOverlays(pb.SubscribeRequest(client_id=name, reports_progress=reports))
                try:
                    while time.monotonic() < end:
                        ov = await call.read()
                        if ov is grpc.aio.EOF:
                            return {"name": name, "read": read, "oldest_s": oldest, "resubscribed": resubscribed,
                                    "ended": "ended with OK"}
                        read += 1
                        oldest = max(oldest, time.time() - ov.capture_unix_ms / 1000)
                        if reports:
                            try:
                                ack = await stub.ReportProgress(pb.ProgressReport(client_id=name, stream_position=ov.stream_position))
                                behind = ack.behind_s > ack.limit_s
                            except grpc.aio.AioRpcError:
                                behind = True  # its stream was ended
                            if behind:
                                resubscribed += 1
                                break
                        await asyncio.sleep(1.0 / reads_per_s)
                except grpc.aio.AioRpcError as exc:
                    return {"name": name, "read": read, "oldest_s": oldest, "resubscribed": resubscribed,
                            "ended": f"{exc.code().name} after {seconds - (end - time.monotonic()):.1f} s"}
                finally:
                    call.cancel()
        return {"name": name, "read": read, "oldest_s": oldest, "resubscribed": resubscribed, "ended": ended}

    async def main():
        out.put(await asyncio.gather(one("without-reports", False), one("with-reports", True)))

    asyncio.run(main())


async def _run(video: Path, seconds: float, reads_per_s: float, limit_s: float) -> list[dict]:
    from or_agent.agent.config import load_config
    from or_agent.agent.server import AgentServer
    from or_agent.agent.session import CaseSpec

    cfg = load_config(None).with_overrides(**{"server.listen": "127.0.0.1:0", "server.behind_limit_s": limit_s,
                                              "audit.directory": tempfile.mkdtemp(prefix="or-agent-audit-")})
    server = AgentServer(cfg)
    port = await server.start()
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_displays, args=(f"127.0.0.1:{port}", seconds, reads_per_s, q))
    try:
        await server.service.start_case(CaseSpec(str(video), "bench", paced=True))
        proc.start()
        return await asyncio.get_running_loop().run_in_executor(None, q.get, True, seconds + 60)
    finally:
        await server.stop()
        proc.join(10)
        if proc.is_alive():
            proc.terminate()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="how long each display reads (default 30)")
    ap.add_argument("--reads-per-s", type=float, default=2.0, help="overlays each display reads a second (default 2)")
    ap.add_argument("--limit-s", type=float, default=5.0, help="the agent's server.behind_limit_s (default 5)")
    models_option(ap)
    args = ap.parse_args(argv)
    print(select_models(args))
    from or_agent.synth.dataset import SynthConfig, write_dataset

    tmp = Path(tempfile.mkdtemp(prefix="or-agent-display-lag-"))
    write_dataset(tmp, SynthConfig(videos=1, seed=12, time_scale=10.0, mask_every=100_000))
    results = asyncio.run(_run(tmp / "video01.mp4", args.seconds, args.reads_per_s, args.limit_s))
    print(f"slow displays: paced 25 fps surgery, each display reads {args.reads_per_s:g} overlays/s for up to "
          f"{args.seconds:g} s; agent's limit {args.limit_s:g} s")
    print(f"  {'display':<16} {'read':>5} {'oldest read':>12} {'vs limit':>9} {'resubscribed':>12}  stream")
    for r in results:
        print(f"  {r['name']:<16} {r['read']:5d} {r['oldest_s']:10.1f} s {r['oldest_s'] / args.limit_s:8.2f}x "
              f"{r['resubscribed']:12d}  {r['ended']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
