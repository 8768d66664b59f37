"""Real loopback HTTP servers for tests: a Hugging Face Hub (+ its CDN on 127.0.0.2) and the proxy.

Standard library only; Range, HEAD, keep-alive, per-request records, byte counters, fault injection.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

CHUNK = 1 << 20  # body writes from memory (and corrupted file reads) go out in 1 MiB pieces
SENDFILE_CHUNK = 8 << 20  # sendfile(2) pieces for bodies served from a path
CDN_HOST = "127.0.0.2"
LOCALHOST = "127.0.0.1"
HTML_ERROR_PAGE = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><p>The upstream server is unavailable.</p></body></html>"
)
_XOR = bytes(b ^ 0xFF for b in range(256))
_HEX40 = re.compile(r"[0-9a-f]{40}")
_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")
_UNSATISFIABLE = "unsatisfiable"
_ALL = ("GET", "HEAD")
_S = TypeVar("_S", bound="LoopbackServer")


# --------------------------------------------------------------------------- content


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


@dataclass(frozen=True)
class Blob:
    """Immutable file content: in memory (`data`) or on disk (`path`), with its size and sha256."""

    size: int
    sha256: str
    data: bytes | None = None
    path: str | None = None

    @classmethod
    def of(cls, content: Content, sha256: str | None = None) -> Blob:
        """bytes-like -> in memory; str / PathLike -> served from that file; a Blob as is.

        `sha256` skips hashing a large file the caller already knows (write_gguf returns it).
        """
        if isinstance(content, Blob):
            return content
        if isinstance(content, (bytes, bytearray, memoryview)):
            data = bytes(content)
            return cls(len(data), sha256 or hashlib.sha256(data).hexdigest(), data=data)
        path = os.fspath(content)
        return cls(os.path.getsize(path), sha256 or _sha256_file(path), path=path)

    @property
    def etag(self) -> str:
        """The quoted sha256, as the Hub's LFS ETag and the proxy's ETag."""
        return f'"{self.sha256}"'

    def read(self, start: int = 0, length: int | None = None) -> bytes:
        """Bytes [start, start+length) (to the end when length is None)."""
        end = self.size if length is None else min(self.size, start + length)
        if self.data is not None:
            return self.data[start:end]
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(max(0, end - start))

    def lfs_pointer(self) -> bytes:
        """The git-lfs pointer file git stores in place of this content."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            f"size {self.size}\n"
        ).encode()

    def git_sha1(self) -> str:
        """Git blob id of the raw content (what the Hub uses as ETag for non-LFS files)."""
        digest = hashlib.sha1(b"blob %d\0" % self.size)
        if self.data is not None:
            digest.update(self.data)
        else:
            assert self.path is not None
            with open(self.path, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
        return digest.hexdigest()


Content = bytes | bytearray | memoryview | str | os.PathLike | Blob


@dataclass
class RecordedRequest:
    """One request as a server saw it (headers with lowercased names)."""

    method: str
    path: str  # URL path as sent (still percent-encoded), without the query
    query: str  # raw query string ("" if none)
    params: dict[str, str]  # decoded query parameters (last value wins)
    headers: dict[str, str]
    host: str  # address of the server that received it
    port: int
    client: tuple[str, int]
    time: float  # time.monotonic() at arrival
    body: bytes = b""
    status: int | None = None  # status line sent back (None if nothing was sent)
    body_bytes: int = 0  # response body bytes actually written
    scheme: str = "http"  # "https" when it arrived over TLS (see LoopbackServer.serve_tls)

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


class _Aborted(Exception):
    """The response was cut on purpose (fault or server closing): drop the connection."""


# --------------------------------------------------------------------------- plumbing


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llmlb-test-server"
    sys_version = ""
    timeout = 60  # idle keep-alive connections and stuck writes give up after this
    server: _HTTPServer

    def setup(self) -> None:
        tls = self.server.owner.tls
        if tls is not None:
            with contextlib.suppress(OSError):  # a failed handshake: the client sees it fail
                if self.request.recv(1, socket.MSG_PEEK) == b"\x16":
                    # A TLS ClientHello: this connection speaks https, the port's others may not.
                    self.request = tls.wrap_socket(self.request, server_side=True)
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.bucket_tokens: float | None = None
        self.bucket_time = 0.0
        self.server.owner._register(self)

    def handle(self) -> None:
        with contextlib.suppress(OSError, _Aborted):
            super().handle()

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError):
                super().finish()
        finally:
            self.server.owner._unregister(self)

    def _dispatch(self) -> None:
        self.server.owner._dispatch(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], owner: LoopbackServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn (a DNS lookup): skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def refused_url(host: str = LOCALHOST) -> str:
    """URL of a port that was just bound then closed, so connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return f"http://{host}:{port}"


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """(start, end_exclusive), _UNSATISFIABLE, or None (ignore: malformed or multi-range)."""
    m = _RANGE.fullmatch(value)
    if not m or (not m[1] and not m[2]):
        return None
    if not m[1]:  # suffix range: the last N bytes
        suffix = int(m[2])
        if suffix == 0 or size == 0:
            return _UNSATISFIABLE
        return max(0, size - suffix), size
    start = int(m[1])
    if m[2] and int(m[2]) < start:
        return None
    if start >= size:
        return _UNSATISFIABLE
    end = min(size, int(m[2]) + 1) if m[2] else size
    return start, end


def _corrupt(chunk: bytes, offset: int) -> bytes:
    """Flip every bit of `chunk` (at absolute `offset`) except the 4-byte GGUF magic."""
    keep = max(0, min(len(chunk), 4 - offset))
    return chunk[:keep] + chunk[keep:].translate(_XOR)


# --------------------------------------------------------------------------- base server


class LoopbackServer:
    """A threaded HTTP/1.1 server on `host` (port 0 = ephemeral) with faults and counters.

    On its own it serves blobs registered with `add_path`; subclasses override `handle_request`.
    Every fault setter is thread-safe and may be called while requests are in flight.
    """

    def __init__(self, host: str = LOCALHOST, port: int = 0) -> None:
        self.host = host
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._conns: dict[_Handler, threading.Thread] = {}
        self._faults: dict[str, list[Any]] = {}  # name -> [remaining, params]
        self._rate: float | None = None
        self._ignore_range = False
        self._paths: dict[str, Blob] = {}
        self.tls: ssl.SSLContext | None = None
        self.requests: list[RecordedRequest] = []
        self.bytes_sent = 0
        self.connections_opened = 0
        self.in_flight = 0  # requests being answered right now
        self.max_in_flight = 0  # the most answered at once since the last reset_counters()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._start((host, port))
        self.port: int = self._httpd.server_address[1]  # type: ignore[union-attr]

    # -- lifecycle

    def _start(self, address: tuple[str, int]) -> None:
        self._httpd = _HTTPServer(address, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}:{address[0]}",
            daemon=True,
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def https_url(self) -> str:
        """The same port over TLS (after `serve_tls`)."""
        return f"https://{self.host}:{self.port}"

    def serve_tls(self, context: ssl.SSLContext) -> None:
        """Answer TLS connections too, on the same port: each connection's first byte decides,
        so one server can be both https:// and http:// at one host and port."""
        self.tls = context

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stop_listening(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(5)

    def _drop_connections(self) -> list[threading.Thread]:
        with self._lock:
            conns = list(self._conns.items())
        for handler, _ in conns:
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
        return [t for _, t in conns]

    def refuse(self) -> None:
        """Stop listening (the port now refuses connections) and drop open connections."""
        self._stop_listening()
        self._drop_connections()

    def restore(self) -> None:
        """Listen again on the same port after `refuse()`."""
        if self._httpd is None and not self._closing.is_set():
            self._start((self.host, self.port))

    def close(self) -> None:
        """Stop serving, wake stalled responses, close every connection and join the threads."""
        self._closing.set()
        self._stop_listening()
        for t in self._drop_connections():
            if t is not threading.current_thread():
                t.join(5)

    # -- counters

    @property
    def request_count(self) -> int:
        return len(self.requests)

    def reset_counters(self) -> None:
        """Forget recorded requests; zero `bytes_sent`, `connections_opened`, `max_in_flight`."""
        with self._lock:
            self.requests.clear()
            self.bytes_sent = 0
            self.connections_opened = 0
            self.max_in_flight = self.in_flight

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _register(self, handler: _Handler) -> None:
        with self._lock:
            self._conns[handler] = threading.current_thread()
            self.connections_opened += 1

    def _unregister(self, handler: _Handler) -> None:
        with self._lock:
            self._conns.pop(handler, None)

    def _count(self, rec: RecordedRequest, n: int) -> None:
        with self._lock:
            self.bytes_sent += n
            rec.body_bytes += n

    # -- faults

    def _set_fault(self, name: str, n: int | None, **params: Any) -> None:
        with self._lock:
            if n is not None and n <= 0:
                self._faults.pop(name, None)
            else:
                self._faults[name] = [math.inf if n is None else n, params]

    def _take(self, name: str, method: str) -> dict[str, Any] | None:
        with self._lock:
            fault = self._faults.get(name)
            if fault is None or method not in fault[1].get("methods", ("GET",)):
                return None
            fault[0] -= 1
            if fault[0] <= 0:
                del self._faults[name]
            return fault[1]

    def fail_5xx(
        self,
        n: int = 1,
        status: int = 503,
        retry_after: float | None = None,
        methods: Iterable[str] = _ALL,
    ) -> None:
        """The next `n` requests (GET and HEAD by default) get `status` (+ Retry-After)."""
        self._set_fault("5xx", n, status=status, retry_after=retry_after, methods=tuple(methods))

    def fail_status(
        self,
        status: int,
        n: int | None = None,
        headers: Mapping[str, str] | None = None,
        methods: Iterable[str] = _ALL,
    ) -> None:
        """Answer `status` (JSON body, optional extra headers) n times, or always if n is None."""
        self._set_fault(
            "status", n, status=status, headers=dict(headers or {}), methods=tuple(methods)
        )

    def delay(self, seconds: float, n: int = 1, methods: Iterable[str] = _ALL) -> None:
        """The next `n` requests wait `seconds` before any response byte (then answer normally).

        For read timeouts on header-only exchanges (HEAD, 302); close() cuts the wait short.
        """
        self._set_fault("delay", n, seconds=seconds, methods=tuple(methods))

    def serve_html(self, n: int | None = None, methods: Iterable[str] = _ALL) -> None:
        """Answer 200 text/html with an error page instead of the file (captive portal style)."""
        self._set_fault("html", n, methods=tuple(methods))

    def drop_after(self, nbytes: int, n: int = 1, reset: bool = False) -> None:
        """The next `n` GET bodies stop after `nbytes` and the connection is cut.

        reset=False: shutdown+close (client sees EOF before Content-Length: RemoteProtocolError);
        reset=True: RST via SO_LINGER 0 (client sees ConnectionResetError: ReadError).
        """
        self._set_fault("drop", n, nbytes=nbytes, reset=reset)

    def stall_after(self, nbytes: int, seconds: float, n: int = 1) -> None:
        """The next `n` GET bodies send `nbytes`, go silent for `seconds`, then close.

        The silence ends early when the server is closed, so teardown never waits for it.
        """
        self._set_fault("stall", n, nbytes=nbytes, seconds=seconds)

    def serve_wrong_bytes(self, n: int | None = None) -> None:
        """Serve same-length bodies with every byte after the GGUF magic flipped."""
        self._set_fault("wrong", n)

    def rate_limit(self, bytes_per_s: float | None) -> None:
        """Cap each connection's body rate (token bucket, 20 ms burst); None = uncapped."""
        self._rate = float(bytes_per_s) if bytes_per_s else None

    def ignore_range(self, flag: bool = True) -> None:
        """Answer 200 with the full body even when a Range is asked."""
        self._ignore_range = flag

    def clear_faults(self) -> None:
        """Remove every pending fault, the rate limit and ignore_range."""
        with self._lock:
            self._faults.clear()
        self._rate = None
        self._ignore_range = False

    def pending_faults(self) -> dict[str, float]:
        """Fault name -> remaining count (inf = always)."""
        with self._lock:
            return {name: f[0] for name, f in self._faults.items()}

    # -- generic static content

    def add_path(self, path: str, content: Content) -> Blob:
        """Serve `content` at URL `path` (base server only)."""
        blob = Blob.of(content)
        with self._lock:
            self._paths[path] = blob
        return blob

    def change_content(self, content: Content, path: str | None = None) -> Blob:
        """Replace what `path` serves (the only path if omitted): new bytes, new ETag."""
        if path is None:
            (path,) = self._paths
        return self.add_path(path, content)

    # -- request handling

    def _dispatch(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        rec = RecordedRequest(
            method=h.command,
            path=split.path,
            query=split.query,
            params={k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()},
            headers={k.lower(): v for k, v in h.headers.items()},
            host=self.host,
            port=self.port,
            client=h.client_address,
            time=time.monotonic(),
            scheme="https" if isinstance(h.connection, ssl.SSLSocket) else "http",
        )
        length = int(rec.headers.get("content-length") or 0)
        if length:
            rec.body = h.rfile.read(length)
        with self._lock:
            self.requests.append(rec)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if not self._injected_response(h, rec):
                self.handle_request(h, rec)
        except (_Aborted, OSError):
            h.close_connection = True
            raise _Aborted from None
        finally:
            with self._lock:
                self.in_flight -= 1

    def _injected_response(self, h: _Handler, rec: RecordedRequest) -> bool:
        fault = self._take("delay", rec.method)
        if fault is not None and self._closing.wait(fault["seconds"]):
            raise _Aborted
        fault = self._take("status", rec.method)
        if fault is not None:
            body = {"error": f"injected HTTP {fault['status']}"}
            self.send_json(h, rec, fault["status"], body, fault["headers"])
            return True
        fault = self._take("5xx", rec.method)
        if fault is not None:
            headers = {}
            if fault["retry_after"] is not None:
                headers["Retry-After"] = f"{fault['retry_after']:g}"
            self.send_bytes(
                h, rec, fault["status"], b"injected server error\n", "text/plain", headers
            )
            return True
        if self._take("html", rec.method) is not None:
            self.send_bytes(h, rec, 200, HTML_ERROR_PAGE, "text/html; charset=utf-8")
            return True
        return False

    def handle_request(self, h: _Handler, rec: RecordedRequest) -> None:
        """Route one request; the base server serves `add_path` blobs."""
        blob = self._paths.get(rec.path)
        if rec.method not in _ALL:
            self.send_bytes(
                h, rec, 405, b"method not allowed\n", "text/plain", {"Allow": "GET, HEAD"}
            )
        elif blob is None:
            self.send_bytes(h, rec, 404, b"not found\n", "text/plain")
        else:
            self.send_blob(h, rec, blob)

    # -- response helpers (for subclasses)

    def send_head(
        self, h: _Handler, rec: RecordedRequest, status: int, headers: Iterable[tuple[str, str]]
    ) -> None:
        """Status line + headers (the caller includes Content-Length)."""
        h.send_response(status)
        for name, value in headers:
            h.send_header(name, value)
        rec.status = status  # before the headers leave: the client may look right after
        h.end_headers()

    def send_bytes(
        self,
        h: _Handler,
        rec: RecordedRequest,
        status: int,
        body: bytes,
        content_type: str = "application/octet-stream",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """A small complete response (no body on HEAD, Content-Length still announced)."""
        items = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        self.send_head(h, rec, status, [*items, *(headers or {}).items()])
        if rec.method != "HEAD" and body:
            self._count(rec, len(body))
            h.wfile.write(body)

    def send_json(
        self,
        h: _Handler,
        rec: RecordedRequest,
        status: int,
        obj: Any,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        body = json.dumps(obj).encode()
        self.send_bytes(h, rec, status, body, "application/json; charset=utf-8", headers)

    def send_blob(
        self,
        h: _Handler,
        rec: RecordedRequest,
        blob: Blob,
        headers: Mapping[str, str] | None = None,
        etag: str | None = None,
    ) -> None:
        """Serve `blob` with Range/If-Range/HEAD support and the body faults."""
        etag = etag or blob.etag
        size = blob.size
        start, end, status = 0, size, 200
        wanted = rec.headers.get("range")
        if_range = rec.headers.get("if-range")
        if wanted and not self._ignore_range and (if_range is None or if_range == etag):
            parsed = _parse_range(wanted, size)
            if parsed == _UNSATISFIABLE:
                self.send_bytes(
                    h, rec, 416, b"", "text/plain", {"Content-Range": f"bytes */{size}"}
                )
                return
            if isinstance(parsed, tuple):
                (start, end), status = parsed, 206
        items = [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(end - start)),
            ("Accept-Ranges", "bytes"),
            ("ETag", etag),
            *(headers or {}).items(),
        ]
        if status == 206:
            items.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        if rec.method == "HEAD":
            self.send_head(h, rec, status, items)
            return
        wrong = self._take("wrong", "GET") is not None
        cut = self._take("drop", "GET")
        stall = None if cut is not None else self._take("stall", "GET")
        self.send_head(h, rec, status, items)
        limit = (cut or stall or {}).get("nbytes")
        self._stream(h, rec, blob, start, end if limit is None else min(end, start + limit), wrong)
        if limit is not None and start + limit < end:
            if stall is not None:
                self._closing.wait(stall["seconds"])
            self._abort(h, reset=bool(cut and cut["reset"]))

    def _stream(
        self, h: _Handler, rec: RecordedRequest, blob: Blob, start: int, end: int, wrong: bool
    ) -> None:
        sock = h.connection
        pos = start
        view = memoryview(blob.data) if blob.data is not None else None
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(open(blob.path, "rb")) if blob.path is not None else None
            while pos < end:
                if self._closing.is_set():
                    raise _Aborted
                step = CHUNK if view is not None or wrong else SENDFILE_CHUNK
                n = self._throttle(h, min(end - pos, step))
                if f is None or wrong:
                    if view is not None:
                        payload: bytes | memoryview = view[pos : pos + n]
                    else:
                        assert f is not None
                        f.seek(pos)
                        payload = f.read(n)
                    if wrong:
                        payload = _corrupt(bytes(payload), pos)
                    n = len(payload)
                    if n == 0:
                        raise _Aborted
                    # Count first: a client holding the bytes must already see them counted.
                    self._count(rec, n)
                    try:
                        sock.sendall(payload)
                    except OSError:
                        self._count(rec, -n)
                        raise
                else:
                    self._count(rec, n)
                    try:
                        sent = sock.sendfile(f, offset=pos, count=n)
                    except OSError:
                        self._count(rec, -n)
                        raise
                    if sent != n:
                        self._count(rec, sent - n)
                    if sent == 0:
                        raise _Aborted
                    n = sent
                pos += n

    def _throttle(self, h: _Handler, want: int) -> int:
        rate = self._rate
        if not rate:
            return want
        burst = max(1.0, rate / 50)
        n = max(1, min(want, int(burst)))
        while True:
            now = time.monotonic()
            if h.bucket_tokens is None:
                h.bucket_tokens = burst
            else:
                h.bucket_tokens = min(burst, h.bucket_tokens + (now - h.bucket_time) * rate)
            h.bucket_time = now
            if h.bucket_tokens >= n:
                h.bucket_tokens -= n
                return n
            if self._closing.wait((n - h.bucket_tokens) / rate):
                raise _Aborted

    def _abort(self, h: _Handler, reset: bool = False) -> None:
        h.close_connection = True
        sock = h.connection
        with contextlib.suppress(OSError):
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                os.close(sock.detach())  # RST now, whatever still references the socket object
            else:
                sock.shutdown(socket.SHUT_RDWR)
        raise _Aborted


# --------------------------------------------------------------------------- Hub + CDN


class CdnServer(LoopbackServer):
    """The Hub's LFS/Xet CDN stand-in: serves `/repos/<repo hash>/<sha256>?<signature>`."""

    def __init__(self, host: str = CDN_HOST, port: int = 0) -> None:
        self._objects: dict[str, tuple[Blob, str]] = {}
        super().__init__(host, port)

    def put(self, repo: str, blob: Blob, filename: str) -> str:
        """Store `blob`; return its signed-looking absolute URL."""
        with self._lock:
            self._objects[blob.sha256] = (blob, filename)
        name = quote(os.path.basename(filename), safe="")
        repo_hash = hashlib.sha256(repo.encode()).hexdigest()[:40]
        return (
            f"{self.url}/repos/{repo_hash[:2]}/{repo_hash[2:4]}/{repo_hash}/{blob.sha256}"
            f"?response-content-disposition=attachment%3B+filename%2A%3DUTF-8%27%27{name}"
            f"&Expires={int(time.time()) + 3600}&Signature={secrets.token_hex(16)}"
            f"&Key-Pair-Id=K3TESTKEYPAIR"
        )

    def handle_request(self, h: _Handler, rec: RecordedRequest) -> None:
        sha = rec.path.rsplit("/", 1)[-1]
        entry = self._objects.get(sha) if rec.path.startswith("/repos/") else None
        if rec.method not in _ALL:
            self.send_bytes(h, rec, 405, b"method not allowed\n", "text/plain")
        elif entry is None:
            body = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>"
            self.send_bytes(h, rec, 403, body, "application/xml")
        else:
            blob, filename = entry
            name = os.path.basename(filename)
            disposition = f"attachment; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"
            self.send_blob(h, rec, blob, {"Content-Disposition": disposition})


@dataclass
class _Repo:
    name: str
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit
    trees: dict[str, dict[str, tuple[Blob, bool]]] = field(default_factory=dict)  # commit -> files
    tokens: set[str] = field(default_factory=set)
    access: str | None = None  # None (public), "gated" or "private"


def _new_commit() -> str:
    return secrets.token_hex(20)


class HubServer(LoopbackServer):
    """The Hugging Face Hub file API as huggingface_hub 2.x speaks it (point HF_ENDPOINT here).

    `/{repo}/resolve/{rev}/{file}` answers 302 to `.cdn` (a CdnServer on 127.0.0.2) for LFS
    files, with X-Repo-Commit / X-Linked-Etag / X-Linked-Size / ETag; non-LFS files are served
    directly. `/api/models/{repo}[/revision/{rev}]` and `/api/models/{repo}/tree/{rev}[/{path}]`
    answer like the Hub's JSON API (enough for HfApi.model_info / list_repo_files / list_repo_tree).
    """

    def __init__(self, host: str = LOCALHOST, port: int = 0, cdn_host: str = CDN_HOST) -> None:
        self.cdn = CdnServer(cdn_host)
        self._repos: dict[str, _Repo] = {}
        self._bad_tokens: set[str] = set()
        try:
            super().__init__(host, port)
        except BaseException:
            self.cdn.close()
            raise

    def close(self) -> None:
        super().close()
        self.cdn.close()

    def total_requests(self) -> int:
        """Hub + CDN requests."""
        return self.request_count + self.cdn.request_count

    def total_bytes_sent(self) -> int:
        """Hub + CDN body bytes."""
        return self.bytes_sent + self.cdn.bytes_sent

    def all_requests(self) -> list[RecordedRequest]:
        """Hub and CDN requests merged in arrival order."""
        return sorted([*self.requests, *self.cdn.requests], key=lambda r: r.time)

    def reset_counters(self) -> None:
        """Reset the Hub's and the CDN's counters."""
        super().reset_counters()
        self.cdn.reset_counters()

    # -- repository content

    def _repo(self, repo: str) -> _Repo:
        with self._lock:
            return self._repos.setdefault(repo, _Repo(repo))

    def add_file(
        self,
        repo: str,
        filename: str,
        content: Content,
        revision: str = "main",
        commit: str | None = None,
        lfs: bool = True,
    ) -> Blob:
        """Put `filename` in `repo` at `revision` (a branch, or a 40-hex commit).

        Files added to the same branch share its commit unless `commit` names a new one (the new
        commit starts from the branch's previous files). LFS files redirect to the CDN; non-LFS
        files are served by the Hub itself with the git blob sha1 as ETag.
        """
        blob = Blob.of(content)
        r = self._repo(repo)
        with self._lock:
            if _HEX40.fullmatch(revision):
                commit, branch = revision, None
            else:
                branch = revision
                commit = commit or r.branches.get(branch) or _new_commit()
            base = r.trees.get(r.branches.get(branch, ""), {}) if branch else {}
            tree = r.trees.setdefault(commit, dict(base))
            tree[filename] = (blob, lfs)
            if branch:
                r.branches[branch] = commit
        if lfs:
            self.cdn.put(repo, blob, filename)
        return blob

    def change_content(
        self,
        content: Content,
        repo: str | None = None,
        filename: str | None = None,
        revision: str = "main",
        commit: str | None = None,
    ) -> Blob:
        """New bytes for a file in a new commit on `revision` (defaults: the only repo/file).

        The old commit still resolves to the old bytes, like on the Hub.
        """
        if repo is None:
            (repo,) = self._repos
        r = self._repos[repo]
        if filename is None:
            (filename,) = r.trees[r.branches[revision]]
        lfs = r.trees[r.branches[revision]][filename][1]
        return self.add_file(repo, filename, content, revision, commit or _new_commit(), lfs)

    def commit_of(self, repo: str, revision: str = "main") -> str:
        """The commit a branch points to."""
        return self._repos[repo].branches[revision]

    def require_token(self, repo: str, token: str | Iterable[str], kind: str = "gated") -> None:
        """Make `repo` gated or private: only `Authorization: Bearer <token>` gets in.

        gated: no token -> 401 GatedRepo, other token -> 403 GatedRepo.
        private: no token -> 401 RepoNotFound, other token -> 404 RepoNotFound.
        """
        if kind not in ("gated", "private"):
            raise ValueError(f"kind must be 'gated' or 'private', not {kind!r}")
        r = self._repo(repo)
        with self._lock:
            r.access = kind
            r.tokens = {token} if isinstance(token, str) else set(token)

    def reject_token(self, token: str) -> None:
        """Treat `token` as invalid: 401 "Invalid credentials in Authorization header"."""
        self._bad_tokens.add(token)

    def file_url(self, repo: str, filename: str, revision: str = "main") -> str:
        """What huggingface_hub.hf_hub_url builds for this endpoint."""
        return f"{self.url}/{repo}/resolve/{quote(revision, safe='')}/{quote(filename)}"

    # -- routing

    def _error(
        self, h: _Handler, rec: RecordedRequest, status: int, code: str | None, message: str
    ) -> None:
        headers = {"X-Error-Message": message, "X-Request-Id": f"Root={secrets.token_hex(8)}"}
        if code:
            headers["X-Error-Code"] = code
        self.send_json(h, rec, status, {"error": message}, headers)

    def _access(
        self, h: _Handler, rec: RecordedRequest, repo: str, listing: bool = False
    ) -> _Repo | None:
        """The repo if this request may read it, else answer the Hub's error and return None.

        A gated repo's `listing` (model info, tree) is public, as on the Hub: only its files
        need a token that was granted access."""
        auth = rec.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if token is not None and token in self._bad_tokens:
            self._error(h, rec, 401, None, "Invalid credentials in Authorization header")
            return None
        r = self._repos.get(repo)
        if r is None or not r.trees:
            self._error(h, rec, 404 if token else 401, "RepoNotFound", "Repository not found")
            return None
        if r.access is None or token in r.tokens or (listing and r.access == "gated"):
            return r
        if r.access == "private":
            self._error(h, rec, 404 if token else 401, "RepoNotFound", "Repository not found")
        elif token is None:
            message = (
                f"Access to model {repo} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in."
            )
            self._error(h, rec, 401, "GatedRepo", message)
        else:
            message = (
                f"Access to model {repo} is restricted and you are not in the authorized list. "
                f"Visit {self.url}/{repo} to ask for access."
            )
            self._error(h, rec, 403, "GatedRepo", message)
        return None

    def _commit(self, h: _Handler, rec: RecordedRequest, r: _Repo, revision: str) -> str | None:
        commit = r.branches.get(revision)
        if commit is None and revision in r.trees:
            commit = revision
        if commit is None:
            self._error(h, rec, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def handle_request(self, h: _Handler, rec: RecordedRequest) -> None:
        parts = rec.path.lstrip("/").split("/")
        if rec.method not in _ALL:
            self._error(h, rec, 405, None, "Method not allowed")
        elif parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(h, rec, parts[2:])
        elif "resolve" in parts[1:3] and len(parts) > parts.index("resolve") + 2:
            i = parts.index("resolve")
            repo = unquote("/".join(parts[:i]))
            revision = unquote(parts[i + 1])
            filename = unquote("/".join(parts[i + 2 :]))
            self._resolve(h, rec, repo, revision, filename)
        else:
            self._error(h, rec, 404, None, "Sorry, we can't find the page you are looking for.")

    def _resolve(
        self, h: _Handler, rec: RecordedRequest, repo: str, revision: str, filename: str
    ) -> None:
        r = self._access(h, rec, repo)
        if r is None:
            return
        commit = self._commit(h, rec, r, revision)
        if commit is None:
            return
        entry = r.trees[commit].get(filename)
        if entry is None:
            self._error_with_commit(h, rec, commit)
            return
        blob, lfs = entry
        common = {"X-Repo-Commit": commit, "X-Request-Id": f"Root={secrets.token_hex(8)}"}
        if not lfs:
            self.send_blob(h, rec, blob, common, etag=f'"{blob.git_sha1()}"')
            return
        location = self.cdn.put(repo, blob, filename)
        headers = {
            **common,
            "Location": location,
            "X-Linked-Etag": blob.etag,
            "X-Linked-Size": str(blob.size),
            "ETag": blob.etag,
            "Accept-Ranges": "bytes",
            "Vary": "Origin, Accept",
        }
        self.send_bytes(h, rec, 302, b"", "text/plain; charset=utf-8", headers)

    def _error_with_commit(self, h: _Handler, rec: RecordedRequest, commit: str) -> None:
        headers = {
            "X-Error-Code": "EntryNotFound",
            "X-Error-Message": "Entry not found",
            "X-Repo-Commit": commit,
        }
        self.send_json(h, rec, 404, {"error": "Entry not found"}, headers)

    def _api(self, h: _Handler, rec: RecordedRequest, parts: list[str]) -> None:
        repo = unquote("/".join(parts[:2]))
        rest = parts[2:]
        r = self._access(h, rec, repo, listing=True)
        if r is None:
            return
        if not rest or (rest[0] == "revision" and len(rest) == 2):
            commit = self._commit(h, rec, r, unquote(rest[1]) if rest else "main")
            if commit is not None:
                self.send_json(h, rec, 200, self._model_info(r, commit, rec.params))
        elif rest[0] == "tree" and len(rest) >= 2:
            commit = self._commit(h, rec, r, unquote(rest[1]))
            if commit is not None:
                prefix = unquote("/".join(rest[2:])).strip("/")
                recursive = rec.params.get("recursive", "").lower() == "true"
                self.send_json(h, rec, 200, self._tree(r.trees[commit], prefix, recursive))
        else:
            self._error(h, rec, 404, None, "Not found")

    def _model_info(self, r: _Repo, commit: str, params: Mapping[str, str]) -> dict[str, Any]:
        blobs = params.get("blobs", "").lower() == "true"
        siblings = []
        for name, (blob, lfs) in sorted(r.trees[commit].items()):
            sibling: dict[str, Any] = {"rfilename": name}
            if blobs:
                pointer = blob.lfs_pointer()
                sibling["size"] = blob.size
                sibling["blobId"] = _git_sha1(pointer) if lfs else blob.git_sha1()
                if lfs:
                    sibling["lfs"] = {
                        "sha256": blob.sha256,
                        "size": blob.size,
                        "pointerSize": len(pointer),
                    }
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(r.name.encode()).hexdigest()[:24],
            "id": r.name,
            "modelId": r.name,
            "author": r.name.split("/")[0] if "/" in r.name else None,
            "sha": commit,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "createdAt": "2025-01-01T00:00:00.000Z",
            "private": r.access == "private",
            "gated": "manual" if r.access == "gated" else False,
            "disabled": False,
            "tags": ["gguf"],
            "library_name": "gguf",
            "siblings": siblings,
        }

    @staticmethod
    def _tree(
        files: Mapping[str, tuple[Blob, bool]], prefix: str, recursive: bool
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        folders: set[str] = set()
        base = f"{prefix}/" if prefix else ""
        for name, (blob, lfs) in sorted(files.items()):
            if not name.startswith(base):
                continue
            rel = name[len(base) :].split("/")
            for depth in range(1, len(rel) if recursive else min(2, len(rel))):
                folders.add(base + "/".join(rel[:depth]))
            if len(rel) > 1 and not recursive:
                continue
            pointer = blob.lfs_pointer()
            item: dict[str, Any] = {
                "type": "file",
                "oid": _git_sha1(pointer) if lfs else blob.git_sha1(),
                "size": blob.size,
                "path": name,
            }
            if lfs:
                item["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(pointer)}
            out.append(item)
        tree = [
            {"type": "directory", "oid": _git_sha1(d.encode()), "size": 0, "path": d}
            for d in sorted(folders)
        ]
        return tree + out


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# --------------------------------------------------------------------------- llmlb proxy


class ProxyServer(LoopbackServer):
    """The llmlb load balancer's blob endpoint: `GET/HEAD /v0/models/blob/{model_id}[?file=]`.

    The model id is percent-decoded (clients send `org%2Fname`); without `?file=` the first file
    is served. With `api_key` set, anything but `Authorization: Bearer <api_key>` gets 401; with
    `basic_auth` (user, password), anything but that HTTP Basic authorization gets 401.
    """

    PREFIX = "/v0/models/blob/"

    def __init__(
        self,
        host: str = LOCALHOST,
        port: int = 0,
        api_key: str | None = None,
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        self.api_key = api_key
        self.basic_auth = basic_auth
        self._models: dict[str, dict[str, Blob]] = {}
        super().__init__(host, port)

    def add_model(self, model_id: str, files: Mapping[str, Content]) -> dict[str, Blob]:
        """Register a model's files, in order (the first is the main file)."""
        blobs = {name: Blob.of(content) for name, content in files.items()}
        with self._lock:
            self._models[model_id] = blobs
        return dict(blobs)

    def change_content(
        self, content: Content, model_id: str | None = None, filename: str | None = None
    ) -> Blob:
        """Replace one file's bytes (defaults: the only model, its first file)."""
        if model_id is None:
            (model_id,) = self._models
        files = self._models[model_id]
        filename = filename or next(iter(files))
        blob = Blob.of(content)
        with self._lock:
            self._models[model_id] = {**files, filename: blob}
        return blob

    def _expected_authorization(self) -> str | None:
        if self.api_key is not None:
            return f"Bearer {self.api_key}"
        if self.basic_auth is not None:
            pair = ":".join(self.basic_auth).encode()
            return f"Basic {base64.b64encode(pair).decode('ascii')}"
        return None

    def blob_url(self, model_id: str, filename: str | None = None) -> str:
        url = f"{self.url}{self.PREFIX}{quote(model_id, safe='')}"
        return f"{url}?file={quote(filename, safe='')}" if filename else url

    def _error(self, h: _Handler, rec: RecordedRequest, status: int, kind: str, msg: str) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        self.send_json(h, rec, status, {"error": {"message": msg, "type": kind}}, headers)

    def handle_request(self, h: _Handler, rec: RecordedRequest) -> None:
        if self._expected_authorization() not in (None, rec.headers.get("authorization")):
            self._error(h, rec, 401, "unauthorized", "missing or invalid API key")
            return
        if not rec.path.startswith(self.PREFIX):
            self._error(h, rec, 404, "not_found", f"no route for {rec.path}")
            return
        if rec.method not in _ALL:
            self._error(h, rec, 405, "method_not_allowed", "use GET or HEAD")
            return
        model_id = unquote(rec.path[len(self.PREFIX) :])
        files = self._models.get(model_id)
        if files is None:
            self._error(h, rec, 404, "not_found", f"model {model_id!r} not found")
            return
        filename = rec.params.get("file") or next(iter(files))
        blob = files.get(filename)
        if blob is None:
            self._error(h, rec, 404, "not_found", f"model {model_id!r} has no file {filename!r}")
            return
        name = os.path.basename(filename)
        self.send_blob(h, rec, blob, {"Content-Disposition": f'attachment; filename="{name}"'})


# --------------------------------------------------------------------------- scripted liars


@dataclass
class Reply:
    """One scripted answer. `cut` stops the body after that many bytes (the connection closes
    after every reply, so a body without Content-Length simply ends there)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    cut: int | None = None
    rate: float | None = None  # bytes per second, in 64 KiB pieces (None: all at once)


def requested_range(rec: RecordedRequest, size: int) -> tuple[int, int] | None:
    """The (start, end_exclusive) a request's Range asks of a `size`-byte file, or None."""
    parsed = _parse_range(rec.headers.get("range", ""), size)
    return parsed if isinstance(parsed, tuple) else None


def honest_reply(content: bytes, rec: RecordedRequest, etag: str | None = None) -> Reply:
    """What a truthful server answers: 206 for a satisfiable Range, else 200; lengths exact."""
    headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
    if etag:
        headers["ETag"] = etag
    wanted = requested_range(rec, len(content))
    if wanted is None:
        return Reply(200, {**headers, "Content-Length": str(len(content))}, content)
    start, end = wanted
    headers["Content-Length"] = str(end - start)
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(content)}"
    return Reply(206, headers, content[start:end])


class ScriptedServer(LoopbackServer):
    """Answers every GET with `respond(request) -> Reply`: any status, headers and body, true or
    not. For servers that lie in ways the Hub and proxy stand-ins do not."""

    def __init__(self, respond: Any, host: str = LOCALHOST, port: int = 0) -> None:
        self.respond = respond
        super().__init__(host, port)

    def handle_request(self, h: _Handler, rec: RecordedRequest) -> None:
        reply: Reply = self.respond(rec)
        h.close_connection = True
        self.send_head(h, rec, reply.status, [*reply.headers.items(), ("Connection", "close")])
        body = reply.body if reply.cut is None else reply.body[: reply.cut]
        step = len(body) if not reply.rate else 64 * 1024
        for at in range(0, len(body) if rec.method != "HEAD" else 0, step or 1):
            piece = body[at : at + step]
            self._count(rec, len(piece))
            h.wfile.write(piece)
            h.wfile.flush()
            if reply.rate and self._closing.wait(len(piece) / reply.rate):
                break
        self._abort(h)
