"""Secrets go only to their exact origin (scheme, host, port), against real loopback servers."""

from __future__ import annotations

import base64
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from gguf import make_gguf
from servers import LOCALHOST, HubServer, LoopbackServer, ProxyServer
from world import FILENAME, MODEL_ID, REPO, World

from llmlb_node import ModelDownloadError
from llmlb_node.catalog import ModelFile
from llmlb_node.download import Downloader
from llmlb_node.origin import Origin, may_carry_secret, split_userinfo
from llmlb_node.sources.base import Remote
from llmlb_node.store import ModelStore

HUB = "https://huggingface.co"

# (request URL, the secret's origin, may it carry the secret?)
ORIGINS = [
    # the same origin, however it is spelled
    ("https://huggingface.co/x/resolve/main/f.gguf", HUB, True),
    ("https://huggingface.co:443/f", HUB, True),  # default port written out
    ("https://HuggingFace.CO/f", HUB, True),  # host names are case-insensitive
    ("HTTPS://huggingface.co/f", HUB, True),  # so are schemes
    ("https://huggingface.co./f", HUB, True),  # trailing dot: the same name
    ("https://huggingface.co/f", "https://huggingface.co.:443/", True),
    ("https://user:pw@huggingface.co/f", HUB, True),  # userinfo is not part of the origin
    ("http://lb:80/v0/models/blob/x", "http://lb", True),
    ("http://lb/v0", "http://u:p@lb:80/", True),
    ("https://bücher.example/f", "https://xn--bcher-kva.example", True),  # IDNA
    ("https://BÜCHER.example/f", "https://bücher.example:443", True),
    ("http://[::1]:8080/f", "http://[0:0:0:0:0:0:0:1]:8080", True),  # IPv6 literal, canonical
    ("http://[::FFFF:7F00:1]/f", "http://[::ffff:127.0.0.1]/", True),
    ("http://127.0.0.1:9000/a", "http://127.0.0.1:9000", True),
    # another origin
    ("http://huggingface.co/f", HUB, False),  # https -> http: never in clear text
    ("https://huggingface.co:8443/f", HUB, False),  # another port
    ("http://127.0.0.1:9001/a", "http://127.0.0.1:9000", False),
    ("http://127.0.0.2:9000/a", "http://127.0.0.1:9000", False),
    ("http://lb:8080/", "http://lb", False),
    ("https://lb/", "http://lb", False),  # not even an upgrade: the port differs too
    ("https://cdn-lfs.huggingface.co/f", HUB, False),  # a subdomain is another host
    ("https://huggingface.co.evil.example/f", HUB, False),
    ("https://evil.example/f?https://huggingface.co", HUB, False),
    ("https://huggingface.co@evil.example/f", HUB, False),  # userinfo tricks
    ("https://evil.example#@huggingface.co", HUB, False),
    ("https://xn--bcher-kva.example.evil/f", "https://bücher.example", False),
    ("http://[::1]:8080/f", "http://[::2]:8080", False),
    ("http://[::1]:8080/f", "http://127.0.0.1:8080", False),
    ("ftp://huggingface.co/f", "ftp://huggingface.co", False),  # only http(s) carries secrets
    ("file:///etc/passwd", HUB, False),
    ("huggingface.co/f", HUB, False),  # no scheme
    ("https:///f", HUB, False),  # no host
    ("https://huggingface.co:99999/f", HUB, False),  # a port that cannot be
    ("", HUB, False),
    ("https://huggingface.co/f", None, False),
    ("https://huggingface.co/f", "", False),
]


@pytest.mark.parametrize(("url", "origin", "allowed"), ORIGINS)
def test_may_carry_secret_table(url: str, origin: str | None, allowed: bool) -> None:
    assert may_carry_secret(url, origin) is allowed


def test_origin_normal_form() -> None:
    assert Origin.of("HTTPS://User:Pw@BÜCHER.Example.:443/p?q#f") == Origin(
        "https", "xn--bcher-kva.example", 443
    )
    assert Origin.of("http://[::FFFF:127.0.0.1]") == Origin("http", "::ffff:7f00:1", 80)
    assert may_carry_secret("http://127.0.0.1:80/", Origin("http", "127.0.0.1", 80))


def test_split_userinfo() -> None:
    assert split_userinfo("http://lb:8080/api") == ("http://lb:8080/api", None)
    assert split_userinfo("http://me:p%40ss%3Aw@lb:8080/api") == (
        "http://lb:8080/api",
        ("me", "p@ss:w"),
    )
    assert split_userinfo("https://token@lb") == ("https://lb", ("token", ""))


# -- the proxy's key -------------------------------------------------------------------------
class _Redirecting(ProxyServer):
    """A proxy whose blob endpoint for `tiny` answers 302 to `location` (others served normally)."""

    location = ""

    def handle_request(self, h, rec) -> None:  # noqa: ANN001
        if rec.path == self.PREFIX + MODEL_ID and self.location:
            self.send_bytes(h, rec, 302, b"", headers={"Location": self.location})
        else:
            super().handle_request(h, rec)


def test_the_llmlb_key_does_not_reach_another_port_on_the_proxys_host(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = LoopbackServer(host=LOCALHOST)  # same host name, another port
    other.add_path("/blobs/tiny.gguf", world.content)
    proxy = _Redirecting(api_key="test-key")
    proxy.location = f"{other.url}/blobs/tiny.gguf"
    try:
        monkeypatch.setenv("LLMLB_URL", proxy.url)
        world.hub.refuse()

        resolved = world.resolver().resolve(MODEL_ID)

        assert resolved.path.read_bytes() == world.content
        assert other.port != proxy.port and other.request_count >= 1
        assert {r.authorization for r in proxy.requests} == {"Bearer test-key"}
        assert {r.authorization for r in other.requests} == {None}
    finally:
        proxy.close()
        other.close()


def test_the_llmlb_key_follows_a_redirect_within_its_origin(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A same-origin redirect keeps the key (the proxy requires it on the second hop too).
    proxy = _Redirecting(api_key="test-key")
    proxy.add_model("elsewhere", {FILENAME: world.content})
    proxy.location = proxy.blob_url("elsewhere").replace(proxy.url, "")  # a relative Location
    try:
        monkeypatch.setenv("LLMLB_URL", proxy.url)
        world.hub.refuse()

        resolved = world.resolver().resolve(MODEL_ID)

        assert resolved.path.read_bytes() == world.content
        assert len(proxy.requests) >= 2
        assert {r.authorization for r in proxy.requests} == {"Bearer test-key"}
    finally:
        proxy.close()


# -- the Hub's token -------------------------------------------------------------------------
TOKEN = "hf_OnlyForTheHubEndpoint0123"


def test_hf_token_does_not_reach_a_cdn_on_the_hubs_host_but_another_port(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = HubServer(cdn_host=LOCALHOST)  # the "CDN" shares the Hub's host name
    try:
        hub.add_file(REPO, FILENAME, world.content)
        hub.require_token(REPO, TOKEN, kind="private")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)

        resolved = world.resolver().resolve(MODEL_ID)

        assert resolved.source == f"huggingface:{REPO}"
        assert resolved.path.read_bytes() == world.content
        assert hub.cdn.url.split(":")[1] == hub.url.split(":")[1]  # same host
        assert hub.cdn.port != hub.port and hub.cdn.request_count >= 1
        assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}
        assert {r.authorization for r in hub.cdn.requests} == {None}
    finally:
        hub.close()


def test_hf_token_goes_with_a_file_the_hub_serves_itself(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small non-LFS file is served by the Hub endpoint itself: same origin, token sent.
    content = make_gguf(2000, seed=5)
    world.hub.add_file("test-org/small-GGUF", "small.gguf", content, lfs=False)
    world.add_model("small", {"small.gguf": content}, repo="test-org/small-GGUF", on_hub=False)
    world.hub.require_token("test-org/small-GGUF", TOKEN, kind="private")
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    resolved = world.resolver().resolve("small")

    assert resolved.path.read_bytes() == content
    gets = [r for r in world.hub.requests if r.method == "GET"]
    assert gets and {r.authorization for r in gets} == {f"Bearer {TOKEN}"}


def test_the_llmlb_key_never_follows_https_to_http_on_the_same_host_and_port(
    world: World, monkeypatch: pytest.MonkeyPatch, tls: ssl.SSLContext
) -> None:
    proxy = _Redirecting()  # https and http on one port; the blob 302s from https to http
    proxy.serve_tls(tls)
    proxy.add_model("elsewhere", {FILENAME: world.content})
    proxy.location = proxy.blob_url("elsewhere")  # http://127.0.0.1:<same port>/...
    try:
        monkeypatch.setenv("LLMLB_URL", proxy.https_url)
        world.hub.refuse()

        resolved = world.resolver().resolve(MODEL_ID)

        assert resolved.path.read_bytes() == world.content
        by_scheme = {(r.scheme, r.authorization) for r in proxy.requests}
        assert ("https", "Bearer test-key") in by_scheme
        assert ("http", None) in by_scheme
        assert ("http", "Bearer test-key") not in by_scheme
    finally:
        proxy.close()


@pytest.fixture
def tls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[ssl.SSLContext]:
    """An ssl server context for 127.0.0.1 signed by a CA this test's clients trust."""
    import trustme

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(LOCALHOST).configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # httpx trusts our CA
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "ca.pem"))  # huggingface_hub 0.x
    _reset_hub_client()  # its shared client was built with other CAs
    yield context
    _reset_hub_client()


def _reset_hub_client() -> None:
    """Drop huggingface_hub's shared HTTP client, so the next one reads the CA settings again."""
    import huggingface_hub

    close = getattr(huggingface_hub, "close_session", None)  # 1.0 and later
    if close is None:
        from huggingface_hub.utils import reset_sessions as close  # 0.x, on requests
    close()


class _HubWithItsCdnOnItsOwnPort(HubServer):
    """A Hub on https whose LFS redirect goes to plain http at its own host and port."""

    def handle_request(self, h, rec) -> None:  # noqa: ANN001
        if rec.path.startswith("/repos/"):
            self.cdn.handle_request(h, rec)
        else:
            super().handle_request(h, rec)


def test_hf_token_never_follows_https_to_http_on_the_same_host_and_port(
    world: World, monkeypatch: pytest.MonkeyPatch, tls: ssl.SSLContext
) -> None:
    hub = _HubWithItsCdnOnItsOwnPort(cdn_host=LOCALHOST)
    hub.serve_tls(tls)
    hub.cdn.port = hub.port  # the CDN URLs the Hub hands out: http://127.0.0.1:<the Hub's port>
    try:
        hub.add_file(REPO, FILENAME, world.content)
        hub.require_token(REPO, TOKEN, kind="private")
        monkeypatch.setenv("HF_ENDPOINT", hub.https_url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)

        resolved = world.resolver().resolve(MODEL_ID)

        assert resolved.source == f"huggingface:{REPO}"
        assert resolved.path.read_bytes() == world.content
        seen = {(r.scheme, r.port, r.authorization) for r in hub.requests}
        assert seen == {("https", hub.port, f"Bearer {TOKEN}"), ("http", hub.port, None)}
    finally:
        hub.close()


def test_a_secret_never_crosses_a_scheme_downgrade(tmp_path: Path) -> None:
    # The secret belongs to https://127.0.0.1:<port>; the bytes are on http:// at the same
    # host and port. The downloader must fetch them without the header.
    server = LoopbackServer()
    content = make_gguf(5000, seed=2)
    server.add_path("/f.gguf", content)
    try:
        remote = Remote(
            source="huggingface:test",
            url=f"{server.url}/f.gguf",
            headers={"authorization": f"Bearer {TOKEN}"},
            auth_origin=server.url.replace("http://", "https://"),
        )
        partial = ModelStore(tmp_path).new_partial("m", "f.gguf")
        downloader = Downloader(_settings(tmp_path))
        try:
            fetched = downloader.fetch(remote, partial, ModelFile("f.gguf", len(content)))
        finally:
            downloader.close()

        assert Path(fetched.path).read_bytes() == content
        assert {r.authorization for r in server.requests} == {None}
    finally:
        server.close()


def _settings(tmp_path: Path):  # noqa: ANN202
    from llmlb_node import Settings

    return Settings.from_env({"LLMLB_HOME": str(tmp_path)}, retry_backoff=0.01)


# -- userinfo in LLMLB_URL -------------------------------------------------------------------
LLMLB_NODE = Path(sys.executable).with_name("llmlb-node")
PASSWORD = "pw-NeverLogThis-31337"


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    run_env = {k: v for k, v in os.environ.items() if k != "LLMLB_API_KEY"}
    done = subprocess.run(
        [str(LLMLB_NODE), *args],
        env={**run_env, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_llmlb_url_userinfo_is_used_for_auth_but_never_logged(world: World) -> None:
    proxy = ProxyServer(basic_auth=("node", PASSWORD))
    proxy.add_model(MODEL_ID, {FILENAME: world.content})
    world.hub.refuse()
    try:
        url = proxy.url.replace("http://", f"http://node:{PASSWORD}@")
        ok = _cli("-v", "pull", MODEL_ID, env={"LLMLB_URL": url})
        assert ok.returncode == 0, ok.stderr
        expected = "Basic " + base64.b64encode(f"node:{PASSWORD}".encode()).decode()
        assert {r.authorization for r in proxy.requests} == {expected}
        assert "DEBUG" in ok.stderr and proxy.url in ok.stderr  # -v did log the URL...
        outputs = [ok.stdout + ok.stderr]

        assert _cli("rm", MODEL_ID, env={}).returncode == 0
        wrong = url.replace(PASSWORD, PASSWORD + "x")
        failed = _cli("-v", "pull", MODEL_ID, env={"LLMLB_URL": wrong})
        assert failed.returncode == 4
        assert "unauthorized" in failed.stderr
        outputs.append(failed.stdout + failed.stderr)
        status = _cli("status", "--json", MODEL_ID, env={"LLMLB_URL": url})
        outputs.append(status.stdout + status.stderr)
    finally:
        proxy.close()

    for text in outputs:  # ...but never the credentials in it
        assert PASSWORD not in text
        assert base64.b64encode(f"node:{PASSWORD}".encode()).decode() not in text


def test_a_failure_names_the_proxy_url_without_its_credentials(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = ProxyServer(basic_auth=("node", PASSWORD))
    try:
        monkeypatch.setenv("LLMLB_URL", proxy.url.replace("http://", f"http://node:{PASSWORD}x@"))
        world.hub.refuse()
        with pytest.raises(ModelDownloadError) as info:
            world.resolver().resolve(MODEL_ID)
        failure = {f.source: f for f in info.value.failures}["llmlb-proxy"]
        assert failure.kind == "unauthorized"
        assert failure.url is not None and failure.url.startswith(proxy.url)
        assert PASSWORD not in str(info.value) and PASSWORD not in failure.url
    finally:
        proxy.close()
