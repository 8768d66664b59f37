"""HTTP for the downloader: clients, ranged GETs that follow redirects with credentials scoped per
hop, a deadline on response headers, and reading what an answer's status and headers say."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from typing import Any

import httpx

from .. import __version__
from ..origin import may_carry_secret
from ..settings import Settings
from ..sources.base import Remote, fail

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_REDIRECTS = {301, 302, 303, 307, 308}
_MAX_REDIRECTS = 10
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*")
_READ_BLOCK = 256 * 1024


class RetryableStatus(Exception):
    """A status worth asking again for (429, 5xx), with the server's Retry-After."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.retry_after = _parse_retry_after(response.headers.get("retry-after"))
        super().__init__(f"HTTP {self.status}")


def new_client(settings: Settings, tls: bool) -> httpx.Client:
    s = settings
    return httpx.Client(
        timeout=httpx.Timeout(
            connect=s.connect_timeout,
            read=s.stall_timeout,  # the stall watchdog: no byte for this long
            write=s.stall_timeout,
            pool=None,
        ),
        # No connection is reused: each request's own connection is the one a header deadline
        # (`send_with_deadline`) can shut down; one handshake per file or range is nothing.
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=0),
        follow_redirects=False,  # we follow them ourselves, to scope credentials per host
        headers={"user-agent": f"llmlb-node/{__version__}", "accept-encoding": "identity"},
        verify=tls,  # http:// never negotiates TLS; https:// always verifies
    )


def send_with_deadline(
    client: httpx.Client, request: httpx.Request, deadline: float
) -> httpx.Response:
    """`client.send(request, stream=True)`, but the status line and headers must all arrive
    within `deadline` seconds: httpx's read timeout is per read, so a server trickling a header
    byte at a time would otherwise hold the request for hours. Past the deadline the socket is
    shut down and the request fails as a `httpx.ReadTimeout` (a stall)."""
    streams: list[Any] = []

    def trace(event: str, info: dict[str, Any]) -> None:
        stream = info.get("return_value")
        if event.endswith(("connect_tcp.complete", "start_tls.complete")) and stream is not None:
            streams.append(stream)

    request.extensions = {**request.extensions, "trace": trace}
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        sock = streams[-1].get_extra_info("socket") if streams else None
        if sock is not None:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown (SSLSocket's own one would drop its TLS state
                # under the reading thread): the blocked read wakes up at once.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    timer = threading.Timer(deadline, expire)
    timer.daemon = True
    timer.start()
    try:
        return client.send(request, stream=True)
    except httpx.TransportError as exc:
        if expired.is_set():
            raise httpx.ReadTimeout(
                f"the response headers did not arrive within {deadline:g}s", request=request
            ) from exc
        raise
    finally:
        timer.cancel()


def get_range(clients: Any, remote: Remote, range_header: str, deadline: float) -> httpx.Response:
    """GET `remote`'s URL with `range_header`, following redirects; the answer that is not a
    redirect, its body not yet read. `clients.client(url)` gives the client for a URL."""
    url = remote.url
    assert url is not None
    for _ in range(_MAX_REDIRECTS + 1):
        # Every URL, the first (a Hub's Location) and each redirect, must be http(s):
        # file:, ftp: and the like are refused at once, never retried.
        if _scheme(url) not in ("http", "https"):
            raise fail(remote.source, "http", f"not an http(s) URL: {url}", url)
        client = clients.client(url)
        headers = {"range": range_header} if range_header else {}
        request = client.build_request("GET", url, headers=headers)
        # Decided on the URL as httpx will connect to it, hop by hop: a redirect to another
        # port, host or scheme loses the secret.
        if remote.headers and may_carry_secret(str(request.url), remote.auth_origin):
            request.headers.update(remote.headers)
        response = send_with_deadline(client, request, deadline)
        if response.status_code not in _REDIRECTS:
            read_in_large_blocks(response)
            return response
        url = _next_hop(remote, response, url)
    raise fail(remote.source, "http", "too many redirects", remote.url)


def _next_hop(remote: Remote, response: httpx.Response, url: str) -> str:
    location = response.headers.get("location")
    response.close()
    if not location:
        raise fail(remote.source, "http", "redirect without a Location", url)
    try:
        return str(httpx.URL(url).join(location))
    except httpx.InvalidURL as exc:
        raise fail(remote.source, "http", f"bad redirect Location: {exc}", url) from exc


def raise_for_status(response: httpx.Response, remote: Remote, filename: str) -> None:
    """Raise for any status but 200 and 206: `RetryableStatus`, or this source's failure."""
    status = response.status_code
    if status in (200, 206):
        return
    if status in RETRY_STATUS:
        raise RetryableStatus(response)
    if status in (401, 403):
        kind = "unauthorized" if status == 401 else "forbidden"
        raise fail(remote.source, kind, _auth_advice(remote, status), remote.url)
    if status == 404:
        raise fail(remote.source, "not_found", f"HTTP 404 for {filename}", remote.url)
    raise fail(remote.source, "http", f"HTTP {status} for {filename}", remote.url)


def read_in_large_blocks(response: httpx.Response) -> bool:
    """Let the connection behind `response` read the body 256 KiB at a time instead of httpcore's
    64 KiB. Each read costs a fixed amount of Python work; on a fast link that work, not the
    network, was the limit (loopback, 253 MB: 741 -> 1054 MB/s, on par with curl).

    httpcore has no public knob for it, so this sets the attribute on this connection only
    (never the class), and does nothing if httpx or httpcore change their insides.
    """
    node: object = response.stream
    for _ in range(6):  # httpx's bound stream -> its transport's -> the pool's -> the connection
        if hasattr(node, "READ_NUM_BYTES"):
            node.READ_NUM_BYTES = _READ_BLOCK  # type: ignore[attr-defined]
            return True
        inner = [
            getattr(node, n)
            for n in ("_stream", "_httpcore_stream", "_connection")
            if hasattr(node, n)
        ]
        if not inner:
            return False
        node = inner[0]
    return False


def content_range(response: httpx.Response) -> tuple[int | None, int | None, int | None]:
    """(first, last, total) of ``Content-Range: bytes first-last/total``; None where absent."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
    if match is None:
        return None, None, None
    total = match[3]
    return int(match[1]), int(match[2]), None if total == "*" else int(total)


def int_header(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name, "").strip()
    return int(value) if value.isdigit() else None


def retry_delay(exc: BaseException, failures: int, base: float) -> float:
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        return min(retry_after, 60.0)
    return min(base * 2 ** max(failures - 1, 0), 8.0)


def _scheme(url: str) -> str | None:
    try:
        return httpx.URL(url).scheme
    except httpx.InvalidURL:
        return None


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _auth_advice(remote: Remote, status: int) -> str:
    if remote.source.startswith("huggingface"):
        return f"HTTP {status}: set HF_TOKEN, or accept the model's license on the Hub"
    if remote.source == "llmlb-proxy":
        return f"HTTP {status} from the llmlb proxy: check LLMLB_API_KEY"
    return f"HTTP {status}: the server refused access"
