"""New lying servers (review of issue 8): each must end as the README promises."""

from __future__ import annotations

import gzip
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gguf import make_gguf, sha256_hex
from servers import RecordedRequest, Reply, ScriptedServer, honest_reply
from test_lying_servers import LLMLB_NODE, _as_url, _entry, _gets, _nothing_installed
from world import FILENAME, MODEL_ID, World

from llmlb_node import InsufficientDiskSpaceError, ModelDownloadError


def test_gzip_encoded_gguf_is_refused(world: World, serve: Callable[..., ScriptedServer]) -> None:
    content = make_gguf(70_000, seed=81)
    packed = gzip.compress(content)
    server = serve(
        lambda rec: Reply(
            200, {"Content-Encoding": "gzip", "Content-Length": str(len(packed))}, packed
        )
    )
    _as_url(world, server, "gz", "gz.gguf")
    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("gz")
    assert info.value.failures[0].kind == "integrity"
    assert _nothing_installed(world, "gz")


def test_a_compressed_body_is_never_installed_whatever_the_file(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    # A non-GGUF file without a sha256: no magic number to catch gzip, only the encoding says.
    content = b"tokenizer data " * 2000
    packed = gzip.compress(content)
    headers = {"Content-Encoding": "gzip", "Content-Length": str(len(packed))}
    server = serve(lambda rec: Reply(200, headers, packed))
    _as_url(world, server, "gzbin", "vocab.bin")
    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("gzbin")
    failure = info.value.failures[0]
    assert failure.kind == "integrity" and "Content-Encoding 'gzip'" in failure.message
    assert not (world.models_dir / "gzbin" / "vocab.bin").exists()


def test_a_redirect_to_a_file_url_fails_at_once(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    server = serve(lambda rec: Reply(302, {"Location": "file:///etc/passwd"}, b""))
    _as_url(world, server, "fs", "fs.gguf")
    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("fs")
    failure = info.value.failures[0]
    assert failure.kind == "http" and "not an http(s) URL" in failure.message
    assert len(_gets(server)) == 1  # not retried: the answer will not change
    assert _nothing_installed(world, "fs")


def test_a_redirect_loop_ends(world: World, serve: Callable[..., ScriptedServer]) -> None:
    server = serve(lambda rec: Reply(302, {"Location": rec.path}, b""))
    _as_url(world, server, "loop", "loop.gguf")
    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("loop")
    assert "too many redirects" in info.value.failures[0].message
    assert len(_gets(server)) == 11


def test_a_206_from_another_offset_is_refused(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = make_gguf(200_000, seed=82)

    def answer(rec: RecordedRequest) -> Reply:
        r = honest_reply(content, rec)
        if r.status == 206:
            r.headers["Content-Range"] = f"bytes 100-{len(content) - 1}/{len(content)}"
            r.headers["Content-Length"] = str(len(content) - 100)
            r.body = content[100:]
        return r

    server = serve(answer)
    _as_url(world, server, "off", "off.gguf")
    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("off")
    assert "asked for byte 0, server sent from 100" in info.value.failures[0].message
    assert _nothing_installed(world, "off")


def _absurd_gguf(n: int) -> bytes:
    # n tensor infos of 32 bytes each, laid out as ggml wants them (distinct names, 0 dims, type
    # F32, each 32 bytes after the last): only the memory bound can stop them.
    infos = (struct.pack("<Q8sIIQ", 8, b"t%07d" % i, 0, 0, 32 * i) for i in range(n))
    return b"GGUF" + struct.pack("<IQQ", 3, n, 0) + b"".join(infos)


def test_a_header_declaring_absurd_tensor_counts_is_refused_within_a_memory_bound(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    # 300,000 real (empty) tensor infos: without a bound the parser held one object per 24
    # bytes of the file (a 48 MB file: +240 MB and 18 s; a 4 GB one would exhaust memory).
    content = _absurd_gguf(300_000)
    server = serve(lambda rec: honest_reply(content, rec))
    _as_url(world, server, "abs", "abs.gguf")
    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("abs")
    failure = info.value.failures[0]
    assert failure.kind == "integrity" and "implausible header" in failure.message
    assert _nothing_installed(world, "abs")


@pytest.fixture
def trickle() -> Iterator[str]:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    stop = threading.Event()

    def conn(c: socket.socket) -> None:
        try:
            c.recv(65536)
            c.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.wait(0.05):
                c.sendall(b"X")
        except OSError:
            pass
        finally:
            c.close()

    def accept() -> None:
        while not stop.is_set():
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=conn, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{lsock.getsockname()[1]}"
    stop.set()
    lsock.close()


def test_headers_that_never_end_are_a_stall(world: World, trickle: str) -> None:
    world.monkeypatch.delenv("LLMLB_URL", raising=False)

    _entry(world, "tr", "tr.gguf", sources=[{"type": "url", "url": f"{trickle}/tr.gguf"}])
    start = time.monotonic()
    with pytest.raises(ModelDownloadError) as info:
        world.resolver(connect_timeout=0.5, stall_timeout=0.5, max_stalls=2).resolve("tr")
    elapsed = time.monotonic() - start
    # Each header byte came within the read timeout: only a deadline on the whole header ends it.
    assert info.value.failures[0].kind == "stalled"
    assert elapsed < 10, elapsed


# -- the Hub's metadata request: our own client, the token on each hop by its exact origin ------
HF_SECRET = "hf_ReviewOnlyForTheEndpoint42"
HUB_REPO = "org/m-GGUF"


def _hub_entry(world: World, hub_url: str, content: bytes) -> None:
    world.monkeypatch.setenv("HF_ENDPOINT", hub_url)
    world.monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    world.monkeypatch.delenv("LLMLB_URL", raising=False)
    source = {"type": "huggingface", "repo": HUB_REPO}
    _entry(world, "hubm", "m.gguf", sources=[source], files=[{"filename": "m.gguf"}])


def _hub_head(content: bytes, rec: RecordedRequest) -> Reply:
    """The Hub's answer for a file it serves itself (no LFS redirect)."""
    reply = honest_reply(content, rec, etag=f'"{sha256_hex(content)}"')
    reply.headers["X-Repo-Commit"] = "c" * 40
    return reply


@pytest.mark.parametrize("where", ["another-port", "another-host-name", "same-origin"])
def test_the_hub_metadata_request_carries_the_token_only_to_hf_endpoints_origin(
    world: World, serve: Callable[..., ScriptedServer], where: str
) -> None:
    content = make_gguf(50_000, seed=83)
    other = serve(lambda rec: _hub_head(content, rec))  # answers like the Hub, if reached

    def hub_answer(rec: RecordedRequest) -> Reply:
        if rec.path.startswith("/moved/"):
            return _hub_head(content, rec)
        base = {
            "another-port": other.url,
            "another-host-name": f"http://localhost:{hub.port}",
            "same-origin": "",
        }[where]
        # A redirect without metadata of its own: a client that follows it with the token
        # leaks the token there.
        return Reply(302, {"Location": f"{base}/moved/m.gguf"}, b"")

    hub = serve(hub_answer)
    _hub_entry(world, hub.url, content)

    try:
        resolved = world.resolver().resolve("hubm")
    except ModelDownloadError as exc:
        assert where != "same-origin", exc
        assert "did not answer like the Hub" in exc.failures[0].message
    else:
        assert where == "same-origin"
        assert resolved.path.read_bytes() == content

    first = hub.requests[0]
    assert first.method == "HEAD" and first.authorization == f"Bearer {HF_SECRET}"
    moved = [r for r in [*hub.requests, *other.requests] if r.path.startswith("/moved/")]
    if where == "same-origin":
        assert moved and {r.authorization for r in moved} == {f"Bearer {HF_SECRET}"}
    else:
        # huggingface_hub's client does not follow it either; ours never sends the token there
        assert {r.authorization for r in moved} <= {None}


def test_hub_metadata_headers_that_never_end_are_bounded(world: World, trickle: str) -> None:
    # huggingface_hub's client (per-read timeout) waited on this for as long as bytes trickled.
    _hub_entry(world, trickle, b"")
    start = time.monotonic()
    with pytest.raises(ModelDownloadError) as info:
        world.resolver(connect_timeout=0.5, stall_timeout=0.5, max_retries=2).resolve("hubm")
    assert info.value.failures[0].kind == "stalled"
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("location", ["http://[::1", "//[zz]/x", "http://127.0.0.1:99999/x"])
def test_an_unparsable_redirect_is_a_typed_failure_and_the_chain_goes_on(
    world: World, serve: Callable[..., ScriptedServer], location: str
) -> None:
    # A Location httpx cannot parse (or a port out of range) fails this source as a typed,
    # bounded failure, never a raw exception that would end the chain before the proxy.
    server = serve(lambda rec: Reply(302, {"Location": location}, b""))
    _entry(world, MODEL_ID, FILENAME, sources=[{"type": "url", "url": f"{server.url}/m.gguf"}])

    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.source == "llmlb-proxy"
    assert resolved.path.read_bytes() == world.content


def test_an_unparsable_hub_redirect_is_a_typed_failure(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    hub = serve(lambda rec: Reply(302, {"Location": "http://[::1"}, b""))
    _hub_entry(world, hub.url, b"")
    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("hubm")
    # httpx itself refuses the Location (a protocol error): retried a bounded number of times.
    assert info.value.failures[0].kind in ("http", "network"), info.value
    assert len(hub.requests) <= 5


def test_a_fifo_named_model_gguf_never_blocks(world: World) -> None:
    # A hand-placed "model.gguf" that is a FIFO (or a symlink to one): opening it to check its
    # header blocked forever, so `path`, `models` and every resolve of the id hung.
    model_dir = world.models_dir / "fifo"
    model_dir.mkdir(parents=True)
    os.mkfifo(model_dir / "model.gguf")
    (model_dir / "link").mkdir()
    os.symlink(model_dir / "model.gguf", model_dir / "link" / "x")
    _entry(world, "fifo", "fifo.gguf", sources=[])

    done = subprocess.run(
        [str(LLMLB_NODE), "path", "fifo"], env=dict(os.environ), capture_output=True, timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert b"Traceback" not in done.stderr
    assert not gguf_check_ok(model_dir / "link" / "x")


def gguf_check_ok(path: Path) -> bool:
    from llmlb_node.gguf import GGUFError, check_complete

    try:
        check_complete(path)
    except GGUFError:
        return False
    return True


def test_x_linked_size_disagreeing_with_the_body_is_an_integrity_error(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = make_gguf(50_000, seed=84)

    def answer(rec: RecordedRequest) -> Reply:
        reply = _hub_head(content, rec)
        reply.headers["ETag"] = '"not-a-sha256-' + "a" * 50 + '"'  # a validator, no digest
        reply.headers["X-Linked-Size"] = "40000"
        return reply

    hub = serve(answer)
    _hub_entry(world, hub.url, content)
    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("hubm")
    failure = info.value.failures[0]
    assert failure.kind == "integrity" and "40000" in failure.message
    assert _nothing_installed(world, "hubm")


def test_a_content_range_total_changing_between_requests_is_never_trimmed_or_padded(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    short = make_gguf(300_000, seed=85)
    longer = short + b"\0" * 100_000  # the same bytes, then more: a trim or a pad would pass
    served: list[bytes] = []

    def answer(rec: RecordedRequest) -> Reply:
        content = short if not served else longer
        served.append(content)
        reply = honest_reply(content, rec)
        if len(served) == 1:
            reply.cut = 200_000
        return reply

    server = serve(answer)
    _as_url(world, server, "grow", "grow.gguf")
    resolved = world.resolver().resolve("grow")
    assert resolved.path.read_bytes() == longer  # the version served whole, never short[:...]
    assert len(served) >= 3  # the resume saw the total change and started again


def _claims_a_huge_size(rec: RecordedRequest) -> Reply:
    return Reply(200, {"Content-Length": str(10**15)}, b"GGUF" + b"\0" * 60)


def test_a_source_claiming_a_huge_size_does_not_block_the_next_source(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    # A size only this server states cannot fit: that is this source's failure, and the proxy,
    # which has the model, still delivers it.
    server = serve(_claims_a_huge_size)
    _entry(world, MODEL_ID, FILENAME, sources=[{"type": "url", "url": f"{server.url}/m.gguf"}])

    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.source == "llmlb-proxy"
    assert resolved.path.read_bytes() == world.content


def test_when_no_source_fits_the_disk_error_is_raised(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    server = serve(_claims_a_huge_size)
    _as_url(world, server, "huge", "huge.gguf")

    with pytest.raises(InsufficientDiskSpaceError) as info:
        world.resolver().resolve("huge")

    assert info.value.needed >= 10**15
    assert _nothing_installed(world, "huge")
