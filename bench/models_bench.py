"""Reference models on ONNX Runtime, CPU, one thread: milliseconds per frame beside the budget.

    python -m bench.models_bench [--runs N]

Budgets from the foundation issue: anatomy <= 15 ms per frame, phase <= 10 ms per step.
Preprocessing (content crop, resize, normalise) is timed too, on a decoded 854x480 frame.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import median_ms, models_option, pin_one_core, select_models
from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
from or_agent.pipelines.manifest import find_model
from or_agent.pipelines.preprocess import detect_content_area
from or_agent.pipelines.stages import PhaseStage, SegmentationStage, VisibilityStage
from or_agent.synth.render import SurgeryRenderer
from or_agent.synth.timeline import sample_timeline

BUDGET_MS = {"segmentation": 15.0, "phase": 10.0, "visibility": None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    models_option(ap)
    args = ap.parse_args(argv)
    print(select_models(args))
    where = pin_one_core()
    tl = sample_timeline(np.random.default_rng(5), time_scale=20)
    frame = SurgeryRenderer(tl, seed=6).render(tl.frames // 3).image
    area = detect_content_area(frame)
    stages = {
        "segmentation": SegmentationStage(OnnxRuntimeBackend(find_model("segmentation"), threads=1)),
        "phase": PhaseStage(OnnxRuntimeBackend(find_model("phase"), threads=1)),
        "visibility": VisibilityStage(OnnxRuntimeBackend(find_model("visibility"), threads=1)),
    }
    print(f"reference models, ONNX Runtime CPU, 1 thread, {where}, median of {args.runs} runs")
    print(f"  {'model':<14} {'input':<12} {'preprocess':>10} {'inference':>10} {'post':>8} {'budget':>8} {'budget/inference':>17}")
    for task, stage in stages.items():
        x = stage.pre_process(frame, area)
        y = stage.predict(x)
        pre = median_ms(lambda stage=stage: stage.pre_process(frame, area), args.runs)
        inf = median_ms(lambda stage=stage, x=x: stage.predict(x), args.runs)
        post = median_ms(lambda stage=stage, y=y: stage.post_process(y, area), args.runs)
        budget = BUDGET_MS[task]
        shape = "x".join(str(d) for d in stage.manifest.input.shape[2:])
        ratio = f"{budget / inf:16.2f}x" if budget else f"{'-':>17}"
        btxt = f"{budget:6.1f}ms" if budget else f"{'-':>8}"
        print(f"  {stage.manifest.name:<14} {shape:<12} {pre:8.2f}ms {inf:8.2f}ms {post:6.2f}ms {btxt} {ratio}")
    detect = median_ms(lambda: detect_content_area(frame), args.runs)
    print(f"  content-area detection (every 25th frame): {detect:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
