"""``or-agent calibrate``: INT8 and FP16 models for the box, their comparison, and the phase
model's temperature. ``agent.cli`` adds these with ``add_arguments(subparsers)``."""

from __future__ import annotations

import argparse

from or_agent.calibration.common import precision_of, require_onnx
from or_agent.pipelines.errors import InputError


def _model_names(name: str, models_dir) -> list[str]:
    """``all``: every FP32 model in the models directory; otherwise the one name."""
    if name != "all":
        return [name]
    from or_agent.pipelines.manifest import discover, load_manifest, resolve_models_dir

    root = resolve_models_dir(models_dir)
    names = [p.parent.name for p in discover(root) if precision_of(load_manifest(p)) == "fp32"]
    if not names:
        raise InputError(f"{root}: no FP32 models to convert")
    return names


def cmd_int8(args) -> int:
    from or_agent.calibration.int8 import calibrate_int8

    require_onnx()
    if args.frames < 1:
        raise InputError(f"--frames must be at least 1, got {args.frames}")
    for name in _model_names(args.model, args.models_dir):
        calibrate_int8(name, args.videos, out_dir=args.out, frames=args.frames, models_dir=args.models_dir)
    print(f"use them with --models {args.out} (or OR_AGENT_MODELS={args.out}) once every task has a model there")
    return 0


def cmd_fp16(args) -> int:
    from or_agent.calibration.fp16 import calibrate_fp16

    require_onnx()
    for name in _model_names(args.model, args.models_dir):
        calibrate_fp16(name, out_dir=args.out, models_dir=args.models_dir)
    print(f"use them with --models {args.out} (or OR_AGENT_MODELS={args.out}) once every task has a model there")
    return 0


def cmd_compare(args) -> int:
    from or_agent.calibration.compare import run_compare

    run_compare(args.videos, args.variants, models_dir=args.models_dir, write=not args.no_write)
    return 0


def cmd_temperature(args) -> int:
    from or_agent.calibration.temperature import calibrate_temperature

    result = calibrate_temperature(args.videos, model=args.model, models_dir=args.models_dir, write=not args.dry_run,
                                   check=args.check)
    return 0 if result.get("check_passed", True) else 1


def add_arguments(subparsers) -> argparse.ArgumentParser:
    """Add ``calibrate`` and its actions to ``or-agent``'s subcommands; returns its parser."""
    from or_agent.agent.options import add_models_option
    from or_agent.calibration.fp16 import DEFAULT_OUT as FP16_OUT
    from or_agent.calibration.int8 import DEFAULT_FRAMES
    from or_agent.calibration.int8 import DEFAULT_OUT as INT8_OUT

    p = subparsers.add_parser("calibrate", help="INT8/FP16 models for the box (precision in the ONNX file), "
                                                "their comparison with FP32, and the phase model's confidence calibration")
    sub = p.add_subparsers(dest="calibrate_command", metavar="ACTION")
    sub.required = True

    q = sub.add_parser("int8", help="explicit INT8: a Q/DQ model calibrated on frames sampled from recorded videos")
    q.add_argument("--model", required=True, help="model folder or name in the models directory, or 'all'")
    q.add_argument("--videos", nargs="+", required=True, metavar="PATH",
                   help="videos or directories of videos to sample calibration frames from (labels next to them "
                        "are used to stratify: <name>-phase.txt, <name>-flags.csv)")
    q.add_argument("--out", default=str(INT8_OUT), help=f"models directory to write <name>-int8/ into (default {INT8_OUT})")
    q.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help=f"calibration frames (default {DEFAULT_FRAMES})")
    add_models_option(q, "where the FP32 models are")
    q.set_defaults(func=cmd_int8)

    q = sub.add_parser("fp16", help="FP16: float16 weights and activations, float32 inputs and outputs")
    q.add_argument("--model", required=True, help="model folder or name in the models directory, or 'all'")
    q.add_argument("--out", default=str(FP16_OUT), help=f"models directory to write <name>-fp16/ into (default {FP16_OUT})")
    add_models_option(q, "where the FP32 models are")
    q.set_defaults(func=cmd_fp16)

    q = sub.add_parser("compare", help="FP32 vs FP16 vs INT8 on held-out video: accuracy, agreement with FP32, ms/frame")
    q.add_argument("--videos", nargs="+", metavar="PATH",
                   help="held-out videos with labels and masks next to them (default: the first held-out synthetic surgery)")
    q.add_argument("--variants", nargs="+", metavar="DIR",
                   help="model folders or models directories to compare (default: the FP32 models, "
                        "out/models-fp16 and out/models-int8)")
    add_models_option(q, "where the FP32 references are")
    q.add_argument("--no-write", action="store_true", help="print only; do not store the figures in the manifests")
    q.set_defaults(func=cmd_compare)

    q = sub.add_parser("temperature", help="fit the phase model's softmax temperature on labelled videos; report ECE")
    q.add_argument("--videos", nargs="+", required=True, metavar="PATH",
                   help="videos with phase labels next to them (<name>-phase.txt or .csv); not the training videos")
    q.add_argument("--model", default=None, help="phase model folder or name (default: the installed phase model)")
    add_models_option(q)
    q.add_argument("--check", nargs="+", metavar="PATH", default=None,
                   help="labelled videos kept out of the fit: ECE before/after measured there too, and the "
                        "temperature is written only if it helps there (lower ECE and NLL)")
    q.add_argument("--dry-run", action="store_true", help="report only; do not write the temperature into the manifest")
    q.set_defaults(func=cmd_temperature)
    return p
