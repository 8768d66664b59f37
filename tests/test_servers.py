"""The loopback test servers behave like the real Hub, CDN and llmlb proxy, faults included.

Plain httpx and the real huggingface_hub client talk to them over real sockets.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import huggingface_hub
import pytest
from gguf import HEADER_SIZE, make_gguf, sha256_hex, write_gguf
from huggingface_hub import errors as hf_errors
from servers import CDN_HOST, Blob, HubServer, LoopbackServer, ProxyServer, refused_url

REPO = "acme/tiny-GGUF"
FILE = "tiny-Q4_K_M.gguf"
TOKEN = "hf_secret_token"


@pytest.fixture
def static() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    yield server
    server.close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


# ----------------------------------------------------------------------------- gguf


def test_make_gguf_header_and_determinism(tmp_path: Path) -> None:
    data = make_gguf(1000, seed=3)
    assert len(data) == 1000
    assert data[:4] == b"GGUF"
    assert int.from_bytes(data[4:8], "little") == 3
    assert struct.unpack("<QQ", data[8:HEADER_SIZE]) == (1, 0)  # one tensor, no metadata
    assert make_gguf(1000, seed=3) == data != make_gguf(1000, seed=4)
    size = 8 * 1024 * 1024 + 13  # crosses write_gguf's chunk boundary
    sha = write_gguf(tmp_path / "m.gguf", size, seed=3)
    assert (tmp_path / "m.gguf").read_bytes() == make_gguf(size, seed=3)
    assert sha == sha256_hex(make_gguf(size, seed=3))
    with pytest.raises(ValueError):
        make_gguf(10)


# ----------------------------------------------------------------------------- base mechanics


def test_range_head_and_keep_alive(static: LoopbackServer, client: httpx.Client) -> None:
    data = make_gguf(100_000)
    blob = static.add_path("/m.gguf", data)
    url = static.url + "/m.gguf"

    r = client.get(url)
    assert r.status_code == 200 and r.content == data
    assert r.headers["etag"] == f'"{sha256_hex(data)}"' == blob.etag
    assert r.headers["accept-ranges"] == "bytes"

    r = client.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
    r = client.get(url, headers={"Range": "bytes=99990-"})
    assert r.status_code == 206 and r.content == data[99990:]
    r = client.get(url, headers={"Range": "bytes=-5"})
    assert r.status_code == 206 and r.content == data[-5:]
    r = client.get(url, headers={"Range": "bytes=99990-200000"})
    assert r.status_code == 206 and r.content == data[99990:]
    r = client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"

    r = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert r.status_code == 200 and len(r.content) == len(data)
    r = client.get(url, headers={"Range": "bytes=0-9", "If-Range": blob.etag})
    assert r.status_code == 206

    r = client.head(url)
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == str(len(data))

    static.ignore_range(True)
    r = client.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 200 and r.content == data
    static.ignore_range(False)

    assert client.get(static.url + "/nope").status_code == 404
    assert static.connections_opened == 1  # everything above reused one keep-alive connection


def test_file_backed_parallel_ranges(static: LoopbackServer, tmp_path: Path) -> None:
    size = 6 * 1024 * 1024 + 7
    sha = write_gguf(tmp_path / "big.gguf", size, seed=9)
    static.add_path("/big", Blob.of(tmp_path / "big.gguf", sha256=sha))
    bounds = [(i * size // 4, (i + 1) * size // 4) for i in range(4)]

    def part(b: tuple[int, int]) -> bytes:
        headers = {"Range": f"bytes={b[0]}-{b[1] - 1}"}
        r = httpx.get(static.url + "/big", headers=headers, timeout=5)
        assert r.status_code == 206
        return r.content

    with ThreadPoolExecutor(4) as pool:
        body = b"".join(pool.map(part, bounds))
    assert sha256_hex(body) == sha
    assert static.bytes_sent == size


def test_counters_and_records(static: LoopbackServer, client: httpx.Client) -> None:
    static.add_path("/a", b"x" * 1000)
    client.get(static.url + "/a?x=1&y=two", headers={"Authorization": "Bearer k", "X-Foo": "bar"})
    client.head(static.url + "/a")
    client.get(static.url + "/a", headers={"Range": "bytes=0-99"})
    assert static.request_count == 3
    assert static.bytes_sent == 1100
    first = static.requests[0]
    assert (first.method, first.path, first.query) == ("GET", "/a", "x=1&y=two")
    assert first.params == {"x": "1", "y": "two"}
    assert first.headers["authorization"] == "Bearer k" == first.authorization
    assert first.headers["x-foo"] == "bar"
    assert (first.host, first.port, first.status, first.body_bytes) == (
        "127.0.0.1",
        static.port,
        200,
        1000,
    )
    assert [r.status for r in static.requests] == [200, 200, 206]
    static.reset_counters()
    assert static.request_count == 0 and static.bytes_sent == 0


def test_fail_5xx_and_fail_status_count_down(static: LoopbackServer, client: httpx.Client) -> None:
    static.add_path("/a", b"abc")
    url = static.url + "/a"
    static.fail_5xx(2, status=502, retry_after=7)
    r = client.head(url)
    assert r.status_code == 502 and r.headers["retry-after"] == "7"
    assert client.get(url).status_code == 502
    assert client.get(url).content == b"abc"

    static.fail_5xx(1, methods=("GET",))
    assert client.head(url).status_code == 200
    assert client.get(url).status_code == 503

    static.fail_status(403)  # n=None: until cleared
    assert [client.get(url).status_code for _ in range(3)] == [403, 403, 403]
    static.clear_faults()
    static.fail_status(401, n=1, headers={"WWW-Authenticate": "Bearer"})
    r = client.get(url)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.get(url).status_code == 200


def test_drop_after_cuts_the_body(static: LoopbackServer, client: httpx.Client) -> None:
    data = make_gguf(3 * 1024 * 1024)
    static.add_path("/m", data)
    static.drop_after(1000)
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), client.stream("GET", static.url + "/m") as r:
        assert r.headers["content-length"] == str(len(data))
        for chunk in r.iter_bytes():
            received += chunk
    assert received == data[:1000]
    assert static.bytes_sent == 1000

    static.drop_after(64 * 1024, reset=True)
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        client.get(static.url + "/m")
    assert client.get(static.url + "/m").content == data  # faults were n=1 each


def test_stall_fires_read_timeout_and_close_interrupts_it(static: LoopbackServer) -> None:
    static.add_path("/m", make_gguf(200_000))
    static.stall_after(500, seconds=30)
    with httpx.Client(timeout=httpx.Timeout(5, read=0.3)) as c:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout), c.stream("GET", static.url + "/m") as r:
            for _ in r.iter_bytes():
                pass
        assert time.monotonic() - started < 10  # the read timeout, not the 30 s stall
    assert static.bytes_sent == 500
    started = time.monotonic()
    static.close()  # the stalled handler is still waiting its 30 s: close must wake it
    assert time.monotonic() - started < 10
    assert static.open_connections == 0


def test_rate_limit_caps_throughput(static: LoopbackServer, client: httpx.Client) -> None:
    data = make_gguf(2 * 1000 * 1000)
    static.add_path("/m", data)
    static.rate_limit(2 * 1000 * 1000)
    started = time.monotonic()
    assert client.get(static.url + "/m").content == data
    elapsed = time.monotonic() - started
    assert elapsed >= 0.95  # never faster than the cap (a load can only slow it down)
    static.rate_limit(None)
    started = time.monotonic()
    assert client.get(static.url + "/m").content == data
    assert time.monotonic() - started < 0.9  # uncapped: faster than the cap allows


def test_refuse_restore_and_refused_url(static: LoopbackServer) -> None:
    static.add_path("/a", b"abc")
    assert httpx.get(static.url + "/a").status_code == 200
    static.refuse()
    with pytest.raises(httpx.ConnectError):
        httpx.get(static.url + "/a", timeout=2)
    static.restore()
    assert httpx.get(static.url + "/a").content == b"abc"
    with pytest.raises(httpx.ConnectError):
        httpx.get(refused_url() + "/x", timeout=2)


def test_html_and_wrong_bytes(static: LoopbackServer, client: httpx.Client) -> None:
    data = make_gguf(50_000)
    static.add_path("/m", data)
    static.serve_html(n=1)
    r = client.get(static.url + "/m")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content.startswith(b"<!DOCTYPE html><html>")

    static.serve_wrong_bytes(n=2)
    r = client.get(static.url + "/m")
    assert len(r.content) == len(data) and r.content != data
    assert r.content[:4] == b"GGUF" and r.headers["etag"] == f'"{sha256_hex(data)}"'
    r = client.get(static.url + "/m", headers={"Range": "bytes=2-9"})
    assert r.content[:2] == data[2:4] and r.content[2:] != data[4:10]
    assert client.get(static.url + "/m").content == data


def test_change_content_changes_etag(static: LoopbackServer, client: httpx.Client) -> None:
    static.add_path("/m", make_gguf(1000, seed=1))
    before = client.head(static.url + "/m").headers["etag"]
    static.change_content(make_gguf(1000, seed=2))
    r = client.get(static.url + "/m")
    assert r.headers["etag"] != before and r.content == make_gguf(1000, seed=2)


# ----------------------------------------------------------------------------- Hub + CDN


def test_hub_redirects_to_cdn_with_metadata(hub: HubServer, client: httpx.Client) -> None:
    data = make_gguf(300_000)
    hub.add_file(REPO, f"sub/{FILE}", data)
    sha = sha256_hex(data)
    r = client.head(hub.file_url(REPO, f"sub/{FILE}"), headers={"Authorization": "Bearer t"})
    assert r.status_code == 302
    assert r.headers["x-repo-commit"] == hub.commit_of(REPO)
    assert r.headers["x-linked-etag"] == r.headers["etag"] == f'"{sha}"'
    assert r.headers["x-linked-size"] == str(len(data))
    assert r.headers["content-length"] == "0"
    location = httpx.URL(r.headers["location"])
    assert location.host == CDN_HOST and location.path.endswith(f"/{sha}")

    r = client.get(location, headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and r.content == data[:100]
    assert 'filename="tiny-Q4_K_M.gguf"' in r.headers["content-disposition"]
    assert client.get(location).content == data
    assert hub.requests[0].authorization == "Bearer t"
    assert all(req.authorization is None for req in hub.cdn.requests)
    assert hub.total_requests() == 3
    assert hub.total_bytes_sent() == 100 + len(data)


def test_hf_get_file_metadata(hub: HubServer) -> None:
    data = make_gguf(12345)
    hub.add_file(REPO, FILE, data)
    url = huggingface_hub.hf_hub_url(REPO, FILE, revision="main", endpoint=hub.url)
    assert url == hub.file_url(REPO, FILE)
    meta = huggingface_hub.get_hf_file_metadata(url, token=TOKEN)
    assert meta.commit_hash == hub.commit_of(REPO)
    assert meta.etag == sha256_hex(data)
    assert meta.size == len(data)
    assert httpx.URL(meta.location).host == CDN_HOST
    assert hub.request_count == 1 and hub.cdn.request_count == 0  # HEAD stops at the CDN hop
    assert hub.requests[0].method == "HEAD"

    by_commit = huggingface_hub.hf_hub_url(REPO, FILE, revision=meta.commit_hash, endpoint=hub.url)
    assert huggingface_hub.get_hf_file_metadata(by_commit).etag == sha256_hex(data)


def test_hf_errors_map_to_huggingface_hub_exceptions(hub: HubServer) -> None:
    hub.add_file(REPO, FILE, make_gguf(100))
    hub.add_file("acme/private", FILE, make_gguf(100))
    hub.require_token(REPO, TOKEN, kind="gated")
    hub.require_token("acme/private", TOKEN, kind="private")

    def meta(repo: str, filename: str = FILE, token: str | None = None, rev: str = "main"):
        url = huggingface_hub.hf_hub_url(repo, filename, revision=rev, endpoint=hub.url)
        return huggingface_hub.get_hf_file_metadata(url, token=token or False)

    assert meta(REPO, token=TOKEN).size == 100
    with pytest.raises(hf_errors.GatedRepoError) as e:
        meta(REPO)
    assert e.value.response.status_code == 401
    with pytest.raises(hf_errors.GatedRepoError) as e:
        meta(REPO, token="hf_other")
    assert e.value.response.status_code == 403
    with pytest.raises(hf_errors.RepositoryNotFoundError) as e:
        meta("acme/private")
    assert e.value.response.status_code == 401
    assert not isinstance(e.value, hf_errors.GatedRepoError)
    with pytest.raises(hf_errors.RepositoryNotFoundError):
        meta("acme/missing")
    with pytest.raises(hf_errors.EntryNotFoundError):  # RemoteEntryNotFoundError from 1.0 on
        meta(REPO, "nope.gguf", token=TOKEN)
    with pytest.raises(hf_errors.RevisionNotFoundError):
        meta(REPO, token=TOKEN, rev="v9")

    hub.reject_token("hf_revoked")
    with pytest.raises(hf_errors.HfHubHTTPError) as e:
        meta(REPO, token="hf_revoked")
    assert e.value.response.status_code == 401
    assert not isinstance(e.value, hf_errors.RepositoryNotFoundError)

    hub.delay(0.6)
    # The transport's own ReadTimeout: requests' (huggingface_hub 0.x), httpx's (1.x) or
    # httpx2's (2.x); llmlb_node classifies them by name (sources/http_errors.py).
    with pytest.raises(Exception) as e:
        huggingface_hub.get_hf_file_metadata(hub.file_url(REPO, FILE), token=TOKEN, timeout=0.3)
    assert type(e.value).__name__ == "ReadTimeout"

    hub.fail_5xx(1, status=503, retry_after=1)
    with pytest.raises(hf_errors.HfHubHTTPError) as e:
        meta(REPO, token=TOKEN)
    assert e.value.response.status_code == 503
    assert e.value.response.headers["retry-after"] == "1"
    assert meta(REPO, token=TOKEN).size == 100


def test_a_gated_repos_listing_is_public_its_files_are_not(hub: HubServer) -> None:
    hub.add_file(REPO, FILE, make_gguf(100))
    hub.require_token(REPO, TOKEN, kind="gated")
    api = huggingface_hub.HfApi(endpoint=hub.url)

    info = api.model_info(REPO, token=False, files_metadata=True)

    assert info.gated == "manual" and [s.rfilename for s in info.siblings or []] == [FILE]
    with pytest.raises(hf_errors.GatedRepoError):
        huggingface_hub.get_hf_file_metadata(hub.file_url(REPO, FILE), token=False)


def test_hf_hub_download_token_stays_on_hub(hub: HubServer, llmlb_env, tmp_path: Path) -> None:
    data = make_gguf(2 * 1024 * 1024 + 5)
    hub.add_file(REPO, f"q/{FILE}", data)
    hub.require_token(REPO, TOKEN)
    path = huggingface_hub.hf_hub_download(
        REPO, f"q/{FILE}", local_dir=tmp_path / "out", endpoint=hub.url, token=TOKEN
    )
    assert Path(path).read_bytes() == data
    assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}
    assert hub.cdn.request_count == 1
    assert hub.cdn.requests[0].authorization is None
    assert hub.cdn.bytes_sent == len(data)


def test_hf_api_listing(hub: HubServer) -> None:
    hub.add_file(REPO, FILE, make_gguf(100))
    hub.add_file(REPO, "split/part-00001-of-00002.gguf", make_gguf(200))
    hub.add_file(REPO, "README.md", b"# tiny\n", lfs=False)
    api = huggingface_hub.HfApi(endpoint=hub.url)
    assert sorted(api.list_repo_files(REPO)) == [
        "README.md",
        "split/part-00001-of-00002.gguf",
        FILE,
    ]
    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == hub.commit_of(REPO)
    sizes = {s.rfilename: (s.size, s.lfs.sha256 if s.lfs else None) for s in info.siblings}
    assert sizes[FILE] == (100, sha256_hex(make_gguf(100)))
    assert sizes["README.md"] == (7, None)
    top = {item.path for item in api.list_repo_tree(REPO)}
    assert top == {"README.md", "split", FILE}


def test_hub_non_lfs_file_and_change_content(hub: HubServer, client: httpx.Client) -> None:
    hub.add_file(REPO, "config.json", b"{}", lfs=False)
    r = client.get(hub.file_url(REPO, "config.json"))
    assert r.status_code == 200 and r.content == b"{}"
    assert "x-linked-etag" not in r.headers and len(r.headers["etag"]) == 42

    hub.add_file(REPO, FILE, make_gguf(500, seed=1))
    old_commit = hub.commit_of(REPO)
    hub.change_content(make_gguf(500, seed=2), repo=REPO, filename=FILE)
    assert hub.commit_of(REPO) != old_commit
    new = client.head(hub.file_url(REPO, FILE))
    old = client.head(hub.file_url(REPO, FILE, revision=old_commit))
    assert new.headers["x-linked-etag"] == f'"{sha256_hex(make_gguf(500, seed=2))}"'
    assert old.headers["x-linked-etag"] == f'"{sha256_hex(make_gguf(500, seed=1))}"'
    assert client.get(new.headers["location"]).content == make_gguf(500, seed=2)
    assert client.get(old.headers["location"]).content == make_gguf(500, seed=1)


def test_hub_and_cdn_faults_are_independent(hub: HubServer, client: httpx.Client) -> None:
    data = make_gguf(100_000)
    hub.add_file(REPO, FILE, data)
    hub.cdn.drop_after(10)
    r = client.head(hub.file_url(REPO, FILE))
    assert r.status_code == 302
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(r.headers["location"])
    hub.fail_5xx(1)
    assert client.head(hub.file_url(REPO, FILE)).status_code == 503
    assert client.get(r.headers["location"]).content == data


# ----------------------------------------------------------------------------- proxy


def test_proxy_auth_files_and_errors(proxy: ProxyServer, client: httpx.Client) -> None:
    main, extra = make_gguf(4000, seed=1), make_gguf(3000, seed=2)
    proxy.add_model("acme/multi:Q4", {"multi-00001-of-00002.gguf": main, "mm.gguf": extra})
    url = proxy.blob_url("acme/multi:Q4")
    assert "acme%2Fmulti%3AQ4" in url
    key = {"Authorization": "Bearer test-key"}

    assert client.get(url).status_code == 401
    assert client.get(url, headers={"Authorization": "Bearer nope"}).status_code == 401
    r = client.get(url, headers=key)
    assert r.status_code == 200 and r.content == main
    assert r.headers["etag"] == f'"{sha256_hex(main)}"'
    r = client.get(proxy.blob_url("acme/multi:Q4", "mm.gguf"), headers=key)
    assert r.content == extra
    r = client.get(url, headers={**key, "Range": "bytes=100-"})
    assert r.status_code == 206 and r.content == main[100:]
    assert client.head(url, headers=key).headers["content-length"] == str(len(main))

    r = client.get(proxy.blob_url("acme/unknown"), headers=key)
    assert r.status_code == 404 and "error" in r.json()
    assert client.get(proxy.blob_url("acme/multi:Q4", "x.gguf"), headers=key).status_code == 404

    proxy.change_content(make_gguf(4000, seed=9), model_id="acme/multi:Q4")
    assert (
        client.head(url, headers=key).headers["etag"] == f'"{sha256_hex(make_gguf(4000, seed=9))}"'
    )
    assert proxy.request_count == 9


def test_server_stops_cleanly_with_open_keep_alive_connections() -> None:
    server = ProxyServer()
    server.add_model("m", {"m.gguf": make_gguf(100)})
    c = httpx.Client()
    assert c.get(server.blob_url("m")).status_code == 200
    assert server.open_connections == 1
    before = threading.active_count()
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 10  # not the handler's 60 s keep-alive timeout
    assert threading.active_count() < before
    c.close()
