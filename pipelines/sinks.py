"""Subscribers that do slow work (drawing, encoding, sending) on their own thread.

The publish point calls its subscribers in line; anything slower than a few hundred
microseconds goes through a ``QueuedSubscriber`` so it overlaps with the pipeline instead of
adding to it. Its queue is bounded: an offline recorder blocks the publisher when full (no frame
is ever lost from a recording), a live consumer drops its oldest item and counts it (a slow
display never slows the pipeline).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
_STOP = object()


class QueuedSubscriber(Generic[T]):
    def __init__(self, handle: Callable[[T], None], maxsize: int = 4, drop_oldest: bool = False, name: str = "sink"):
        if maxsize < 1:
            raise ValueError(f"queue size must be at least 1, got {maxsize}")
        self.handle = handle
        self.drop_oldest = drop_oldest
        self.name = name
        self.dropped = 0
        self.handled = 0
        self.error: BaseException | None = None
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False

    def start(self) -> QueuedSubscriber[T]:
        self._thread.start()
        return self

    def __call__(self, item: T) -> None:
        """The publish-side entry: enqueue, blocking or dropping the oldest as configured."""
        if self._closed or self.error is not None:
            return
        if not self.drop_oldest:
            while self._thread.is_alive():
                try:
                    self._q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue
            return
        while True:
            try:
                self._q.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._q.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            try:
                self.handle(item)
                self.handled += 1
            except BaseException as exc:
                self.error = exc
                return

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish what is queued, then end the thread. Raises the handler's failure, if any."""
        if not self._closed:
            self._closed = True
            if self._thread.is_alive():
                while True:
                    try:
                        self._q.put(_STOP, timeout=0.1)
                        break
                    except queue.Full:
                        if not self._thread.is_alive():
                            break
                self._thread.join(timeout_s)
        if self.error is not None:
            raise self.error

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
