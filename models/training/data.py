"""The synthetic data the reference models are trained and measured on (defined in ``synth.splits``)."""

from or_agent.synth.splits import CALIBRATION, HELD_OUT, TRAIN, ensure_dataset, video_names

__all__ = ["CALIBRATION", "HELD_OUT", "TRAIN", "ensure_dataset", "video_names"]
