"""The progress sidecar's timing: when a partial file's sidecar is due to be saved again, and the
background thread that saves it (each save waits for a data sync, which must not stall a read)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_SAVE_EVERY = 0.5  # seconds between progress sidecar writes...
_SAVE_FRACTION = 64  # ...or every 1/64 of the file, whichever comes first,
_SAVE_MIN_GAP = 0.05  # but no more often than this (each save waits for an fsync)
_UNKNOWN_SIZE_STEP = 4 * 1024 * 1024


class SaveClock:
    """Every 0.5 s, or every 1/64 of the file (at most 20 times a second): a process killed
    at any moment loses little, however fast the bytes arrive."""

    def __init__(self) -> None:
        self.last = 0.0
        self.saved_bytes = 0

    def due(self, done: int, total: int | None) -> bool:
        since = time.monotonic() - self.last
        if since >= _SAVE_EVERY:
            return True
        step = total // _SAVE_FRACTION if total else _UNKNOWN_SIZE_STEP
        return since >= _SAVE_MIN_GAP and done - self.saved_bytes >= step

    def mark(self, done: int | None = None) -> None:
        self.last = time.monotonic()
        if done is not None:
            self.saved_bytes = done


class Background:
    """Runs `work` in a thread of its own whenever requested; requests made while it runs fold
    into one more run."""

    def __init__(self, work: Callable[[], None], name: str) -> None:
        self.work = work
        self.name = name
        self.cond = threading.Condition()
        self.pending = False
        self.stopped = False
        self.thread: threading.Thread | None = None

    def request(self) -> None:
        with self.cond:
            if self.stopped:
                return
            self.pending = True
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self.thread.start()
            self.cond.notify()

    def stop(self) -> None:
        """Finish a run in progress (a pending one is dropped) and end the thread."""
        with self.cond:
            self.stopped = True
            self.pending = False
            self.cond.notify()
            thread = self.thread
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending or self.stopped)
                if self.stopped:
                    return
                self.pending = False
            try:
                self.work()
            except Exception as exc:  # noqa: BLE001 - a lost sidecar costs only resumability
                log.warning("could not record download progress: %s", exc)
