"""or-agent: the process on the OR box (command line, gRPC service, display), and its offline jobs (``offline``)."""

from or_agent import __version__ as VERSION  # the one place: or_agent/__init__.py (setup.py reads it there)

__all__ = ["VERSION"]
