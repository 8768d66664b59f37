"""The blob endpoint: a node serves its files to other nodes, installed or still arriving.

Node A is a real `llmlb-node serve`; node B is another real node (or a resolver in this process)
whose LLMLB_URL is A and whose allowlist excludes the loopback Hub, so every byte B gets comes
through A, checked by B's own proxy source and integrity checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from gguf import make_gguf
from node import running_node
from world import FILENAME, MODEL_ID, SIZE, World

from llmlb_node import ModelResolver, Settings

KEY = "node-a-key"
BIG_ID = "big"
BIG_FILE = "big-Q4_K_M.gguf"
BIG_SIZE = 12 * 1024 * 1024
BIG_RATE = 4 * 1024 * 1024  # bytes/s from the Hub's CDN: the download takes about three seconds
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}


def _headers(key: str = KEY, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def _b_resolver(world: World, node_url: str, home: Path) -> ModelResolver:
    """A resolver like node B's: its own store, LLMLB_URL = node A, the Hub not allowed."""
    env = {**world.env(), "LLMLB_HOME": str(home)}
    env.pop("LLMLB_MODELS_DIR", None)
    settings = Settings.from_env(
        env,
        llmlb_url=node_url,
        llmlb_api_key=KEY,
        origin_allowlist=("only-this.invalid",),
        retry_backoff=0.01,
    )
    return ModelResolver(settings)


def test_installed_file_is_served_with_length_ranges_etag_and_416(world: World) -> None:
    world.resolver().resolve(MODEL_ID)
    url_path = f"/v0/models/blob/{MODEL_ID}"
    with running_node(api_key=KEY) as node, httpx.Client(base_url=node.url) as client:
        whole = client.get(url_path, headers=_headers())
        part = client.get(url_path, headers=_headers(range="bytes=100-199"))
        tail = client.get(url_path, headers=_headers(range="bytes=-10"))
        past = client.get(url_path, headers=_headers(range=f"bytes={SIZE}-"))
        head = client.head(url_path, headers=_headers())
        named = client.get(f"{url_path}?file={FILENAME}", headers=_headers())
        no_file = client.get(f"{url_path}?file=other.gguf", headers=_headers())
        unknown = client.get("/v0/models/blob/nope", headers=_headers())
        no_key = client.get(url_path)

    assert whole.status_code == 200 and whole.content == world.content
    assert whole.headers["content-length"] == str(SIZE)
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["etag"] == f'"{world.sha256}"'
    assert part.status_code == 206 and part.content == world.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{SIZE}"
    assert tail.status_code == 206 and tail.content == world.content[-10:]
    assert past.status_code == 416
    assert head.status_code == 200 and head.content == b""
    assert (
        head.headers["content-length"] == str(SIZE)
        and head.headers["etag"] == whole.headers["etag"]
    )
    assert named.content == world.content
    assert no_file.status_code == 404
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert no_key.status_code == 401


def test_node_b_resolves_through_node_a_when_the_hub_is_not_allowed(
    world: World, tmp_path: Path
) -> None:
    world.resolver().resolve(MODEL_ID)
    hub_bytes = world.hub_bytes()
    with running_node(api_key=KEY) as a:
        env_b = {
            **world.env(),
            "LLMLB_HOME": str(tmp_path / "b"),
            "LLMLB_URL": a.url,
            "LLMLB_API_KEY": KEY,
            "LLMLB_ORIGIN_ALLOWLIST": "only-this.invalid",
        }
        with running_node(env_b) as b:
            status, _, body = b.post("/v1/chat/completions", CHAT)
            _, _, b_status = b.get(f"/v0/models/{MODEL_ID}/status")

    installed = tmp_path / "b" / "models" / MODEL_ID / FILENAME
    assert status == 500, body  # downloaded through A; the test GGUF cannot load
    assert installed.read_bytes() == world.content
    assert b_status["status"] == "completed" and b_status["source"] == "llmlb-proxy"
    assert world.hub_bytes() == hub_bytes  # B never touched the Hub


@pytest.fixture
def big(world: World) -> bytes:
    content = make_gguf(BIG_SIZE, seed=7)
    world.add_model(BIG_ID, {BIG_FILE: content})
    world.hub.cdn.rate_limit(BIG_RATE)
    return content


def test_pull_through_serves_bytes_while_node_a_still_downloads(
    world: World, big: bytes, tmp_path: Path
) -> None:
    with running_node(api_key=KEY) as a, httpx.Client(base_url=a.url, timeout=30) as client:
        with client.stream("GET", f"/v0/models/blob/{BIG_ID}", headers=_headers()) as response:
            chunks = response.iter_bytes()
            first = next(chunks)
            _, _, during = a.get(f"/v0/models/{BIG_ID}/status")
            rest = b"".join(chunks)
            headers = response.headers
        a.wait_for(lambda: a.get(f"/v0/models/{BIG_ID}/status")[2]["status"] == "completed")

    assert during["status"] == "downloading" and during["downloaded_bytes"] < BIG_SIZE
    assert first + rest == big
    assert headers["content-length"] == str(BIG_SIZE)
    assert headers["etag"] == f'"{hashlib.sha256(big).hexdigest()}"'
    assert world.hub.cdn.bytes_sent == BIG_SIZE  # the Hub served the file once


def test_a_range_past_what_has_arrived_waits_for_it(world: World, big: bytes) -> None:
    with running_node(api_key=KEY) as a, httpx.Client(base_url=a.url, timeout=30) as client:
        asked = time.monotonic()
        tail = client.get(f"/v0/models/blob/{BIG_ID}", headers=_headers(range="bytes=-1000"))
        waited = time.monotonic() - asked
        head = client.head(f"/v0/models/blob/{BIG_ID}", headers=_headers())
        past = client.get(f"/v0/models/blob/{BIG_ID}", headers=_headers(range=f"bytes={BIG_SIZE}-"))

    assert tail.status_code == 206 and tail.content == big[-1000:]
    assert tail.headers["content-range"] == f"bytes {BIG_SIZE - 1000}-{BIG_SIZE - 1}/{BIG_SIZE}"
    assert waited > 1.0  # it waited for the download to reach the end, rather than failing
    assert head.headers["content-length"] == str(BIG_SIZE)
    assert past.status_code == 416
    assert world.hub.cdn.bytes_sent == BIG_SIZE


def test_many_nodes_pulling_through_one_node_cost_the_hub_one_copy(
    world: World, big: bytes, tmp_path: Path
) -> None:
    results: dict[int, Path] = {}
    with running_node(api_key=KEY) as a:

        def fetch(i: int) -> None:
            resolver = _b_resolver(world, a.url, tmp_path / f"b{i}")
            results[i] = resolver.resolve(BIG_ID).path

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _, _, a_status = a.get(f"/v0/models/{BIG_ID}/status")

    assert sorted(results) == [0, 1, 2]
    assert all(p.read_bytes() == big for p in results.values())
    assert a_status["status"] == "completed"
    assert world.hub.cdn.bytes_sent == BIG_SIZE
    assert world.proxy.request_count == 0  # the test's own proxy was never asked


def test_pull_through_of_a_model_no_source_has_is_502(world: World) -> None:
    world.hub.refuse()
    world.proxy.refuse()
    with running_node(api_key=KEY) as a:
        status, _, body = a.get(f"/v0/models/blob/{MODEL_ID}")

    assert status == 502 and body["error"]["code"] == "download_failed"
    assert not os.path.exists(world.installed_path())


def test_a_download_that_fails_midway_ends_the_response_short(world: World, big: bytes) -> None:
    world.proxy.refuse()  # the Hub is the only source
    got = bytearray()
    with running_node(api_key=KEY) as a, httpx.Client(base_url=a.url, timeout=60) as client:
        with (
            pytest.raises(httpx.RemoteProtocolError),
            client.stream("GET", f"/v0/models/blob/{BIG_ID}", headers=_headers()) as response,
        ):
            for chunk in response.iter_bytes():
                if not got:
                    world.hub.cdn.refuse()  # A's download stops for good after these bytes
                got += chunk
        # The response may end as soon as the download leaves this source for the next one
        # (it may hold another version), a moment before the whole resolve has failed.
        a.wait_for(lambda: a.get(f"/v0/models/{BIG_ID}/status")[2]["status"] == "error")

    assert response.status_code == 200
    assert 0 < len(got) < BIG_SIZE and bytes(got) == big[: len(got)]


def test_each_file_of_a_multi_file_model_is_pulled_through_by_name(
    world: World, tmp_path: Path
) -> None:
    files = {"two-00001-of-00002.gguf": make_gguf(200_000, seed=3), "two-extra.bin": b"x" * 5000}
    world.add_model("two", files)
    with running_node(api_key=KEY) as a:
        resolved = _b_resolver(world, a.url, tmp_path / "b").resolve("two")
        status, _, _ = a.get("/v0/models/blob/two?file=nope.bin")

    assert [p.read_bytes() for p in resolved.paths] == list(files.values())
    assert resolved.source == "llmlb-proxy"
    assert status == 404


def test_a_node_stopping_mid_pull_through_exits_and_keeps_the_partial(
    world: World, big: bytes
) -> None:
    world.hub.cdn.rate_limit(BIG_SIZE / 20)  # twenty seconds, were it left to finish
    got = bytearray()
    with (
        running_node(api_key=KEY, SHUTDOWN_GRACE="1") as a,
        httpx.Client(base_url=a.url, timeout=60) as client,
    ):

        def pull() -> None:
            with (
                contextlib.suppress(httpx.HTTPError),
                client.stream("GET", f"/v0/models/blob/{BIG_ID}", headers=_headers()) as r,
            ):
                for chunk in r.iter_bytes():
                    got.extend(chunk)

        reader = threading.Thread(target=pull)
        reader.start()
        a.wait_for(lambda: len(got) > 0, what="the first bytes")
        stopping = time.monotonic()
        code = a.stop()
        took = time.monotonic() - stopping
        reader.join()

    partials = list(world.models_dir.glob(f".llmlb/{BIG_ID}/**/*")) + list(
        world.models_dir.glob(f"{BIG_ID}/**/*")
    )
    assert code == 0 and took < 10  # the download did not hold the exit
    assert 0 < len(got) < BIG_SIZE and bytes(got) == big[: len(got)]
    assert any(p.is_file() and p.stat().st_size > 0 for p in partials)


def test_a_file_of_unknown_exact_size_is_served_once_it_is_installed(world: World) -> None:
    content = make_gguf(2 * 1024 * 1024, seed=11)
    # Only an approximate size (llmlb's size_bytes), and a source that states none: the proxy.
    world.add_model("approx", {"approx.gguf": content}, on_hub=False, size_bytes=len(content) + 999)
    world.hub.refuse()
    with running_node(api_key=KEY) as a, httpx.Client(base_url=a.url, timeout=60) as client:
        whole = client.get("/v0/models/blob/approx", headers=_headers())

    assert whole.status_code == 200 and whole.content == content
    assert whole.headers["content-length"] == str(len(content))


@pytest.mark.parametrize("approx", [5_000_000, 6 * 1024 * 1024], ids=["wrong", "v1"])
def test_pull_through_never_splices_two_versions_when_node_a_starts_again(
    world: World, tmp_path: Path, approx: int
) -> None:
    """Node A's source (no ETag, no sha256) drops at 5 MiB, then serves another version: A
    starts the file again. Node B, which already got A's first 4 MiB of version 1, must not get
    version 2's bytes after them (a splice that passes every size check): its stream ends short,
    it resumes with an overlap that no longer matches, and installs version 2 whole."""
    from servers import Reply, ScriptedServer, honest_reply

    v1 = make_gguf(6 * 1024 * 1024, seed=91)
    v2 = make_gguf(7 * 1024 * 1024, seed=92)
    gets = []

    def answer(rec) -> Reply:  # noqa: ANN001
        gets.append(rec)
        if len(gets) == 1:
            return Reply(200, {"Content-Length": str(len(v1))}, v1, cut=5 * 1024 * 1024, rate=8e6)
        return honest_reply(v2, rec)

    server = ScriptedServer(answer)
    try:
        entry = world.add_model("chg", {"chg.gguf": b""}, on_hub=False, on_proxy=False)
        # The catalog's size is approximate (wrong, or v1's): A promises B only the size its
        # source states, never this one (which made A answer 416, or a v1-sized splice).
        entry.update(sources=[{"type": "url", "url": f"{server.url}/chg.gguf"}], size_bytes=approx)
        world.write_catalog()
        with running_node(api_key=KEY) as a:
            resolved = _b_resolver(world, a.url, tmp_path / "b").resolve("chg")
            got = resolved.path.read_bytes()
    finally:
        server.close()

    assert len(gets) >= 2  # A really started again on version 2
    assert got == v2
