"""Command-line options shared by the agent's commands, calibration and the benchmarks."""

from __future__ import annotations

import argparse


def add_models_option(p: argparse.ArgumentParser, what: str = "the model set to use") -> None:
    """``--models SET|DIR``, for every command that loads models (``--models-dir`` still accepted)."""
    p.add_argument("--models", "--models-dir", dest="models_dir", metavar="SET|DIR", default=None,
                   help=f"{what}: a model set's name (see `or-agent models`) or folder, or a models directory "
                        "(default: $OR_AGENT_MODELS or the set 'synthetic')")
