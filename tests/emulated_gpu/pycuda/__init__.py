"""Emulated pycuda for tests (see tests/emulated_gpu/README.md)."""
