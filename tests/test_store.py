"""The local store: layout, the stat-only fast path, atomic publishing and partial files.

Concurrency is tested with real processes: a live writer's pid, a SIGKILLed publisher, and
several processes racing to claim the same interrupted downloads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gguf import make_gguf, sha256_hex

from llmlb_node.catalog import ModelEntry, parse_catalog
from llmlb_node.errors import CatalogError, InvalidModelIdError
from llmlb_node.store import InstallRecord, ModelStore, Partial, pid_alive

DATA = make_gguf(4096, seed=5)


def _entry(model_id: str = "m", filename: str = "m.gguf", sha256: str | None = None) -> ModelEntry:
    raw: dict[str, Any] = {
        "id": model_id,
        "name": model_id,
        "repo": f"org/{model_id}",
        "recommended_filename": filename,
    }
    if sha256:
        raw["sha256"] = sha256
    return parse_catalog([raw]).get(model_id)


def _install(
    store: ModelStore,
    model_id: str = "m",
    filename: str = "m.gguf",
    data: bytes = DATA,
    **kwargs: Any,
) -> InstallRecord:
    tmp = store.new_partial(model_id, filename).path
    tmp.write_bytes(data)
    return store.publish(model_id, [(tmp, filename, len(data), sha256_hex(data))], "test", **kwargs)


def _partial(
    store: ModelStore,
    content: bytes,
    *,
    model_id: str = "m",
    filename: str = "m.gguf",
    pid: int | None = None,
    host: str | None = None,
    age: float = 0.0,
    **meta: Any,
) -> Partial:
    """An interrupted partial with its sidecar, as written by `pid` `age` seconds ago."""
    partial = store.new_partial(model_id, filename)
    partial.path.write_bytes(content)
    data: dict[str, Any] = {"filename": filename, "segments": [[0, 10_000, len(content)]]}
    data.update(meta)
    if pid is not None:
        data.update(pid=pid, host=host or socket.gethostname(), updated_at=time.time() - age)
    partial.meta_path.write_text(json.dumps(data))
    partial.meta = data
    return partial


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of a real process that stays alive for the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def dead_pid() -> int:
    """The pid of a real process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- layout --------------------------------------------------------------------------------
def test_layout_model_files_and_bookkeeping(store: ModelStore) -> None:
    record = _install(store, "m", "m.gguf")
    root = store.root

    assert store.model_dir("m") == root / "m"
    assert store.meta_dir("m") == root / ".llmlb" / "m"
    assert store.record_path("m") == root / ".llmlb" / "m" / "install.json"
    assert store.lock_path("m") == root / ".llmlb" / "m" / "lock"
    assert store.status_path("m") == root / ".llmlb" / "m" / "status.json"
    assert (root / "m" / "m.gguf").read_bytes() == DATA
    assert sorted(p.name for p in (root / "m").iterdir()) == ["m.gguf"]  # no leftovers

    on_disk = json.loads(store.record_path("m").read_text())
    assert on_disk["version"] == 1 and on_disk["model_id"] == "m" and on_disk["source"] == "test"
    assert on_disk["files"] == [
        {
            "filename": "m.gguf",
            "size": len(DATA),
            "sha256": sha256_hex(DATA),
            "mtime_ns": (root / "m" / "m.gguf").stat().st_mtime_ns,
        }
    ]
    assert InstallRecord.from_json(store.record_path("m").read_text()) == record


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", ".llmlb", "", "/abs"])
def test_layout_refuses_invalid_ids(store: ModelStore, bad: str) -> None:
    with pytest.raises(InvalidModelIdError):
        store.model_dir(bad)
    with pytest.raises(InvalidModelIdError):
        store.meta_dir(bad)


@pytest.mark.parametrize(
    "bad", ["../escape.gguf", "sub/../../escape.gguf", "/etc/passwd", "", ".", "sub/../.."]
)
def test_file_path_refuses_escapes(store: ModelStore, bad: str) -> None:
    with pytest.raises(CatalogError):
        store.file_path("m", bad)


def test_file_path_allows_subfolders(store: ModelStore) -> None:
    assert store.file_path("m", "sub/dir/f.gguf") == store.root / "m" / "sub" / "dir" / "f.gguf"
    record = _install(store, "m", "sub/f.gguf")
    assert (store.root / "m" / "sub" / "f.gguf").read_bytes() == DATA
    assert store.lookup("m") == record


# -- the fast path -------------------------------------------------------------------------
def test_lookup_returns_the_record_of_unchanged_files(store: ModelStore) -> None:
    record = _install(store)
    assert store.lookup("m") == record
    assert store.lookup("m", _entry()) == record
    assert store.lookup("m", _entry(sha256=sha256_hex(DATA))) == record


def test_lookup_of_nothing(store: ModelStore) -> None:
    assert store.lookup("m") is None
    assert store.read_record("m") is None


def test_lookup_detects_a_deleted_file(store: ModelStore) -> None:
    _install(store)
    (store.root / "m" / "m.gguf").unlink()
    assert store.lookup("m") is None


def test_lookup_detects_a_changed_size(store: ModelStore) -> None:
    _install(store)
    path = store.root / "m" / "m.gguf"
    st = path.stat()
    with open(path, "ab") as fh:
        fh.write(b"x")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime put back
    assert store.lookup("m") is None


def test_lookup_detects_a_changed_mtime(store: ModelStore) -> None:
    _install(store)
    path = store.root / "m" / "m.gguf"
    st = path.stat()
    # Same size, bytes rewritten in place: only the mtime tells.
    path.write_bytes(bytes(len(DATA)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000))
    assert path.stat().st_size == st.st_size
    assert store.lookup("m") is None


def test_lookup_refuses_a_record_that_does_not_match_the_entry(store: ModelStore) -> None:
    _install(store)
    assert store.lookup("m", _entry(sha256="0" * 64)) is None  # the catalog pins other bytes
    assert store.lookup("m", _entry(filename="other.gguf")) is None  # another main file
    assert store.lookup("m") is not None  # without the entry, the record stands


def test_lookup_of_a_corrupt_record(store: ModelStore) -> None:
    _install(store)
    for text in ("not json", "{}", '{"model_id": "m", "files": [{"filename": 3}]}', "[]"):
        store.record_path("m").write_text(text)
        assert store.lookup("m") is None


def test_lookup_is_record_and_stat_only(store: ModelStore) -> None:
    # A 1 GiB (sparse) file: hashing or reading it takes hundreds of milliseconds; a record and a
    # stat take well under one. The bound leaves room for a loaded machine.
    big = store.new_partial("big", "big.gguf").path
    with open(big, "wb") as fh:
        fh.write(b"GGUF")
        fh.truncate(1 << 30)
    store.publish("big", [(big, "big.gguf", 1 << 30, None)], "test")
    entry = _entry("big", "big.gguf")

    timings = []
    for _ in range(200):
        start = time.perf_counter()
        assert store.lookup("big", entry) is not None
        timings.append(time.perf_counter() - start)

    assert statistics.median(timings) < 0.02


# -- publishing ----------------------------------------------------------------------------
def test_publish_writes_the_record_before_the_rename(store: ModelStore) -> None:
    record = _install(store)
    final = store.root / "m" / "m.gguf"
    st = final.stat()

    # The rename kept the temporary file's mtime, which the record names...
    assert record.files[0].mtime_ns == st.st_mtime_ns
    assert record.files[0].size == st.st_size
    # ...and the record was in place before the rename changed the file's ctime.
    assert store.record_path("m").stat().st_mtime_ns <= st.st_ctime_ns


PUBLISH_LOOP = r"""
import os, sys
from llmlb_node.store import ModelStore
store = ModelStore(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    model_id = f"m{i}"
    partial = store.new_partial(model_id, "f.gguf")
    partial.path.write_bytes(b"GGUF" + os.urandom(8192))
    store.publish(model_id, [(partial.path, "f.gguf", 8196, None)], "loop")
    i += 1
"""


def test_publish_killed_at_any_moment_leaves_only_vouched_files(tmp_path: Path) -> None:
    rng = random.Random(1234)
    published = 0
    for round_ in range(5):
        root = tmp_path / f"round{round_}"
        proc = subprocess.Popen(
            [sys.executable, "-c", PUBLISH_LOOP, str(root)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0.05, 0.2))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        store = ModelStore(root)
        for model_dir in root.iterdir():
            if model_dir.name.startswith("."):
                continue
            if (model_dir / "f.gguf").exists():
                published += 1
                record = store.lookup(model_dir.name)
                assert record is not None, f"{model_dir.name}: a file no record vouches for"
                assert record.source == "loop"
    assert published > 5  # the loop really ran


def test_publish_keeps_earlier_files_and_orders_them(store: ModelStore) -> None:
    a, b = make_gguf(100, seed=1), make_gguf(200, seed=2)
    _install(store, "m", "b.gguf", b, order=["a.gguf", "b.gguf"])
    record = _install(store, "m", "a.gguf", a, order=["a.gguf", "b.gguf"])

    assert [f.filename for f in record.files] == ["a.gguf", "b.gguf"]
    assert [f.size for f in record.files] == [100, 200]
    assert store.lookup("m") == record


def test_publish_clears_leftover_partials_but_not_a_live_writers(
    store: ModelStore, live_pid: int, dead_pid: int
) -> None:
    stale = _partial(store, b"old bytes", pid=dead_pid)
    alive = _partial(store, b"being written", pid=live_pid)

    _install(store)

    assert not stale.path.exists() and not stale.meta_path.exists()
    assert alive.path.exists() and alive.meta_path.exists()


def test_verified_files_of_an_install_cut_short(store: ModelStore) -> None:
    files = [{"filename": "a.gguf"}, {"filename": "b.gguf"}]
    raw = {"id": "m", "name": "m", "repo": "o/m", "recommended_filename": "a.gguf"}
    entry = parse_catalog([{**raw, "files": files}]).get("m")
    _install(store, "m", "a.gguf")
    assert store.verified_files("m", entry) == {"a.gguf"}

    os.utime(store.root / "m" / "a.gguf", ns=(0, 0))
    assert store.verified_files("m", entry) == set()


# -- manual installs -----------------------------------------------------------------------
def test_adopt_manual_accepts_a_gguf_file(store: ModelStore) -> None:
    path = store.root / "hand" / "model.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(DATA)

    record = store.adopt_manual("hand")

    assert record is not None and record.source == "manual"
    (f,) = record.files
    assert (f.filename, f.size, f.sha256) == ("model.gguf", len(DATA), None)
    assert f.mtime_ns == path.stat().st_mtime_ns
    assert store.lookup("hand") == record  # recorded: the fast path finds it next time
    assert store.lookup("hand", _entry("hand", sha256="1" * 64)) == record


@pytest.mark.parametrize("content", [b"PK\x03\x04not a gguf", b"GGU", b"", b"gguf" + DATA])
def test_adopt_manual_rejects_other_bytes(store: ModelStore, content: bytes) -> None:
    path = store.root / "hand" / "model.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)

    assert store.adopt_manual("hand") is None
    assert store.read_record("hand") is None
    assert store.installed_ids() == []


def test_adopt_manual_without_a_file(store: ModelStore) -> None:
    assert store.adopt_manual("nothing") is None
    (store.root / "dir-only" / "model.gguf").mkdir(parents=True)
    assert store.adopt_manual("dir-only") is None


# -- partial files -------------------------------------------------------------------------
def test_claim_partial_starts_fresh_when_there_is_none(store: ModelStore) -> None:
    partial = store.claim_partial("m", "m.gguf", stale_after=60)

    assert partial.path.parent == store.root / "m"
    assert partial.path.name.startswith(".m.gguf.") and partial.path.name.endswith(".partial")
    assert partial.path.read_bytes() == b""
    assert partial.meta_path.parent == store.meta_dir("m") / "partials"
    # Marked as ours from the start: no other process can take it while we write.
    on_disk = json.loads(partial.meta_path.read_text())
    assert on_disk["filename"] == "m.gguf" and on_disk["pid"] == os.getpid()
    assert on_disk["host"] == socket.gethostname() and "segments" not in on_disk


def test_claim_partial_takes_the_most_advanced_accepted_one(
    store: ModelStore, dead_pid: int
) -> None:
    _partial(store, b"a" * 100, pid=dead_pid, validator="v1")
    _partial(store, b"b" * 500, pid=dead_pid, validator="other-bytes")
    best = _partial(store, b"c" * 300, pid=dead_pid, validator="v1")

    claimed = store.claim_partial(
        "m", "m.gguf", stale_after=60, accept=lambda meta: meta.get("validator") == "v1"
    )

    assert claimed.path.read_bytes() == b"c" * 300
    assert claimed.meta["segments"] == [[0, 10_000, 300]]
    assert claimed.meta["validator"] == "v1"
    assert not best.path.exists() and not best.meta_path.exists()  # renamed away: ours now
    on_disk = json.loads(claimed.meta_path.read_text())  # its progress, under our name
    assert on_disk["segments"] == [[0, 10_000, 300]] and on_disk["pid"] == os.getpid()
    # The partial that was not accepted stays for a source that can resume it.
    others = [p for p in (store.root / "m").glob(".m.gguf.*.partial") if p != claimed.path]
    assert sorted(p.read_bytes()[:1] for p in others) == [b"a", b"b"]
    assert store.partial_bytes("m", "m.gguf") == 500


def test_claim_partial_skips_a_live_writer(store: ModelStore, live_pid: int) -> None:
    busy = _partial(store, b"x" * 800, pid=live_pid)

    claimed = store.claim_partial("m", "m.gguf", stale_after=60)

    assert claimed.path != busy.path and claimed.path.read_bytes() == b""
    assert busy.path.read_bytes() == b"x" * 800 and busy.meta_path.exists()


def test_claim_partial_takes_over_a_dead_writer(store: ModelStore, dead_pid: int) -> None:
    assert not pid_alive(dead_pid)
    orphan = _partial(store, b"y" * 800, pid=dead_pid)

    claimed = store.claim_partial("m", "m.gguf", stale_after=60)

    assert claimed.path.read_bytes() == b"y" * 800
    assert not orphan.path.exists()


def test_claim_partial_never_takes_over_a_live_writer_gone_quiet(
    store: ModelStore, live_pid: int
) -> None:
    # Alive, but no progress for 2 minutes (SIGSTOPped?): continued, it would write on.
    held = _partial(store, b"z" * 800, pid=live_pid, age=120)

    claimed = store.claim_partial("m", "m.gguf", stale_after=60)

    assert claimed.path.read_bytes() == b"" and held.path.read_bytes() == b"z" * 800


def test_claim_partial_trusts_other_hosts_only_while_fresh(store: ModelStore) -> None:
    # A pid on another host cannot be checked: its sidecar's age decides.
    _partial(store, b"q" * 10, pid=1, host="elsewhere.example", age=1)
    assert store.claim_partial("m", "m.gguf", stale_after=60).path.read_bytes() == b""
    old = next(p for p in (store.root / "m").glob(".m.gguf.*.partial") if p.stat().st_size)
    inode = old.stat().st_ino
    claimed = store.claim_partial("m", "m.gguf", stale_after=0.5)
    assert claimed.path.read_bytes() == b"q" * 10
    # Copied into a file of our own: the other host's writer, if it lives on, writes elsewhere.
    assert claimed.path.stat().st_ino != inode and not old.exists()


def test_claim_partial_of_a_name_with_glob_characters(store: ModelStore, dead_pid: int) -> None:
    name = "m-[Q4_K_M]*.gguf"
    old = _partial(store, b"w" * 64, filename=name, pid=dead_pid)
    assert store.partial_bytes("m", name) == 64

    claimed = store.claim_partial("m", name, stale_after=60)
    assert claimed.path.read_bytes() == b"w" * 64 and not old.path.exists()

    claimed.path.write_bytes(DATA)
    leftover = _partial(store, b"v", filename=name, pid=dead_pid)
    store.publish("m", [(claimed.path, name, len(DATA), None)], "test")
    assert (store.root / "m" / name).read_bytes() == DATA
    assert not leftover.path.exists() and not leftover.meta_path.exists()


CLAIM = r"""
import json, os, sys, time
from llmlb_node.store import ModelStore
store = ModelStore(sys.argv[1])
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.0002)
partial = store.claim_partial("m", "m.gguf", stale_after=60.0)
print(json.dumps({"path": str(partial.path), "content": partial.path.read_text()}), flush=True)
# Stay alive (a live writer) until everyone has claimed: a dead writer's partial is fair game.
while not os.path.exists(sys.argv[2] + ".exit"):
    time.sleep(0.001)
"""


def test_concurrent_claims_never_share_a_partial(store: ModelStore, tmp_path: Path) -> None:
    contents = [f"partial-{i}" * (i + 1) for i in range(3)]
    for text in contents:
        _partial(store, text.encode())  # no pid: interrupted, free to take
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM, str(store.root), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        go.touch()  # every process is ready: they all race for the same three files
        results = [json.loads(proc.stdout.readline()) for proc in procs]  # type: ignore[union-attr]
        (tmp_path / "go.exit").touch()
        for proc in procs:
            proc.communicate(timeout=30)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()

    assert [proc.returncode for proc in procs] == [0] * len(procs)
    got = [r["content"] for r in results if r["content"]]
    assert sorted(got) == sorted(contents)  # each partial went to exactly one process
    paths = [r["path"] for r in results]
    assert len(set(paths)) == len(paths)
    for r in results:
        assert Path(r["path"]).read_text() == r["content"]


def test_partial_bytes_is_the_most_advanced_partial(store: ModelStore) -> None:
    assert store.partial_bytes("m", "m.gguf") == 0
    _partial(store, b"", segments=[[0, 100, 40], [100, 200, 150]])  # 40 + 50
    _partial(store, b"", segments=[[0, 200, 70]])
    assert store.partial_bytes("m", "m.gguf") == 90


def test_partial_save_records_the_writer(store: ModelStore) -> None:
    partial = store.new_partial("m", "m.gguf")
    partial.meta["segments"] = [[0, 10, 5]]
    partial.save()

    meta = json.loads(partial.meta_path.read_text())
    assert meta["pid"] == os.getpid() and meta["host"] == socket.gethostname()
    assert abs(meta["updated_at"] - time.time()) < 5 and meta["segments"] == [[0, 10, 5]]

    partial.discard()
    assert not partial.path.exists() and not partial.meta_path.exists()


# -- listing, removal, space ---------------------------------------------------------------
def test_remove_deletes_files_record_and_partials_but_keeps_the_lock(store: ModelStore) -> None:
    _install(store)
    leftover = _partial(store, b"partial")
    store.lock_path("m").touch()
    store.status_path("m").write_text("{}")

    assert store.remove("m") is True

    assert not (store.root / "m").exists()
    assert not store.record_path("m").exists() and not store.status_path("m").exists()
    assert not leftover.meta_path.exists() and not (store.meta_dir("m") / "partials").exists()
    assert store.lock_path("m").exists()
    assert store.lookup("m") is None
    assert store.remove("m") is False  # nothing left but the lock


def test_remove_of_partials_only_and_of_nothing(store: ModelStore) -> None:
    assert store.remove("never") is False
    _partial(store, b"half")
    assert store.remove("m") is True
    assert not (store.root / "m").exists()


def test_installed_ids(store: ModelStore) -> None:
    assert store.installed_ids() == []  # the store does not even exist yet
    _install(store, "b-model")
    _install(store, "a-model")
    manual = store.root / "by-hand" / "model.gguf"
    manual.parent.mkdir(parents=True)
    manual.write_bytes(DATA)
    _partial(store, b"half", model_id="half-done")
    broken = _install(store, "deleted")
    (store.root / "deleted" / broken.files[0].filename).unlink()
    # A hand-made directory whose name is not a valid id is not a model of ours.
    odd = store.root / "My Model" / "model.gguf"
    odd.parent.mkdir()
    odd.write_bytes(DATA)
    (store.root / "stray-file.txt").write_text("x")

    assert store.installed_ids() == ["a-model", "b-model", "by-hand"]


def test_free_bytes(store: ModelStore, tmp_path: Path) -> None:
    # The model directory does not exist yet: the nearest existing parent's filesystem counts.
    free = store.free_bytes("m")
    expected = shutil.disk_usage(tmp_path).free
    assert free > 0
    assert abs(free - expected) < 256 * 1024 * 1024
    _install(store)
    assert abs(store.free_bytes("m") - shutil.disk_usage(store.root / "m").free) < 256 * 1024**2


def test_pid_alive(live_pid: int, dead_pid: int) -> None:
    assert pid_alive(os.getpid()) and pid_alive(live_pid)
    assert not pid_alive(dead_pid)


# -- malformed bookkeeping: absent, logged once, never a crash -----------------------------
BAD_RECORDS = [
    {
        "model_id": "m",
        "files": [{"filename": "m.gguf", "size": "10", "sha256": None, "mtime_ns": 1}],
    },
    {"model_id": "m", "files": [{"filename": 7, "size": 10, "sha256": None, "mtime_ns": 1}]},
    {"model_id": "m", "files": [{"filename": "m.gguf", "size": 10, "mtime_ns": "x"}]},
    {"model_id": "m", "files": [{"filename": "m.gguf", "size": True, "mtime_ns": 1}]},
    {"model_id": "m", "files": [{"filename": "m.gguf", "size": -1, "mtime_ns": 1}]},
    {"model_id": "m", "files": [{"filename": "m.gguf", "size": 1, "mtime_ns": 1, "sha256": 5}]},
    {"model_id": "m", "files": [["m.gguf", 10]]},
    {"model_id": "m", "files": "m.gguf"},
    {"model_id": 3, "files": []},
    {"model_id": "m", "files": [], "installed_at": "x"},
    {"model_id": "m", "files": [], "source": ["x"]},
    ["not", "an", "object"],
]


@pytest.mark.parametrize("bad", BAD_RECORDS)
def test_a_malformed_record_is_absent_and_logged_once(
    store: ModelStore, bad: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _install(store)
    store.record_path("m").write_text(json.dumps(bad))

    for _ in range(3):
        assert store.read_record("m") is None
        assert store.lookup("m") is None
        assert store.verified_files("m", _entry()) == set()
    assert store.installed_ids() == []

    warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1 and str(store.record_path("m")) in warnings[0]
    _install(store)  # a new install replaces it
    assert store.lookup("m") is not None


BAD_SIDECARS = [
    {"segments": [[0]]},
    {"segments": [[0, 10, "5"]]},
    {"segments": [[0, 10, 11]]},  # done past the segment's end
    {"segments": [[5, 10, 2]]},  # done before its start
    {"segments": [[0, 100, 50]], "size": 10},  # past the file's size
    {"segments": "0-10"},
    {"segments": [[0, 10, 5]], "size": "10"},
    {"segments": [[0, 10, 5]], "updated_at": "x", "pid": 1, "host": "h"},
    {"segments": [[0, 10, 5]], "pid": "abc"},
    {"segments": [[0, 10, 5]], "validator": 5},
    {"segments": [[0, 10, True]]},
]


@pytest.mark.parametrize("bad", BAD_SIDECARS)
def test_a_malformed_sidecar_is_never_trusted(
    store: ModelStore, bad: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    odd = _partial(store, b"s" * 5)
    odd.meta_path.write_text(json.dumps({"filename": "m.gguf", **bad}))

    assert store.partial_bytes("m", "m.gguf") == 0
    claimed = store.claim_partial("m", "m.gguf", stale_after=60, accept=lambda m: bool(m))
    assert claimed.path.read_bytes() == b""  # not resumed from what the sidecar claims
    assert claimed.path != odd.path

    _install(store)  # publishing clears the partial nobody can vouch for
    assert not odd.path.exists() and not odd.meta_path.exists()
    warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1 and str(odd.meta_path) in warnings[0]


def test_a_sidecar_dated_in_the_future_does_not_hold_a_partial_forever(
    store: ModelStore, live_pid: int
) -> None:
    _partial(store, b"f" * 10, pid=live_pid, age=-10 * 365 * 86400)
    assert store.claim_partial("m", "m.gguf", stale_after=60).path.read_bytes() == b"f" * 10


def test_long_filenames_and_ids_keep_bookkeeping_names_short(store: ModelStore) -> None:
    model_id = "i" * 128
    filename = "f" * 195 + ".gguf"  # 200 characters
    _partial(store, b"half", model_id=model_id, filename=filename)
    partial = store.claim_partial(model_id, filename, stale_after=60)
    assert partial.path.read_bytes() == b"half"  # its sidecar was found again by name
    names = [p.name for p in store.root.rglob("*")]
    assert max(len(n.encode()) for n in names) < 255
    assert len(partial.meta_path.name) < 64

    _install(store, model_id, filename)
    assert store.lookup(model_id) is not None
    assert store.installed_ids() == [model_id]
    assert [p.name for p in store.model_dir(model_id).iterdir()] == [filename]  # partials gone
    assert store.remove(model_id) is True
    with pytest.raises(InvalidModelIdError):
        store.model_dir("i" * 129)


def test_remove_a_symlinked_model_directory(store: ModelStore, tmp_path: Path) -> None:
    elsewhere = tmp_path / "big-disk" / "m"
    elsewhere.mkdir(parents=True)
    (elsewhere / "model.gguf").write_bytes(DATA)
    store.root.mkdir(parents=True)
    (store.root / "m").symlink_to(elsewhere, target_is_directory=True)
    assert store.installed_ids() == ["m"]

    assert store.remove("m") is True

    assert not (store.root / "m").exists() and not (store.root / "m").is_symlink()
    assert (elsewhere / "model.gguf").read_bytes() == DATA  # the link goes, not its target
    assert store.installed_ids() == []
