"""Progress: throttled fan-out with real threads, stalls, the 10% log lines, status files, views."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmlb_node.progress import (
    MAX_EVENTS_PER_S,
    STALL_AFTER_S,
    LineProgress,
    Monitor,
    ProgressEvent,
    TqdmProgress,
    event_from_status,
    read_status_file,
    write_status_file,
)

MIB = 1024 * 1024


class Recorder:
    """A subscriber that keeps every event with its arrival time (thread-safe)."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []
        self.times: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, event: ProgressEvent) -> None:
        with self.lock:
            self.events.append(event)
            self.times.append(time.monotonic())

    @property
    def stages(self) -> list[str]:
        return [e.stage for e in self.events]

    def wait_for(self, predicate, timeout: float) -> ProgressEvent:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for event in self.events:
                    if predicate(event):
                        return event
            time.sleep(0.01)
        raise AssertionError(f"no matching event within {timeout}s: {self.events[-3:]}")


def _pump(monitor: Monitor, seconds: float, chunk: int = 4096, total: int | None = None) -> int:
    """Feed bytes as fast as possible from another thread for `seconds`; return bytes fed."""
    fed = [0]

    def run() -> None:
        end = time.monotonic() + seconds
        done = 0
        while time.monotonic() < end:
            done += chunk
            monitor.bytes(done, total)
        fed[0] = done

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return fed[0]


# -- throttling and delivery ---------------------------------------------------------------
def test_events_are_throttled_while_bytes_flow_fast() -> None:
    monitor = Monitor("m")
    a, b = Recorder(), Recorder()
    monitor.subscribe(a)
    monitor.subscribe(b)
    monitor.file_started("m.gguf", "src", 10**12)

    fed = _pump(monitor, 1.0)
    monitor.stage("verifying")
    monitor.stage("installed")

    assert fed > 100_000  # thousands of byte callbacks went by
    for rec in (a, b):
        byte_times = [
            t
            for t, e in zip(rec.times, rec.events, strict=True)
            if e.stage == "downloading" and e.downloaded
        ]
        assert 5 <= len(byte_times) <= MAX_EVENTS_PER_S + 2
        gaps = [t1 - t0 for t0, t1 in zip(byte_times, byte_times[1:], strict=False)]
        assert min(gaps) >= 1.0 / MAX_EVENTS_PER_S - 0.005
        assert rec.stages[0] == "resolving" and rec.stages[-2:] == ["verifying", "installed"]
        assert rec.events[-1].downloaded == monitor.event.downloaded


def test_stage_changes_are_always_delivered() -> None:
    monitor = Monitor("m")
    rec = Recorder()
    monitor.subscribe(rec)
    # All within microseconds: the throttle must not swallow any stage.
    monitor.stage("waiting", message="queued")
    monitor.stage("resolving", source="hub")
    monitor.file_started("m.gguf", "hub", 100)
    monitor.bytes(50, 100)
    monitor.stage("verifying")
    monitor.stage("failed", message="boom")

    changes = [s for i, s in enumerate(rec.stages) if i == 0 or s != rec.stages[i - 1]]
    assert changes == ["resolving", "waiting", "resolving", "downloading", "verifying", "failed"]
    assert rec.events[1].message == "queued" and rec.events[-1].message == "boom"


def test_the_last_event_is_always_delivered() -> None:
    monitor = Monitor("m")
    rec = Recorder()
    monitor.subscribe(rec)
    monitor.file_started("m.gguf", "src", 1000)
    for done in range(0, 1001, 10):
        monitor.bytes(done, 1000)  # all inside one throttle window
    monitor.stage("installed", downloaded=1000, message="/x/m.gguf")

    last = rec.events[-1]
    assert last.stage == "installed" and last.downloaded == 1000 and last.message == "/x/m.gguf"
    # Of the 101 byte updates inside one throttle window, at most one per 10% step got through.
    deciles = [int(e.fraction * 10) for e in rec.events if e.stage == "downloading" and e.fraction]
    assert len(deciles) <= 10 and deciles == sorted(set(deciles))


def test_every_ten_percent_step_reaches_every_subscriber() -> None:
    monitor = Monitor("m")
    a, b = Recorder(), Recorder()
    monitor.subscribe(a)
    monitor.subscribe(b)
    monitor.file_started("m.gguf", "src", 1000)
    for done in range(0, 1001, 5):  # 201 updates in well under 0.1 s
        monitor.bytes(done, 1000)

    for rec in (a, b):
        steps = {int(e.fraction * 10) for e in rec.events if e.stage == "downloading"}
        assert steps == set(range(11))


def test_nothing_follows_the_final_event() -> None:
    # A byte update that races the final stage on another thread must not arrive after it.
    monitor = Monitor("m")
    monitor.file_started("m.gguf", "src", 1000)
    entered, release = threading.Event(), threading.Event()

    def slow(event: ProgressEvent) -> None:
        if event.stage == "downloading" and event.downloaded == 500:
            entered.set()
            release.wait(5)

    rec = Recorder()
    monitor.subscribe(slow)
    monitor.subscribe(rec)
    time.sleep(0.12)  # past the throttle window: the next byte update is due
    worker = threading.Thread(target=monitor.bytes, args=(500, 1000))
    worker.start()
    assert entered.wait(5)  # the worker is delivering the byte update, `rec` is next
    monitor.stage("installed", downloaded=1000)
    release.set()
    worker.join()

    assert rec.stages[-1] == "installed"
    assert rec.stages.count("installed") == 1


def test_subscriber_joining_mid_download_gets_the_current_state_at_once() -> None:
    monitor = Monitor("m")
    monitor.file_started("m.gguf", "src", 1000)
    monitor.bytes(300, 1000)
    monitor.bytes(600, 1000)

    rec = Recorder()
    monitor.subscribe(rec)  # synchronously, before any new byte

    assert len(rec.events) == 1
    now = rec.events[0]
    assert (now.stage, now.downloaded, now.total, now.source) == ("downloading", 600, 1000, "src")
    assert now.fraction == pytest.approx(0.6)
    monitor.subscribe(None)  # no callback: nothing to do


def test_a_raising_callback_does_not_break_delivery(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="llmlb_node.progress")
    monitor = Monitor("m")

    def broken(event: ProgressEvent) -> None:
        raise RuntimeError("callback bug")

    before, after = Recorder(), Recorder()
    monitor.subscribe(before)
    monitor.subscribe(broken)
    monitor.subscribe(after)
    monitor.file_started("m.gguf", "src", 10)
    monitor.bytes(10, 10)
    monitor.stage("installed")

    assert after.events == before.events  # the subscriber after the broken one missed nothing
    assert after.stages[0] == "resolving" and after.stages[-1] == "installed"
    assert "downloading" in after.stages
    assert any("callback bug" in (r.exc_text or "") for r in caplog.records)
    assert any("progress callback" in r.getMessage() for r in caplog.records)


# -- rates and stalls ----------------------------------------------------------------------
def test_bytes_per_s_follows_the_real_rate() -> None:
    monitor = Monitor("m")
    monitor.file_started("m.gguf", "src", None)
    chunk = 64 * 1024
    done = chunk
    monitor.bytes(done, None)
    # Timed from the first report, as the monitor is: a pause of a loaded machine before it
    # would otherwise count in one figure and not the other.
    start = time.monotonic()
    while time.monotonic() - start < 0.6:
        time.sleep(0.005)
        done += chunk
        monitor.bytes(done, None)
    actual = (done - chunk) / (time.monotonic() - start)

    rate = monitor.event.bytes_per_s
    assert 0.6 * actual < rate < 1.5 * actual, (rate, actual)
    assert monitor.event.total is None and monitor.event.fraction is None
    assert not monitor.event.stalled


def test_silence_for_more_than_two_seconds_is_reported_as_a_stall() -> None:
    monitor = Monitor("m")
    rec = Recorder()
    monitor.subscribe(rec)
    monitor.file_started("m.gguf", "src", 10 * MIB)
    _pump(monitor, 0.2, chunk=64 * 1024)
    last_byte = time.monotonic()
    assert monitor.event.bytes_per_s > 0

    stalled = rec.wait_for(lambda e: e.stalled, timeout=STALL_AFTER_S + 2)
    seen_at = rec.times[rec.events.index(stalled)]

    assert stalled.bytes_per_s == 0.0 and stalled.stage == "downloading"
    assert seen_at - last_byte >= STALL_AFTER_S - 0.05
    assert not any(e.stalled for e in rec.events[: rec.events.index(stalled)])

    time.sleep(0.11)
    monitor.bytes(monitor.event.downloaded + 1, None)  # bytes again: no longer stalled
    assert not rec.events[-1].stalled and not monitor.event.stalled
    monitor.stage("installed")
    assert rec.events[-1].stage == "installed" and not rec.events[-1].stalled


# -- totals across files ---------------------------------------------------------------------
def test_totals_cover_every_file_of_the_model() -> None:
    monitor = Monitor("m")
    monitor.file_started("a.gguf", "src", 600, rest=400)
    monitor.bytes(600, 600)
    assert (monitor.event.downloaded, monitor.event.total) == (600, 1000)
    monitor.file_done(600)
    monitor.file_started("b.gguf", "src", 400)
    monitor.bytes(200, 400)

    event = monitor.event
    assert (event.filename, event.downloaded, event.total) == ("b.gguf", 800, 1000)
    assert event.fraction == pytest.approx(0.8)


def test_relay_forwards_another_process_s_event_as_ours() -> None:
    monitor = Monitor("local-id")
    rec = Recorder()
    monitor.subscribe(rec)
    other = ProgressEvent("other-id", "f.gguf", "proxy", "downloading", 50, 100, 10.0)

    monitor.relay(other)

    assert rec.events[-1] == dataclasses.replace(other, model_id="local-id")


# -- the 10% log lines -------------------------------------------------------------------------
def test_a_download_logs_one_info_line_per_ten_percent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llmlb_node.progress")
    monitor = Monitor("tiny")
    monitor.file_started("tiny.gguf", "huggingface:org/tiny", 1000)
    for done in range(0, 1001, 25):
        monitor.bytes(done, 1000)
    monitor.stage("verifying")
    monitor.stage("installed")

    lines = [r.getMessage() for r in caplog.records if r.name == "llmlb_node.progress"]
    assert [line.split(": ")[1].split("%")[0] for line in lines] == [
        str(p) for p in range(0, 101, 10)
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records)
    assert lines[5].startswith("tiny: 50% (0.0 MiB of 0.0 MiB) from huggingface:org/tiny at ")


def test_no_log_line_without_a_known_total(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llmlb_node.progress")
    monitor = Monitor("m")
    monitor.file_started("m.gguf", "src", None)
    monitor.bytes(5000, None)
    assert [r for r in caplog.records if r.name == "llmlb_node.progress"] == []


# -- status files --------------------------------------------------------------------------
def test_status_file_is_written_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "meta" / "status.json"
    monitor = Monitor("m", path)
    monitor.hold_status(heartbeat=60)
    monitor.file_started("m.gguf", "src", 1000)

    data = read_status_file(path)
    assert data is not None
    assert data["stage"] == "downloading" and data["total"] == 1000
    assert data["pid"] > 0 and data["started_at"] == monitor.started_at
    assert event_from_status(data) == monitor.event

    monitor.stage("installed", downloaded=1000, message="/models/m/m.gguf")
    back = event_from_status(read_status_file(path) or {})
    assert back == monitor.event and back.stage == "installed"


def test_only_the_holder_writes_and_it_heartbeats_while_idle(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    waiter = Monitor("m", path)
    waiter.stage("waiting", message="pid 1 is downloading it")
    waiter.relay(ProgressEvent("m", "m.gguf", "src", "downloading", 10, 100))
    assert not path.exists()  # a waiter keeps its view in memory

    holder = Monitor("m", path)
    holder.hold_status(heartbeat=0.05)
    holder.stage("resolving")  # then nothing happens (a Retry-After sleep, say)
    first = (read_status_file(path) or {})["updated_at"]
    deadline = time.monotonic() + 30  # beats every 0.05 s; a loaded machine may delay a few
    while (beat := read_status_file(path) or {})["updated_at"] <= first:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.01)
    assert beat["stage"] == "resolving"

    holder.stage("installed", message="/models/m/m.gguf")
    holder.release_status()
    holder.stage("failed")  # after releasing, nothing more is written
    time.sleep(0.1)
    assert (read_status_file(path) or {})["stage"] == "installed"


def test_status_file_reading_tolerates_garbage(tmp_path: Path) -> None:
    assert read_status_file(tmp_path / "absent.json") is None
    (tmp_path / "bad.json").write_text("{nope")
    assert read_status_file(tmp_path / "bad.json") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_status_file(tmp_path / "list.json") is None
    sparse = event_from_status({"model_id": "m", "stage": "waiting"})
    assert (sparse.downloaded, sparse.bytes_per_s, sparse.stalled) == (0, 0.0, False)


@pytest.mark.parametrize(
    "bad",
    [
        {"total": "10"},
        {"updated_at": "x"},
        {"updated_at": time.time() + 86400},  # "fresh" for a day: would keep waiters waiting
        {"downloaded": -1},
        {"stage": "exploding"},
        {"pid": "123"},
        {"stalled": "no"},
        {"bytes_per_s": float("nan")},
        {"model_id": None},
    ],
)
def test_a_malformed_status_file_is_absent(
    tmp_path: Path, bad: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "status.json"
    good = {"model_id": "m", "stage": "downloading", "downloaded": 5, "total": 10, "pid": 1}
    path.write_text(json.dumps(good))
    assert read_status_file(path) == good
    path.write_text(json.dumps({**good, **bad}))
    assert read_status_file(path) is None
    assert read_status_file(path) is None
    warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0]


def test_write_status_file_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_status_file(path, ProgressEvent("m", None, None, "waiting"), 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


WRITER = r"""
import sys, time
from pathlib import Path
from llmlb_node.progress import Monitor
monitor = Monitor("tiny", Path(sys.argv[1]))
monitor.hold_status(heartbeat=60)
monitor.file_started("tiny.gguf", "huggingface:org/tiny", 1000)
time.sleep(0.3)  # status files are rewritten at most every 0.25 s
monitor.bytes(400, 1000)
print("written", flush=True)
sys.stdin.readline()
monitor.stage("installed", downloaded=1000, message="/models/tiny/tiny.gguf")
print("done", flush=True)
"""


def test_status_file_crosses_processes(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "written\n"
        data = read_status_file(path)
        assert data is not None and data["pid"] == proc.pid
        event = event_from_status(data)
        assert (event.model_id, event.stage, event.downloaded, event.total) == (
            "tiny",
            "downloading",
            400,
            1000,
        )
        assert event.source == "huggingface:org/tiny" and event.fraction == pytest.approx(0.4)

        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "done\n"
        final = event_from_status(read_status_file(path) or {})
        assert final.stage == "installed" and final.message == "/models/tiny/tiny.gguf"
    finally:
        proc.kill()
        proc.wait()


# -- the event itself ------------------------------------------------------------------------
def test_progress_event_is_frozen() -> None:
    event = ProgressEvent("m", "f", "src", "downloading", 10, 40)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.downloaded = 20  # type: ignore[misc]
    assert event.fraction == 0.25
    assert ProgressEvent("m", "f", "s", "downloading", 10, None).fraction is None
    assert ProgressEvent("m", "f", "s", "downloading", 50, 40).fraction == 1.0
    assert hash(event) == hash(dataclasses.replace(event))


# -- the CLI's views -----------------------------------------------------------------------
def _downloading(done: int, total: int | None = 1000, **kw: object) -> ProgressEvent:
    return ProgressEvent("tiny", "tiny.gguf", "hub", "downloading", done, total, 2 * MIB, **kw)


def test_tqdm_progress_renders_a_bar() -> None:
    out = io.StringIO()
    view = TqdmProgress(file=out)
    view(ProgressEvent("tiny", None, None, "resolving"))
    assert view.bar is None and out.getvalue() == ""  # no bar before bytes flow

    for done in (0, 250, 500, 1000):
        view(_downloading(done))
    view(ProgressEvent("tiny", "tiny.gguf", "hub", "installed", 1000, 1000))

    text = out.getvalue()
    assert "%|" in text and "tiny" in text and "100%" in text and "hub" in text
    assert view.bar is None  # closed on the final event


def test_tqdm_progress_without_a_total_shows_a_rate() -> None:
    out = io.StringIO()
    view = TqdmProgress(file=out)
    view(_downloading(4096, None))
    view(_downloading(8192, None, stalled=True))
    view(ProgressEvent("tiny", "tiny.gguf", "hub", "failed", 8192, None, message="x"))
    text = out.getvalue()
    assert "B/s" in text and "stalled" in text
    assert view.bar is None


def test_line_progress_writes_one_line_per_ten_percent_and_per_stage() -> None:
    lines: list[str] = []
    view = LineProgress(lines.append)
    view(ProgressEvent("tiny", None, None, "resolving"))
    view(ProgressEvent("tiny", "tiny.gguf", "hub", "resolving"))  # same stage: no line
    for done in range(0, 1001, 10):  # 101 events
        view(_downloading(done))
    view(ProgressEvent("tiny", "tiny.gguf", "hub", "verifying"))
    view(ProgressEvent("tiny", "tiny.gguf", "hub", "installed", 1000, 1000, message="/p"))

    assert lines[0] == "tiny: resolving"
    assert lines[1] == "tiny: downloading tiny.gguf from hub"
    percent = lines[2:-2]
    assert [line.split(": ")[1].split("%")[0] for line in percent] == [
        str(p) for p in range(0, 101, 10)
    ]
    assert percent[5] == "tiny: 50% (0.0 MiB of 0.0 MiB, 2.0 MiB/s)"
    assert lines[-2:] == ["tiny: verifying", "tiny: installed (/p)"]


def test_line_progress_marks_a_stall() -> None:
    lines: list[str] = []
    view = LineProgress(lines.append)
    view(_downloading(0))
    view(_downloading(300, stalled=True))
    assert lines[-1] == "tiny: 30% (0.0 MiB of 0.0 MiB, stalled)"
