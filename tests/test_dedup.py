"""One download per model, whatever the crowd: threads, processes, hung holders, broken locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from gguf import make_gguf, sha256_hex
from world import FILENAME, MODEL_ID, World

from llmlb_node import ModelDownloadError, ProgressEvent
from llmlb_node.progress import read_status_file

MIB = 1024 * 1024

# A child process that resolves one id from N threads and prints what each thread got.
_CHILD = textwrap.dedent(
    """
    import json, sys, threading
    from llmlb_node import ModelResolver, Settings
    model_id, threads = sys.argv[1], int(sys.argv[2])
    if len(sys.argv) > 3 and sys.argv[3] == "nolock":
        # A filesystem where locks silently succeed for everyone (some NFS, Lustre).
        import filelock
        filelock.FileLock.acquire = lambda self, *a, **k: self
        filelock.FileLock.release = lambda self, *a, **k: None
    resolver = ModelResolver(Settings.from_env(retry_backoff=0.01))
    results = []
    def work():
        try:
            results.append(str(resolver.resolve(model_id).path))
        except Exception as exc:
            results.append("error: " + repr(exc))
    ts = [threading.Thread(target=work) for _ in range(threads)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    print(json.dumps(results))
    """
)


def _spawn(world: World, model_id: str, threads: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, model_id, str(threads), *extra],
        env={**os.environ, **world.env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _results(proc: subprocess.Popen) -> list[str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out)


def test_threads_share_one_download_and_one_result(world: World) -> None:
    world.hub.cdn.rate_limit(2 * MIB)  # slow enough that every thread arrives mid-download
    resolver = world.resolver()
    results: list[object] = []

    def work() -> None:
        results.append(resolver.resolve(MODEL_ID))

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(results) == 16
    assert len({id(r) for r in results if r.source != "local"}) <= 1  # the same object
    assert {str(r.path) for r in results} == {str(world.installed_path())}
    assert len([r for r in world.hub.cdn.requests if r.method == "GET"]) == 1


def test_threads_waiting_receive_the_same_exception(world: World) -> None:
    world.hub.refuse()
    world.proxy.fail_5xx(1000, status=503)
    resolver = world.resolver(max_retries=3, retry_backoff=0.1)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        try:
            resolver.resolve(MODEL_ID)
        except ModelDownloadError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(errors) == 8
    assert len({id(e) for e in errors}) < 8  # waiters got the owner's exception object
    assert len([r for r in world.proxy.requests if r.method == "GET"]) < 8 * 3


def test_waiting_threads_receive_progress_events(world: World) -> None:
    world.hub.cdn.rate_limit(1 * MIB)
    resolver = world.resolver()
    seen: dict[str, list[ProgressEvent]] = {"owner": [], "waiter": []}
    owner = threading.Thread(
        target=lambda: resolver.resolve(MODEL_ID, progress=seen["owner"].append)
    )
    owner.start()
    while not seen["owner"] or seen["owner"][-1].stage != "downloading":
        time.sleep(0.005)
    resolver.resolve(MODEL_ID, progress=seen["waiter"].append)
    owner.join()

    stages = [e.stage for e in seen["waiter"]]
    assert "downloading" in stages and stages[-1] == "installed"
    assert seen["waiter"][-1].downloaded == len(world.content)


def _resolve_in_turn(resolver: Any, names: tuple[str, ...]) -> dict[str, list[str]]:
    """Start one thread per model, each once the one before holds its slot (or waits for
    one); the stages each saw."""
    events: dict[str, list[str]] = {n: [] for n in names}
    threads = [
        threading.Thread(
            target=lambda n=n: resolver.resolve(
                n, progress=lambda e, n=n: events[n].append(e.stage)
            )
        )
        for n in events
    ]
    for (name, stages), t in zip(events.items(), threads, strict=True):
        t.start()
        deadline = time.monotonic() + 30
        while "downloading" not in stages and "waiting" not in stages:
            assert time.monotonic() < deadline, (name, stages)
            time.sleep(0.005)
    for t in threads:
        t.join()
    assert all(stages[-1] == "installed" for stages in events.values())
    return events


def test_different_models_download_concurrently_up_to_the_limit(world: World) -> None:
    for name in ("m1", "m2", "m3"):
        world.add_model(name, {f"{name}.gguf": make_gguf(400_000, seed=len(name))})
    world.hub.cdn.rate_limit(400_000)  # a second each: m1 and m2 still run when m3 asks

    events = _resolve_in_turn(world.resolver(max_concurrent_downloads=2), ("m1", "m2", "m3"))

    queued = [n for n, stages in events.items() if "waiting" in stages]
    assert queued == ["m3"]  # two ran at once, the third waited for a slot


def test_the_download_limit_is_the_settings_in_force(world: World) -> None:
    # A resolver with a limit of 1 downloads first; one made later with 3 is not held to it.
    for name in ("n0", "n1", "n2", "n3"):
        world.add_model(name, {f"{name}.gguf": make_gguf(400_000, seed=len(name) + 7)})
    world.resolver(max_concurrent_downloads=1).resolve("n0")
    world.hub.cdn.rate_limit(400_000)

    events = _resolve_in_turn(world.resolver(max_concurrent_downloads=3), ("n1", "n2", "n3"))

    assert not [n for n, stages in events.items() if "waiting" in stages], events


def test_four_processes_times_eight_threads_download_once(world: World) -> None:
    size = 4 * MIB
    content = make_gguf(size, seed=11)
    world.add_model("crowd", {"crowd.gguf": content})
    world.hub.cdn.rate_limit(8 * MIB)

    procs = [_spawn(world, "crowd", 8) for _ in range(4)]
    results = [path for p in procs for path in _results(p)]

    assert len(results) == 32 and len(set(results)) == 1
    assert not results[0].startswith("error")
    assert sha256_hex(Path(results[0]).read_bytes()) == sha256_hex(content)
    assert world.hub.cdn.bytes_sent <= size * 1.1


def test_waiting_process_reports_the_holders_progress(world: World) -> None:
    size = 4 * MIB
    world.add_model("shared", {"shared.gguf": make_gguf(size, seed=12)})
    world.hub.cdn.rate_limit(4 * MIB)
    holder = _spawn(world, "shared", 1)
    status_path = world.models_dir / ".llmlb" / "shared" / "status.json"
    deadline = time.monotonic() + 30
    while not status_path.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)

    events: list[ProgressEvent] = []
    resolver = world.resolver()
    status = resolver.status("shared")
    resolved = resolver.resolve("shared", progress=events.append)
    _results(holder)

    assert status.status in ("downloading", "waiting") and status.pid == holder.pid
    relayed = [e for e in events if e.stage == "downloading"]
    assert relayed and max(e.downloaded for e in relayed) > 0
    assert events[-1].stage == "installed"
    assert resolved.path.stat().st_size == size
    assert world.hub.cdn.bytes_sent <= size * 1.1


def _stopped_holder(world: World) -> subprocess.Popen:
    """A process downloading the model (slowly), SIGSTOPped once its first bytes are in."""
    world.hub.cdn.rate_limit(256 * 1024)
    holder = _spawn(world, MODEL_ID, 1)
    status_path = world.models_dir / ".llmlb" / MODEL_ID / "status.json"
    deadline = time.monotonic() + 30
    while not (status_path.exists() and json.loads(status_path.read_text())["downloaded"] > 0):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(holder.pid, signal.SIGSTOP)
    return holder


def test_a_stopped_lock_holder_is_never_taken_over(world: World) -> None:
    # The holder is alive but SIGSTOPped: its heartbeat stops. A waiter (the real command) that
    # took it over would rename its partial away and install it; on SIGCONT the holder would go
    # on writing into the installed file. The waiter reports it and gives up, typed, instead.
    holder = _stopped_holder(world)
    partials = sorted((world.models_dir / MODEL_ID).glob(".*.partial"))
    try:
        world.hub.cdn.rate_limit(None)
        start = time.monotonic()
        waiter = subprocess.run(
            [str(Path(sys.executable).with_name("llmlb-node")), "pull", MODEL_ID],
            env={**os.environ, **world.env(), "LLMLB_STALL_TIMEOUT": "0.5"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.monotonic() - start
        left = sorted((world.models_dir / MODEL_ID).glob(".*.partial"))
        installed = world.installed_path().exists()
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    _results(holder)  # continued, the holder finishes its own download

    assert waiter.returncode == 1, waiter.stderr
    assert f"held by pid {holder.pid}, no progress for" in waiter.stderr
    assert "never taken over" in waiter.stderr and "Traceback" not in waiter.stderr
    assert took < 60  # its own deadline: 4 stall windows of no progress; room for a loaded box
    assert left == partials and not installed  # nothing renamed, nothing installed under it
    assert sha256_hex(world.installed_path().read_bytes()) == world.sha256


def test_a_stopped_writers_partial_is_never_claimed(world: World) -> None:
    # No lock in the way (another store user, a crashed lock): the partial of a live, stopped
    # writer whose sidecar is long stale is left to it, however old its heartbeat.
    holder = _stopped_holder(world)
    try:
        store = world.resolver().store
        time.sleep(0.3)
        claimed = store.claim_partial(MODEL_ID, FILENAME, stale_after=0.1)
        theirs = [p for p in claimed.path.parent.glob(".*.partial") if p != claimed.path]
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    _results(holder)

    assert claimed.path.stat().st_size == 0 and len(theirs) == 1
    assert sha256_hex(world.installed_path().read_bytes()) == world.sha256


def test_a_holder_sleeping_on_retry_after_is_not_taken_over(world: World) -> None:
    # Holder A gets 429 Retry-After: 8 on its Hub metadata request and sleeps 8 s, as long as a
    # waiter's patience (LLMLB_STALL_TIMEOUT=2: 4 stall windows). Its heartbeat keeps it alive.
    world.hub.fail_5xx(1, status=429, retry_after=8, methods=("HEAD",))
    holder = _spawn(world, MODEL_ID, 1)
    deadline = time.monotonic() + 30
    while not any(r.status == 429 for r in world.hub.requests):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    waiter = _spawn(world, MODEL_ID, 1)
    status_path = world.models_dir / ".llmlb" / MODEL_ID / "status.json"
    writers = set()
    while holder.poll() is None or waiter.poll() is None:
        data = read_status_file(status_path)
        if data is not None:
            writers.add(data["pid"])
        time.sleep(0.05)

    results = _results(holder) + _results(waiter)
    assert results == [str(world.installed_path())] * 2
    assert writers == {holder.pid}  # the waiter only read the holder's status file
    gets = [r for r in world.hub.cdn.requests if r.method == "GET"]
    assert len(gets) == 1 and world.hub.cdn.bytes_sent == len(world.content)
    assert world.proxy.request_count == 0
    assert world.installed_path().read_bytes() == world.content


def test_a_status_naming_a_dead_pid_is_taken_over_at_once(world: World) -> None:
    # The lock is held by a process that wrote no status, and the status file left behind names
    # a pid that has exited: that holder is gone, whatever the file's age.
    lock_path = world.models_dir / ".llmlb" / MODEL_ID / "lock"
    lock_path.parent.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    status = {"model_id": MODEL_ID, "stage": "downloading", "pid": gone.pid}
    status.update(host=os.uname().nodename, updated_at=time.time() + 60)
    (lock_path.parent / "status.json").write_text(json.dumps(status))
    hold = (
        "import sys, time, filelock; l = filelock.FileLock(sys.argv[1]); l.acquire(); "
        "print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(lock_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        start = time.monotonic()
        resolved = world.resolver(stall_timeout=30).resolve(MODEL_ID)  # patience: 120 s
        took = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()

    assert resolved.path.read_bytes() == world.content
    assert took < 10


def test_without_working_locks_no_torn_or_doubled_file(world: World) -> None:
    size = 2 * MIB
    content = make_gguf(size, seed=13)
    world.add_model("nolock", {"nolock.gguf": content})
    world.hub.cdn.rate_limit(4 * MIB)

    procs = [_spawn(world, "nolock", 2, "nolock") for _ in range(3)]
    results = [path for p in procs for path in _results(p)]

    assert len(set(results)) == 1 and not results[0].startswith("error")
    final = Path(results[0])
    assert final.stat().st_size == size
    assert sha256_hex(final.read_bytes()) == sha256_hex(content)
    leftovers = [p.name for p in final.parent.iterdir() if p.name != final.name]
    assert leftovers == []


def test_status_reports_every_state(world: World) -> None:
    world.add_model("broken", {"broken.gguf": make_gguf(1000)}, on_hub=False, on_proxy=False)
    resolver = world.resolver()
    assert resolver.status(MODEL_ID).status == "missing"

    resolver.resolve(MODEL_ID)
    done = resolver.status(MODEL_ID)
    assert done.status == "completed" and done.progress == 1.0
    assert done.local_path == str(world.installed_path())

    manual = world.models_dir / "by-hand" / "model.gguf"
    manual.parent.mkdir(parents=True)
    manual.write_bytes(make_gguf(1000))
    assert resolver.status("by-hand").status == "local"

    with pytest.raises(ModelDownloadError):
        resolver.resolve("broken")
    failed = resolver.status("broken")
    assert failed.status == "error" and "broken" in failed.error_message

    listed = {s.model_id: s.status for s in resolver.status()}
    assert listed[MODEL_ID] == "completed" and listed["by-hand"] == "local"
    assert listed["broken"] == "error"
