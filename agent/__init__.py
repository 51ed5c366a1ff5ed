"""or-agent: the process on the OR box (command line, gRPC service, display), and its offline jobs (``offline``)."""

VERSION = "0.1.0"  # as in setup.py
