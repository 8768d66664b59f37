"""Progress: events, their throttling, the 10% log lines, status files and the tqdm bar.

A `Monitor` follows one model's download; every caller waiting on it (in this process, or in
another one through the status file) receives the same `ProgressEvent`s. Only the holder of the
model's lock writes the status file, and it heartbeats it while it sleeps.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .redact import redact
from .store import (
    hostname,
    is_count,
    is_number,
    optional_pid,
    optional_time,
    read_json,
    report_malformed,
    write_atomic,
)

log = logging.getLogger(__name__)

STAGES = ("resolving", "waiting", "downloading", "verifying", "installed", "failed", "interrupted")
FINAL_STAGES = ("installed", "failed", "interrupted")
"""interrupted: the process was stopped (Ctrl-C); the partial file is kept for resuming."""
MAX_EVENTS_PER_S = 10
STALL_AFTER_S = 2.0  # no byte for this long: the event says stalled, at 0 B/s


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report for a model (sizes are for the whole model, all files)."""

    model_id: str
    filename: str | None
    source: str | None
    stage: str
    """resolving, waiting, downloading, verifying, installed, failed or interrupted."""
    downloaded: int = 0
    total: int | None = None
    bytes_per_s: float = 0.0
    stalled: bool = False
    """True when no byte has arrived for a while: bytes_per_s is 0, not a frozen figure."""
    message: str | None = None

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, self.downloaded / self.total)


ProgressCallback = Callable[[ProgressEvent], None]


class Monitor:
    """The live state of one model's resolution, fanned out to any number of subscribers."""

    def __init__(self, model_id: str, status_path: Path | None = None) -> None:
        self.model_id = model_id
        self.status_path = status_path
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._subscribers: list[_Throttled] = []
        self._event = ProgressEvent(model_id, None, None, "resolving")
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        self._last_byte_at = time.monotonic()
        self._base = 0  # bytes of files finished before the current one
        self._rest = 0  # expected bytes of the files after the current one
        self._logged_decile = -1
        self._sent_decile = -1
        self._status_written = 0.0
        self._ticker: threading.Thread | None = None
        self._closed = threading.Event()
        self.failures: list[dict[str, str]] = []
        """Each failed source's ``{source, kind, message}``, kept in the status file."""
        self._writing = False  # only the lock holder writes the status file
        self._status_lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None
        self._heartbeat_stop = threading.Event()

    # subscribers ---------------------------------------------------------------------------
    def subscribe(self, callback: ProgressCallback | None) -> None:
        if callback is None:
            return
        sub = _Throttled(callback)
        with self._lock:
            self._subscribers.append(sub)
            current = self._event
        sub.send(current, force=True)

    @property
    def event(self) -> ProgressEvent:
        return self._event

    # updates -------------------------------------------------------------------------------
    def stage(self, stage: str, *, force: bool = True, **fields: Any) -> None:
        with self._lock:
            self._event = replace(self._event, stage=stage, stalled=False, **fields)
            if stage == "downloading":
                self._last_byte_at = time.monotonic()
        self._publish(force=force)
        if stage == "downloading":
            self._start_ticker()
        if stage in FINAL_STAGES:
            self._closed.set()

    def file_started(self, filename: str, source: str, size: int | None, rest: int = 0) -> None:
        """A file starts downloading; `rest` is the expected size of the files after it."""
        with self._lock:
            self._samples.clear()
            self._rest = rest
            total = None if size is None else self._base + size + rest
            downloaded = self._base
        self.stage(
            "downloading", filename=filename, source=source, total=total, downloaded=downloaded
        )

    def file_done(self, size: int) -> None:
        with self._lock:
            self._base += size

    def bytes(self, done: int, file_total: int | None) -> None:
        """Downloader callback: `done` bytes of the current file so far."""
        now = time.monotonic()
        with self._lock:
            downloaded = self._base + done
            if downloaded != self._event.downloaded:
                self._last_byte_at = now
            self._samples.append((now, downloaded))
            total = self._event.total
            if file_total is not None:
                total = self._base + file_total + self._rest
            self._event = replace(
                self._event,
                downloaded=downloaded,
                total=total,
                bytes_per_s=self._rate(now),
                stalled=False,
            )
        self._publish()

    def relay(self, event: ProgressEvent) -> None:
        """Forward an event observed elsewhere (another process's status file) as our own."""
        with self._lock:
            self._event = replace(event, model_id=self.model_id)
        self._publish()

    def hold_status(self, heartbeat: float) -> None:
        """We hold the model's lock: write the status file from now on, and rewrite it every
        `heartbeat` seconds even when nothing moves (a Retry-After sleep, a backoff, a slow
        source), so waiters can tell a live holder from a hung one."""
        if self.status_path is None:
            return
        self._writing = True
        self._write_status()
        self._heartbeat_stop.clear()

        def beat() -> None:
            while not self._heartbeat_stop.wait(heartbeat):
                self._write_status()

        self._heartbeat = threading.Thread(target=beat, name="llmlb-heartbeat", daemon=True)
        self._heartbeat.start()

    def release_status(self) -> None:
        """Stop writing the status file (call before releasing the lock)."""
        self._heartbeat_stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        with self._status_lock:
            self._writing = False

    def close(self) -> None:
        self._closed.set()
        self.release_status()

    # internals -----------------------------------------------------------------------------
    def _rate(self, now: float) -> float:
        while self._samples and now - self._samples[0][0] > 3.0:
            self._samples.popleft()
        if len(self._samples) < 2:
            return self._event.bytes_per_s
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else self._event.bytes_per_s

    def _publish(self, force: bool = False) -> None:
        event = self._event
        with self._lock:
            subs = list(self._subscribers)
        final = event.stage in FINAL_STAGES
        # Every 10% step reaches every subscriber (llmlb's granularity), throttling or not.
        decile = int((event.fraction or 0) * 10) if event.stage == "downloading" else -1
        step = decile > self._sent_decile
        if step:
            self._sent_decile = decile
        for sub in subs:
            sub.send(event, force=force or final or step)
        self._log_decile(event)
        if self._writing:
            now = time.monotonic()
            if force or final or now - self._status_written >= 0.25:
                self._status_written = now
                self._write_status()

    def _write_status(self) -> None:
        # Serialised, and the event read inside: a heartbeat never writes an older event over
        # a newer one (say "downloading" over "installed").
        with self._status_lock:
            if self._writing and self.status_path is not None:
                extra = {"failures": self.failures} if self.failures else None
                write_status_file(self.status_path, self._event, self.started_at, extra)

    def _log_decile(self, event: ProgressEvent) -> None:
        fraction = event.fraction
        if event.stage != "downloading" or fraction is None:
            return
        decile = int(fraction * 10)
        if decile > self._logged_decile:
            self._logged_decile = decile
            log.info(
                "%s: %d%% (%s of %s) from %s at %s/s",
                self.model_id,
                decile * 10,
                _mib(event.downloaded),
                _mib(event.total or 0),
                event.source,
                _mib(int(event.bytes_per_s)),
            )

    def _start_ticker(self) -> None:
        if self._ticker is not None:
            return

        def tick() -> None:
            while not self._closed.wait(0.5):
                with self._lock:  # check and mark together: the stage may change meanwhile
                    stalled = (
                        self._event.stage == "downloading"
                        and time.monotonic() - self._last_byte_at >= STALL_AFTER_S
                    )
                    if stalled:
                        self._event = replace(self._event, bytes_per_s=0.0, stalled=True)
                if stalled:
                    self._publish(force=False)

        self._ticker = threading.Thread(target=tick, name="llmlb-progress", daemon=True)
        self._ticker.start()


class _Throttled:
    """At most MAX_EVENTS_PER_S events to one callback; stage changes and the last always go."""

    def __init__(self, callback: ProgressCallback) -> None:
        self.callback = callback
        self.last_sent = 0.0
        self.last_stage: str | None = None
        self.lock = threading.Lock()

    def send(self, event: ProgressEvent, force: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            if self.last_stage in FINAL_STAGES:
                # The final event was delivered: a late event from another thread (the stall
                # ticker, a downloader) must not follow it and undo "installed" or "failed".
                return
            due = (
                force
                or event.stage != self.last_stage
                or now - self.last_sent >= 1.0 / MAX_EVENTS_PER_S
            )
            if not due:
                return
            self.last_sent = now
            self.last_stage = event.stage
        try:
            self.callback(event)
        except Exception:  # noqa: BLE001 - a broken callback must not break the download
            log.exception("progress callback %r failed", self.callback)


# status files (cross-process) ----------------------------------------------------------------
def write_status_file(
    path: Path, event: ProgressEvent, started_at: float, extra: dict[str, Any] | None = None
) -> None:
    data = asdict(event)
    data.update(
        pid=os.getpid(),
        host=hostname(),
        started_at=started_at,
        updated_at=time.time(),
    )
    data.update(extra or {})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, redact(json.dumps(data)).encode(), fsync=False)
    except OSError as exc:
        log.debug("could not write %s: %s", path, exc)


def read_status_file(path: Path) -> dict[str, Any] | None:
    """Another process's status, or None if there is none or it is malformed (logged once)."""
    data = read_json(path)
    if data is None:
        return None
    problem = status_problem(data)
    if problem is not None:
        report_malformed(path, problem)
        return None
    return data


def status_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with a status file's fields, or None."""
    checks: dict[str, Callable[[Any], bool]] = {
        "model_id": lambda v: isinstance(v, str),
        "stage": lambda v: v in STAGES,
        "filename": lambda v: v is None or isinstance(v, str),
        "source": lambda v: v is None or isinstance(v, str),
        "message": lambda v: v is None or isinstance(v, str),
        "downloaded": lambda v: v is None or is_count(v),
        "total": lambda v: v is None or is_count(v),
        "bytes_per_s": lambda v: v is None or (is_number(v) and v >= 0),
        "stalled": lambda v: v is None or isinstance(v, bool),
        "pid": optional_pid,
        "host": lambda v: v is None or isinstance(v, str),
        "started_at": optional_time,
        "updated_at": optional_time,
    }
    for key, ok in checks.items():
        value = data.get(key)
        if not ok(value):
            return f"{key} is {value!r}"
    return None


def event_from_status(data: dict[str, Any]) -> ProgressEvent:
    fields = {k: data.get(k) for k in ProgressEvent.__dataclass_fields__}
    fields["downloaded"] = fields["downloaded"] or 0
    fields["bytes_per_s"] = fields["bytes_per_s"] or 0.0
    fields["stalled"] = bool(fields["stalled"])
    return ProgressEvent(**fields)


# the CLI's views -----------------------------------------------------------------------------
class TqdmProgress:
    """A tqdm bar driven by ProgressEvents (for terminals)."""

    def __init__(self, file: Any = None) -> None:
        self.file = file
        self.bar: Any = None

    def __call__(self, event: ProgressEvent) -> None:
        from tqdm import tqdm

        if event.stage == "downloading" and self.bar is None:
            self.bar = tqdm(
                total=event.total,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,  # tqdm labels kB/MB: keep the figures decimal to match
                desc=event.model_id,
                file=self.file,
                dynamic_ncols=True,
            )
        if self.bar is None:
            return
        if event.total and self.bar.total != event.total:
            self.bar.total = event.total
        self.bar.n = event.downloaded
        self.bar.set_postfix_str(
            "stalled" if event.stalled else (event.source or ""), refresh=False
        )
        self.bar.refresh()
        if event.stage in FINAL_STAGES:
            self.bar.close()
            self.bar = None


class LineProgress:
    """Quiet progress for pipes and logs: one line per stage and per 10%."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self.decile = -1
        self.stage: str | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage != self.stage:
            self.stage = event.stage
            if event.stage in ("failed", "interrupted"):
                pass  # the command prints the error (or "interrupted") once, in full
            elif event.stage != "downloading":
                self.write(
                    f"{event.model_id}: {event.stage}"
                    + (f" ({event.message})" if event.message else "")
                )
            else:
                self.write(f"{event.model_id}: downloading {event.filename} from {event.source}")
        fraction = event.fraction
        if event.stage == "downloading" and fraction is not None:
            decile = int(fraction * 10)
            if decile > self.decile:
                self.decile = decile
                rate = "stalled" if event.stalled else f"{_mib(int(event.bytes_per_s))}/s"
                self.write(
                    f"{event.model_id}: {decile * 10}% ({_mib(event.downloaded)} of "
                    f"{_mib(event.total or 0)}, {rate})"
                )


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"
