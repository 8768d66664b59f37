"""Servers that lie: every installed byte is proven, and every retry is bounded.

Each case is a real loopback server (tests/servers.py `ScriptedServer`) that behaves exactly as
described, against the real `llmlb-node` command or the library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gguf import make_gguf, sha256_hex
from servers import RecordedRequest, Reply, ScriptedServer, honest_reply
from world import World

from llmlb_node import ModelDownloadError

LLMLB_NODE = Path(sys.executable).with_name("llmlb-node")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(LLMLB_NODE), *args], env=dict(os.environ), capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _as_proxy(world: World, server: ScriptedServer, model_id: str, filename: str, **extra: Any):
    """`model_id` served only by `server` standing in for the llmlb proxy (the Hub refuses)."""
    world.monkeypatch.setenv("LLMLB_URL", server.url)
    return _entry(world, model_id, filename, sources=[], **extra)


def _as_url(world: World, server: ScriptedServer, model_id: str, filename: str, **extra: Any):
    """`model_id` served only by `server` as a `url` source; no proxy step."""
    world.monkeypatch.delenv("LLMLB_URL", raising=False)
    source = {"type": "url", "url": f"{server.url}/{filename}"}
    return _entry(world, model_id, filename, sources=[source], **extra)


def _entry(world: World, model_id: str, filename: str, **fields: Any) -> dict[str, Any]:
    entry = world.add_model(model_id, {filename: b""}, on_hub=False, on_proxy=False)
    entry.update(fields)
    world.write_catalog()
    return entry


def _gets(server: ScriptedServer) -> list[RecordedRequest]:
    return [r for r in server.requests if r.method == "GET"]


def _nothing_installed(world: World, model_id: str) -> bool:
    model_dir = world.models_dir / model_id
    return not model_dir.exists() or not [p for p in model_dir.iterdir() if p.suffix == ".gguf"]


# -- 1. a truncated body without Content-Length ------------------------------------------------
def test_truncated_body_without_content_length_is_never_installed(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = make_gguf(262_144, seed=11)
    proxy = serve(
        lambda rec: Reply(200, {"Content-Type": "application/octet-stream"}, content[:100_000])
    )
    _as_proxy(world, proxy, "cut", "cut.gguf", size_bytes=262_144)  # approximate, no sha256

    done = cli("pull", "cut")

    assert done.returncode == 5, done.stderr
    assert "llmlb-proxy" in done.stderr and "truncated" in done.stderr
    assert "262144" in done.stderr and "100000" in done.stderr  # declared and actual sizes
    assert _nothing_installed(world, "cut")
    assert cli("path", "cut").returncode == 1


# -- 2. sizes that disagree ---------------------------------------------------------------------
def _exact(filename: str, size: int) -> dict[str, Any]:
    return {"files": [{"filename": filename, "size_bytes": size}]}


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda c, rec: honest_reply(c, rec), id="200-or-206-truthful-about-8192"),
        pytest.param(
            lambda c, rec: Reply(200, {"Content-Length": str(len(c))}, c), id="200-ignoring-range"
        ),
        pytest.param(
            lambda c, rec: Reply(
                206, {"Content-Range": f"bytes 0-4095/{len(c)}", "Content-Length": "4096"}, c[:4096]
            ),
            id="206-first-4096-of-8192",
        ),
        pytest.param(lambda c, rec: Reply(200, {}, c), id="200-no-length-8192-bytes"),
    ],
)
def test_a_server_disagreeing_with_the_exact_size_is_an_integrity_error(
    world: World, serve: Callable[..., ScriptedServer], answer: Callable[..., Reply]
) -> None:
    content = make_gguf(8192, seed=12)
    server = serve(lambda rec: answer(content, rec))
    _as_url(world, server, "sized", "sized.gguf", **_exact("sized.gguf", 4096))

    done = cli("pull", "sized")

    assert done.returncode == 5, done.stderr
    assert "[integrity]" in done.stderr and "4096" in done.stderr
    assert _nothing_installed(world, "sized")


def test_hub_size_disagreeing_with_the_catalog_is_an_integrity_error(world: World) -> None:
    content = make_gguf(8192, seed=13)
    entry = world.add_model("hubsized", {"hubsized.gguf": content}, on_proxy=False)
    entry.update(_exact("hubsized.gguf", 4096))
    world.write_catalog()
    world.monkeypatch.delenv("LLMLB_URL")

    done = cli("pull", "hubsized")

    assert done.returncode == 5, done.stderr
    assert "8192" in done.stderr and "4096" in done.stderr
    assert world.hub.cdn.bytes_sent == 0  # refused before any byte of the file
    assert _nothing_installed(world, "hubsized")


def test_content_length_disagreeing_with_content_range_is_an_integrity_error(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = make_gguf(8192, seed=14)

    def answer(rec: RecordedRequest) -> Reply:
        reply = honest_reply(content, rec)
        if reply.status == 206:
            reply.headers["Content-Length"] = str(int(reply.headers["Content-Length"]) + 10)
            reply.body += b"\0" * 10
        return reply

    server = serve(answer)
    _as_url(world, server, "cl", "cl.gguf")

    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("cl")
    assert info.value.failures[0].kind == "integrity"
    assert _nothing_installed(world, "cl")


# -- 3. resume against a changed file -----------------------------------------------------------
@pytest.mark.parametrize("new_size", [81_920, 65_536], ids=["bigger", "same-size"])
def test_resume_against_a_changed_file_never_splices(
    world: World, serve: Callable[..., ScriptedServer], new_size: int
) -> None:
    a, b = make_gguf(65_536, seed=21), make_gguf(new_size, seed=22)
    served: list[bytes] = []

    def answer(rec: RecordedRequest) -> Reply:
        if not served:  # the first answer: file A, dropped at 32 KiB
            served.append(a)
            reply = honest_reply(a, rec)
            reply.cut = 32 * 1024
            return reply
        return honest_reply(b, rec)  # from now on: file B, no ETag either

    proxy = serve(answer)
    _as_proxy(world, proxy, "changed", "changed.gguf", size_bytes=65_536)

    resolved = world.resolver().resolve("changed")

    data = resolved.path.read_bytes()
    assert data == b  # fetched whole from B: never A[:32K] + B[32K:]
    gets = _gets(proxy)
    resume = gets[1].headers["range"]
    assert resume.startswith("bytes=0-"), resume  # asked from before the held end, to compare


def test_resume_with_a_matching_overlap_continues(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = make_gguf(300_000, seed=23)
    first = [True]

    def answer(rec: RecordedRequest) -> Reply:
        reply = honest_reply(content, rec)
        if first[0]:
            first[0] = False
            reply.cut = 200_000
        return reply

    proxy = serve(answer)
    _as_proxy(world, proxy, "same", "same.gguf", size_bytes=300_000)

    resolved = world.resolver().resolve("same")

    assert resolved.path.read_bytes() == content
    gets = _gets(proxy)
    assert len(gets) == 2
    assert gets[1].headers["range"] == f"bytes={200_000 - 64 * 1024}-299999"
    assert proxy.bytes_sent == 300_000 + 64 * 1024


# -- 7. bounded retries -------------------------------------------------------------------------
def test_a_server_that_always_drops_at_the_same_byte_fails_in_bounded_time(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = make_gguf(1_000_000, seed=31)
    # Ignores Range, announces the whole file, and drops at the same byte every time.
    server = serve(
        lambda rec: Reply(200, {"Content-Length": str(len(content))}, content, cut=300_000)
    )
    _as_url(world, server, "loop", "loop.gguf")

    start = time.monotonic()
    done = cli("pull", "loop")  # default settings
    elapsed = time.monotonic() - start

    assert done.returncode == 4, done.stderr
    assert "[network]" in done.stderr and "after 5 attempts" in done.stderr
    assert len(_gets(server)) == 5
    assert elapsed < 30


def test_a_clean_early_end_without_progress_is_bounded_too(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = make_gguf(100_000, seed=32)

    def answer(rec: RecordedRequest) -> Reply:
        reply = honest_reply(content, rec)
        reply.headers.pop("Content-Length")  # no length: the close looks like a clean end
        reply.cut = 10
        return reply

    server = serve(answer)
    _as_url(world, server, "short", "short.gguf", **_exact("short.gguf", 100_000))

    with pytest.raises(ModelDownloadError) as info:
        world.resolver(max_retries=4).resolve("short")

    assert info.value.failures[0].kind == "network"
    assert len(_gets(server)) <= 5


def test_retry_count_resets_only_past_the_furthest_byte(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = make_gguf(1_000_000, seed=33)
    count = [0]

    def answer(rec: RecordedRequest) -> Reply:
        # Every answer drops 100 KB further than the last: progress each time, so it finishes.
        count[0] += 1
        reply = honest_reply(content, rec)
        reply.cut = 100_000 if count[0] < 20 else None
        return reply

    server = serve(answer)
    _as_url(world, server, "creep", "creep.gguf")

    resolved = world.resolver(max_retries=2).resolve("creep")

    assert resolved.path.read_bytes() == content


# -- 8. timeouts and unusable URLs ----------------------------------------------------------------
@pytest.fixture
def unaccepting() -> Iterator[str]:
    """A loopback port whose listen queue is full: connecting hangs until the client gives up."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_a_connect_timeout_is_reported_as_timeout(world: World, unaccepting: str) -> None:
    world.monkeypatch.delenv("LLMLB_URL")
    world.add_model(
        "slowconnect",
        {"s.gguf": b""},
        on_hub=False,
        on_proxy=False,
        sources=[{"type": "url", "url": f"{unaccepting}/s.gguf"}],
    )
    with pytest.raises(ModelDownloadError) as info:
        world.resolver(connect_timeout=0.2, max_retries=2).resolve("slowconnect")
    failure = info.value.failures[0]
    assert failure.kind == "timeout", failure


@pytest.mark.parametrize("url", ["mirror.example.org/x.gguf", "file:///etc/passwd", "ftp://h/x"])
def test_a_url_without_http_scheme_is_a_catalog_error(world: World, url: str) -> None:
    world.add_model(
        "badurl",
        {"x.gguf": b""},
        on_hub=False,
        on_proxy=False,
        sources=[{"type": "url", "url": url}],
    )
    start = time.monotonic()
    done = cli("pull", "badurl")
    assert done.returncode == 1, done.stderr
    assert "badurl" in done.stderr and "http" in done.stderr
    assert time.monotonic() - start < 30  # no retries (a loaded machine starts Python slowly)
    assert world.proxy.request_count == 0 and world.hub.total_requests() == 0


# -- 4. a damaged install -----------------------------------------------------------------------
def test_a_damaged_install_with_a_sha256_is_reported_and_pull_repairs_it(world: World) -> None:
    content = make_gguf(50_000, seed=41)
    entry = world.add_model("conv", {"model.gguf": content})
    entry["files"] = [{"filename": "model.gguf", "sha256": sha256_hex(content)}]
    world.write_catalog()
    assert cli("pull", "conv").returncode == 0
    installed = world.models_dir / "conv" / "model.gguf"
    with open(installed, "r+b") as fh:
        fh.truncate(1000)

    path = cli("path", "conv")
    status = cli("status", "conv", "--json")
    assert path.returncode == 1 and "damaged" in path.stderr, path.stderr
    report = json.loads(status.stdout)
    assert report["status"] in ("error", "missing") and "damaged" in report["error_message"]

    repaired = cli("pull", "conv")
    assert repaired.returncode == 0, repaired.stderr
    assert installed.read_bytes() == content
    assert cli("path", "conv").returncode == 0


def test_a_same_size_change_is_caught_by_the_sha256(world: World) -> None:
    content = make_gguf(50_000, seed=42)
    entry = world.add_model("conv2", {"model.gguf": content})
    entry["files"] = [{"filename": "model.gguf", "sha256": sha256_hex(content)}]
    world.write_catalog()
    installed = world.resolver().resolve("conv2").path
    installed.write_bytes(make_gguf(50_000, seed=43))  # whole GGUF, other bytes, new mtime

    assert world.resolver().installed("conv2") is None
    assert "modified" in world.resolver().status("conv2").error_message
    assert world.resolver().resolve("conv2").path.read_bytes() == content


@pytest.mark.parametrize("damage", ["truncated", "html"])
def test_manual_adoption_needs_a_whole_gguf(world: World, damage: str) -> None:
    manual = world.models_dir / "byhand" / "model.gguf"
    manual.parent.mkdir(parents=True)
    whole = make_gguf(20_000, seed=44)
    manual.write_bytes(whole[:5000] if damage == "truncated" else b"<html>" + whole)

    assert world.resolver().installed("byhand") is None
    done = cli("path", "byhand")
    assert done.returncode != 0

    manual.write_bytes(whole)
    assert world.resolver().installed("byhand") is not None


def test_a_large_truncated_gguf_is_caught_by_the_header_parsed_during_the_transfer(
    world: World, serve: Callable[..., ScriptedServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmlb_node.download import checks

    content = make_gguf(24 * 1024 * 1024, seed=45)
    headers_seen: list[bool] = []
    real = checks.verify_gguf

    def verify(path: Any, filename: str, header: Any = None) -> Any:
        headers_seen.append(header is not None)
        return real(path, filename, header)

    monkeypatch.setattr(checks, "verify_gguf", verify)
    server = serve(lambda rec: Reply(200, {}, content, cut=20 * 1024 * 1024))
    _as_url(world, server, "big", "big.gguf")

    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("big")

    failure = info.value.failures[0]
    assert failure.kind == "integrity" and "truncated" in failure.message
    assert str(len(content)) in failure.message and str(20 * 1024 * 1024) in failure.message
    assert headers_seen == [True]  # parsed while the bytes arrived: the end check is a stat


@pytest.mark.parametrize("etag", [None, '"v1"'], ids=["no-validator", "etag"])
def test_only_a_file_with_a_strong_validator_is_split(
    world: World, serve: Callable[..., ScriptedServer], etag: str | None
) -> None:
    # Slow enough that the first connection's rate asks for 4 ranges after 0.25 s.
    content = make_gguf(8 * 1024 * 1024, seed=46)

    def answer(rec: RecordedRequest) -> Reply:
        reply = honest_reply(content, rec, etag)  # the catalog has no sha256
        reply.rate = 4 * 1024 * 1024
        return reply

    server = serve(answer)
    _as_url(world, server, "split1", "split1.gguf")

    resolved = world.resolver(parallel_threshold=1024 * 1024).resolve("split1")

    assert resolved.path.read_bytes() == content
    assert len(_gets(server)) == (1 if etag is None else 4)


def test_each_shard_of_a_split_gguf_is_checked_on_its_own(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    first, second = make_gguf(40_000, seed=47), make_gguf(60_000, seed=48)

    def answer(rec: RecordedRequest) -> Reply:
        if rec.path.endswith("00001-of-00002.gguf"):
            return honest_reply(first, rec)
        return Reply(200, {}, second, cut=30_000)  # no length: looks complete, is cut

    server = serve(answer)
    world.monkeypatch.delenv("LLMLB_URL", raising=False)
    names = ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    entry = world.add_model("split", {n: b"" for n in names}, on_hub=False, on_proxy=False)
    entry.update(
        files=[{"filename": n} for n in names],
        sources=[{"type": "url", "urls": {n: f"{server.url}/{n}" for n in names}}],
    )
    world.write_catalog()

    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("split")

    failure = info.value.failures[0]
    assert failure.kind == "integrity" and "m-00002-of-00002.gguf" in failure.message
    assert "60000" in failure.message and "30000" in failure.message
    assert world.resolver().installed("split") is None
