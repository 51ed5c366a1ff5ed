"""Training recipes for the reference models (needs the ``train`` extra: torch 2.13 CPU)."""
