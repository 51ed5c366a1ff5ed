"""The real-time dataflow: frame sources, preprocessing, inference backends and model stages.

This package imports nothing from ``agent``, ``proto`` or ``calibration``, so it can be
tested, benchmarked and reused on its own.
"""
