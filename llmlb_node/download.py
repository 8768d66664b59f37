"""How bytes arrive: streaming to disk, Range resume, parallel ranges, hashing, stall watchdog.

`Downloader.fetch(remote, partial, file)` fills a partial file and verifies it (every size the
server and the catalog state, sha256, the GGUF header's declared extent); it knows nothing of
catalogs, locks or which source comes next.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from . import __version__
from .catalog import ModelFile
from .errors import (
    DownloadStalledError,
    InsufficientDiskSpaceError,
    IntegrityError,
    SourceError,
)
from .gguf import MAGIC as GGUF_MAGIC
from .gguf import GGUFError, GGUFHeader, check_complete, read_header_prefix
from .origin import may_carry_secret
from .settings import Settings
from .sources.base import Remote, fail, host_of
from .sources.http_errors import describe_exception
from .store import Partial

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, "int | None"], None]
"""Called with (bytes downloaded so far for this file, total bytes or None)."""

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_REDIRECTS = {301, 302, 303, 307, 308}
_MAX_REDIRECTS = 10
_HASH_BLOCK = 4 * 1024 * 1024
_SAVE_EVERY = 0.5  # seconds between progress sidecar writes...
_SAVE_FRACTION = 64  # ...or every 1/64 of the file, whichever comes first,
_SAVE_MIN_GAP = 0.05  # but no more often than this (each save waits for an fsync)
_OVERLAP = 64 * 1024  # a resume without a strong validator re-reads this much and compares
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a symlink planted at a partial's path is not followed
_PROBE_S = 0.25  # how long one connection runs before deciding whether to split the file
_MIN_PART = 1024 * 1024  # never split into parts smaller than this


@dataclass(frozen=True)
class Fetched:
    """A verified file sitting in its temporary path, ready to publish."""

    path: str
    size: int
    sha256: str
    source: str


class _SourceChanged(Exception):
    """The server now serves other bytes than the partial file was started with."""


class _RangesIgnored(Exception):
    """The server answered 200 to a Range request for a segment that does not start at 0."""


class _ShortBody(Exception):
    """A body ended (cleanly) before the bytes its response promised: retried like a drop."""


class Downloader:
    """Fetches `Remote`s into partial files. Thread-safe; one per resolver."""

    def __init__(self, settings: Settings, client: httpx.Client | None = None) -> None:
        self.settings = settings
        self._given = client
        self._clients: dict[str, httpx.Client] = {}
        self._lock = threading.Lock()

    def client(self, url: str) -> httpx.Client:
        """The client for `url`'s scheme. Plain http needs no TLS context, whose creation
        (loading the CA bundle) costs tens of milliseconds before the first byte."""
        if self._given is not None:
            return self._given
        scheme = "https" if url.startswith("https:") else "http"
        client = self._clients.get(scheme)
        if client is None:
            with self._lock:
                client = self._clients.get(scheme)
                if client is None:
                    client = self._clients[scheme] = self._new_client(tls=scheme == "https")
        return client

    def _new_client(self, tls: bool) -> httpx.Client:
        s = self.settings
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

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def fetch(
        self, remote: Remote, partial: Partial, file: ModelFile, progress: ProgressFn | None = None
    ) -> Fetched:
        """Fill `partial` from `remote`, verify it and return it; raise `SourceError` (this
        source failed), `InsufficientDiskSpaceError` or `DownloadStalledError`."""
        progress = progress or (lambda done, total: None)
        header: GGUFHeader | None = None
        try:
            _declared_size(remote, file)
            if remote.parts:
                size, digest, header = self._copy_parts(remote, partial, file, progress)
            else:
                transfer = _HttpTransfer(self, remote, partial, file, progress)
                size, digest = transfer.run()
                header = transfer.probe.result()
            self._verify(remote, partial, file, size, digest, header)
        except InsufficientDiskSpaceError:
            partial.discard()
            raise
        except OSError as exc:
            if isinstance(exc, DownloadStalledError):  # a TimeoutError, so an OSError too
                raise
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                partial.discard()
                raise InsufficientDiskSpaceError(
                    partial.path.parent, file.expected_size or 0, _free(partial.path)
                ) from exc
            # Say it as a failure of this source, never as a bare OSError (the partial file
            # removed by hand mid-download, a directory made read-only, ...).
            where = exc.filename or partial.path
            raise fail(
                remote.source, "disk", f"{file.filename}: {exc.strerror or exc} ({where})"
            ) from exc
        except (IntegrityError, GGUFError) as exc:
            partial.discard()
            raise fail(remote.source, "integrity", str(exc), remote.url) from exc
        except _SourceChanged as exc:
            partial.discard()
            raise fail(remote.source, "http", f"the file changed during download: {exc}") from exc
        except (SourceError, DownloadStalledError):
            if not any(s[2] > s[0] for s in partial.meta.get("segments", [])):
                partial.discard()  # nothing worth resuming
            raise
        return Fetched(str(partial.path), size, digest, remote.source)

    # -- verification ---------------------------------------------------------------------
    def _verify(
        self,
        remote: Remote,
        partial: Partial,
        file: ModelFile,
        size: int,
        digest: str,
        header: GGUFHeader | None,
    ) -> None:
        expected_size = _declared_size(remote, file)
        if expected_size is not None and size != expected_size:
            raise IntegrityError(
                f"{file.filename}: got {size} bytes, expected {expected_size} "
                f"(from {remote.source})"
            )
        for label, want in (("the catalog", file.sha256), (remote.source, remote.sha256)):
            if want and want != digest:
                raise IntegrityError(
                    f"{file.filename}: sha256 {digest} does not match {want} given by {label}"
                )
        if _is_gguf_name(file.filename):
            try:
                verify_gguf(partial.path, file.filename, header)
            except GGUFError as exc:
                raise IntegrityError(f"{exc} (from {remote.source})") from None

    # -- local parts (python-package) -----------------------------------------------------
    def _copy_parts(
        self, remote: Remote, partial: Partial, file: ModelFile, progress: ProgressFn
    ) -> tuple[int, str, GGUFHeader | None]:
        hasher = hashlib.sha256()
        done = 0
        total = remote.size
        buf = bytearray(_HASH_BLOCK)
        view = memoryview(buf)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | _NOFOLLOW
        with open(os.open(partial.path, flags, 0o644), "w+b") as out:  # the probe reads it too
            probe = _HeaderProbe(out.fileno(), enabled=_is_gguf_name(file.filename))
            try:
                for part in remote.parts:
                    with open(part, "rb", buffering=0) as src:
                        while n := src.readinto(buf):
                            chunk = view[:n]
                            hasher.update(chunk)
                            out.write(chunk)
                            out.flush()
                            _start_writeback(out.fileno(), done, n)
                            done += n
                            partial.verified = done
                            probe.offer(done)
                            progress(done, total)
                out.flush()
                os.fsync(out.fileno())
            finally:
                header = probe.result()  # never close the file under a parse
        return done, hasher.hexdigest(), header


def verify_gguf(
    path: str | os.PathLike[str], filename: str, header: GGUFHeader | None = None
) -> GGUFHeader:
    """Raise `GGUFError` unless the GGUF at `path` is whole: a header that parses and at least
    the bytes it declares. `header`, parsed while the file arrived, saves parsing it again."""
    if header is None:
        return check_complete(path, name=filename)
    size = os.stat(path).st_size
    if size < header.data_end:
        raise GGUFError(
            f"{filename}: truncated: the GGUF header declares {header.data_end} bytes of data "
            f"but the file has {size}"
        )
    return header


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


class _HeaderProbe:
    """Parses the GGUF header of a file still arriving, in the background, once enough of it is
    on disk: a vocabulary of 262,144 strings takes a pure-Python parser ~20 ms, which the network
    time then hides, and the check at the end is one stat."""

    FIRST_TRY = 16 * 1024 * 1024

    def __init__(self, fd: int, enabled: bool) -> None:
        self.fd = fd
        self.enabled = enabled
        self.next_try = self.FIRST_TRY
        self.header: GGUFHeader | None = None
        self.thread: threading.Thread | None = None

    def offer(self, available: int) -> None:
        """The file's first `available` bytes are final; parse them if the time has come."""
        if not self.enabled or available < self.next_try or self.header is not None:
            return
        if self.thread is not None and self.thread.is_alive():
            return
        self.next_try = available * 4  # a header bigger than this is rare: parse at the end

        def parse() -> None:
            self.header = read_header_prefix(self.fd, available)

        self.thread = threading.Thread(target=parse, name="llmlb-gguf-header", daemon=True)
        self.thread.start()

    def result(self) -> GGUFHeader | None:
        if self.thread is not None:
            self.thread.join()
        return self.header


class _HttpTransfer:
    """One file over HTTP: a probe request, then one or more segment workers."""

    def __init__(
        self,
        downloader: Downloader,
        remote: Remote,
        partial: Partial,
        file: ModelFile,
        progress: ProgressFn,
    ) -> None:
        assert remote.url is not None
        self.d = downloader
        self.s = downloader.settings
        self.remote = remote
        self.partial = partial
        self.file = file
        self.progress = progress
        self.url = remote.url
        self.declared = _declared_size(remote, file)
        """The exact size known before any answer (catalog, Hub metadata): servers must agree."""
        self.total: int | None = self.declared
        self.sha256 = remote.sha256 or file.sha256
        self.validator = remote.validator
        self.segments: list[list[int]] = []  # [start, end, done]; end -1 when unknown
        self.lock = threading.Lock()
        self.cancel = threading.Event()
        self.fd = -1
        self.hasher: _PrefixHasher | None = None
        self.probe = _HeaderProbe(-1, enabled=False)
        self.workers: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.may_split = False
        self.preallocated = False
        self.remote_ranges = remote.ranges
        self._last_save = 0.0
        self._saved_bytes = 0
        self.saver = _Background(self._save, "llmlb-sidecar")

    # The whole transfer --------------------------------------------------------------------
    def run(self) -> tuple[int, str]:
        meta = self.partial.meta
        if meta.get("segments") and self._resumable(meta):
            self.segments = [[int(x) for x in s] for s in meta["segments"]]
            self.total = meta.get("size", self.total)
            self.validator = meta.get("validator") or self.validator
            log.info(
                "%s: resuming %s at byte %d of %s",
                self.remote.source,
                self.file.filename,
                self._downloaded(),
                self.total,
            )
        else:
            meta.clear()
        self.fd = os.open(self.partial.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        self._new_probe()
        try:
            try:
                self._transfer()
            except _RangesIgnored:
                log.info("%s ignores Range; fetching %s in one stream", self.url, self.file)
                self._restart()
                self._transfer()
            except _SourceChanged as exc:
                log.warning("%s: %s; discarding the partial file and starting again", self.url, exc)
                self._restart()
                self.validator = self.remote.validator
                self.remote_ranges = self.remote.ranges
                self._transfer()
            size = self._downloaded() if self.total is None else self.total
            os.ftruncate(self.fd, size)
            assert self.hasher is not None
            return size, self.hasher.finish(size)
        finally:
            if self.hasher is not None:
                self.hasher.stop()
            self.probe.result()  # never close the fd under a parse or a sync
            self.saver.stop()
            os.close(self.fd)

    def _resumable(self, meta: dict) -> bool:
        return can_resume(meta, self.remote, self.file)

    def _new_probe(self) -> None:
        self.probe.result()
        self.probe = _HeaderProbe(self.fd, enabled=_is_gguf_name(self.file.filename))

    def _restart(self) -> None:
        self.partial.generation += 1  # before a byte is overwritten: readers stop here
        self.saver.stop()  # no sidecar for the old bytes may land after this
        self.saver = _Background(self._save, "llmlb-sidecar")
        self.cancel.clear()
        self.segments = []
        self.partial.meta.clear()
        os.ftruncate(self.fd, 0)
        self.remote_ranges = False
        self.total = self.declared
        self.preallocated = False
        self._new_probe()
        if self.hasher is not None:
            self.hasher.stop()
            self.hasher = None
        self.partial.verified = 0

    def _new_hasher(self) -> _PrefixHasher:
        self.partial.verified = 0
        hasher = _PrefixHasher(self.fd, on_hashed=self._hashed)
        hasher.start()
        return hasher

    def _hashed(self, pos: int) -> None:
        self.partial.verified = pos

    def _transfer(self) -> None:
        if not self.segments:
            # One connection first. If it turns out slow (a per-connection cap), the rest of the
            # file is split over more; a fast one is kept, since more connections would only add
            # CPU work on this side. Splitting needs a strong validator (ETag or sha256): ranges
            # of different versions of a file must never be joined.
            self.segments = [[0, self.total if self.total is not None else -1, 0]]
            self.may_split = self.remote_ranges and self.s.download_connections > 1
        self._preallocate()
        self.hasher = self._new_hasher()
        self._note_progress(force=True)
        todo = [s for s in self.segments if s[1] == -1 or s[2] < s[1]]
        for seg in todo[1:]:
            self._spawn(seg)
        try:
            if todo:
                self._run_segment(todo[0])
            self._join()
        except _Cancelled:
            self.cancel.set()
            self._join()  # raises the other segment's failure that cancelled this one
            raise
        except BaseException:
            # Ctrl-C (or a failure of this segment): stop the others, and let this exception,
            # not the cancellations it causes, reach the caller. Progress so far is kept.
            self.cancel.set()
            self._join(quiet=True)
            with contextlib.suppress(Exception):
                self._note_progress(force=True)  # the sidecar vouches for every byte held
            raise

    def _spawn(self, seg: list[int]) -> None:
        def work() -> None:
            try:
                self._run_segment(seg)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self.errors.append(exc)
                self.cancel.set()

        thread = threading.Thread(target=work, name=f"llmlb-range-{seg[0]}", daemon=True)
        self.workers.append(thread)
        thread.start()

    def _join(self, quiet: bool = False) -> None:
        for thread in self.workers:
            thread.join()
        self.workers = []
        errors, self.errors = self.errors, []
        if errors and not quiet:
            # A stall or a source failure matters more than the cancellations it caused.
            raise next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])

    def _learn_size(self, seg: list[int], response: httpx.Response) -> None:
        """From the first answer: whether the file may be split later."""
        if response.status_code != 206 or self.total is None:
            self.may_split = False
        if not (self.sha256 or (self.validator and _etag(response) == self.validator)):
            self.may_split = False  # no strong validator: one stream, resumed with an overlap
        self._preallocate()

    def _agree(self, size: int, label: str, seg: list[int]) -> None:
        """Every size a server states must match what is known: never trim, never pad."""
        if self.total is None:
            self.total = size
            if seg[1] == -1 and len(self.segments) == 1:
                seg[1] = size
            return
        if size == self.total:
            return
        if self.declared is not None:
            raise IntegrityError(
                f"{self.file.filename}: {self.remote.source} states {size} bytes ({label}), "
                f"but the file is {self.declared} bytes (as the catalog or source metadata says)"
            )
        raise _SourceChanged(f"{label} says {size} bytes, the server said {self.total} before")

    def _maybe_split(self, seg: list[int], probe: list[float]) -> None:
        """After the probe window, split the rest of a slow single stream over N connections."""
        now = time.monotonic()
        if not probe:
            probe.extend((now, seg[2]))
            return
        elapsed = now - probe[0]
        if elapsed < _PROBE_S:
            return
        self.may_split = False
        rate = (seg[2] - probe[1]) / elapsed
        rest = seg[1] - seg[2]
        n = self.s.download_connections
        if self.total is None or self.total < self.s.parallel_threshold or rest < n * _MIN_PART:
            return
        if rate >= self.s.split_below:
            log.debug("%s: %.0f MB/s on one connection; not splitting", self.file, rate / 1e6)
            return
        step = -(-rest // n)
        starts = range(seg[2] + step, seg[1], step)
        extra = [[start, min(start + step, seg[1]), start] for start in starts]
        seg[1] = seg[2] + step  # this connection now stops at the end of its own part
        self.segments.extend(extra)
        log.info(
            "%s: %.1f MB/s on one connection; fetching the rest over %d connections",
            self.file.filename,
            rate / 1e6,
            n,
        )
        self._note_progress(force=True)
        for part in extra:
            self._spawn(part)

    def _preallocate(self) -> None:
        if self.total is None or self.preallocated:
            return
        self.preallocated = True
        needed = self.total - self._downloaded()
        free = _free(self.partial.path)
        if needed > free:
            raise InsufficientDiskSpaceError(self.partial.path.parent, needed, free)
        with contextlib.suppress(AttributeError):  # no posix_fallocate on macOS
            try:
                os.posix_fallocate(self.fd, 0, self.total)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # EOPNOTSUPP and friends: the filesystem cannot preallocate; writes still work.

    # One segment --------------------------------------------------------------------------
    def _run_segment(self, seg: list[int]) -> None:
        response: httpx.Response | None = None
        failures = 0
        stalls = 0
        # Tries are counted afresh only when bytes arrive past the furthest ever held here:
        # a server that drops at the same byte every time must run out of tries.
        furthest = seg[2]
        while seg[1] == -1 or seg[2] < seg[1]:
            if self.cancel.is_set():
                if response is not None:
                    response.close()
                raise _Cancelled()
            try:
                back = self._overlap(seg)
                end = None if seg[1] == -1 else seg[1] - 1
                response = self._open(seg[2] - back, end)
                start, limit = self._check_response(response, seg, back)
                if seg[1] != -1 and seg[2] >= seg[1]:
                    break  # 416 at the end: nothing left to fetch
                if self.may_split and seg is self.segments[0]:
                    self._learn_size(seg, response)
                for _ in self._stream(response, seg, start, limit):
                    if seg[2] > furthest:
                        furthest = seg[2]
                        failures = stalls = 0
                if seg[1] == -1:
                    seg[1] = seg[2]
                    self.total = seg[2]
                elif seg[2] < seg[1]:
                    raise _ShortBody(f"the body ended at byte {seg[2]} of {seg[1]}")
            except SourceError:
                raise
            except (_SourceChanged, _RangesIgnored, _Cancelled, IntegrityError):
                raise
            except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
                stalls += 1
                self._note_progress(force=True, stalled=True)
                if stalls >= self.s.max_stalls:
                    raise DownloadStalledError(
                        self.remote.source, self.url, seg[2], stalls, self.s.stall_timeout
                    ) from exc
                log.warning(
                    "%s: no data for %gs at byte %d of %s; reconnecting",
                    self.remote.source,
                    self.s.stall_timeout,
                    seg[2],
                    self.file.filename,
                )
            except (httpx.TransportError, _RetryableStatus, _ShortBody) as exc:
                if isinstance(exc, httpx.ConnectError) and seg[2] == 0 and furthest == 0:
                    kind, message = describe_exception(exc)
                    if kind in ("refused", "dns"):
                        raise fail(self.remote.source, kind, message, self.url) from exc
                failures += 1
                if failures >= self.s.max_retries:
                    kind, message = describe_exception(exc)
                    if isinstance(exc, _RetryableStatus):
                        kind, message = "http", str(exc)
                    elif isinstance(exc, _ShortBody):
                        kind, message = "network", str(exc)
                    raise fail(
                        self.remote.source, kind, f"{message} (after {failures} attempts)", self.url
                    ) from exc
                delay = _retry_delay(exc, failures, self.s.retry_backoff)
                log.info(
                    "%s: %s at byte %d of %s; retrying in %.1fs",
                    self.remote.source,
                    exc,
                    seg[2],
                    self.file.filename,
                    delay,
                )
                if self.cancel.wait(delay):
                    raise _Cancelled() from exc
            finally:
                if response is not None:
                    response.close()
                response = None

    def _overlap(self, seg: list[int]) -> int:
        """How many held bytes to ask for again and compare before resuming `seg`.

        With a sha256 known up front the final hash proves the whole file; otherwise the
        server's answer must match the tail of what this segment already holds.
        """
        if self.sha256:
            return 0
        return min(_OVERLAP, seg[2] - seg[0])

    def _check_response(
        self, response: httpx.Response, seg: list[int], back: int
    ) -> tuple[int, int | None]:
        """Accept the answer for `seg` (asked from ``seg[2] - back``) or raise. Returns the file
        offsets where its body starts and which it must not go past (None: unknown)."""
        status = response.status_code
        if status == 416 and self.total is not None and seg[2] >= self.total:
            seg[2] = seg[1] = self.total
            return seg[2], self.total
        if status in _RETRY_STATUS:
            raise _RetryableStatus(response)
        if status in (401, 403):
            raise fail(
                self.remote.source,
                "unauthorized" if status == 401 else "forbidden",
                _auth_advice(self.remote, status),
                self.url,
            )
        if status == 404:
            raise fail(
                self.remote.source, "not_found", f"HTTP 404 for {self.file.filename}", self.url
            )
        if status not in (200, 206):
            raise fail(
                self.remote.source, "http", f"HTTP {status} for {self.file.filename}", self.url
            )
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # We ask for identity: a compressed body is not the file's bytes, whatever its name
            # (a GGUF's magic check would catch it, a non-GGUF file without a sha256 would not).
            raise IntegrityError(
                f"{self.file.filename}: {self.remote.source} sent it with Content-Encoding "
                f"{encoding!r}, not the file's own bytes"
            )
        self._check_validator(response, seg)
        if status == 200:
            length = _int_header(response, "content-length")
            if length is not None:
                self._agree(length, "Content-Length", seg)
            if seg[2] != 0:
                if seg[0] != 0 or len(self.segments) > 1:
                    raise _RangesIgnored()
                # One stream restarted by a server that ignores Range: start the file again.
                log.info("%s ignored Range; restarting %s from 0", self.url, self.file.filename)
                self.partial.generation += 1
                seg[2] = 0
                self._new_probe()
                if self.hasher is not None:
                    self.hasher.stop()
                    self.hasher = self._new_hasher()
            return 0, length if length is not None else self.total
        first, last, total = _content_range(response)
        if first is None or last is None or last < first:
            raise IntegrityError(
                f"{self.file.filename}: {self.remote.source} answered 206 with Content-Range "
                f"{response.headers.get('content-range')!r}"
            )
        if total is not None:
            self._agree(total, "Content-Range", seg)
        if first != seg[2] - back:
            raise fail(
                self.remote.source,
                "http",
                f"asked for byte {seg[2] - back}, server sent from {first}",
                self.url,
            )
        length = _int_header(response, "content-length")
        if length is not None and length != last - first + 1:
            raise IntegrityError(
                f"{self.file.filename}: {self.remote.source} sent Content-Length {length} for "
                f"the {last - first + 1} bytes of Content-Range {first}-{last}"
            )
        return first, last + 1

    def _check_validator(self, response: httpx.Response, seg: list[int]) -> None:
        etag = _etag(response)
        if self.validator is None:
            self.validator = etag
            self.partial.meta["validator"] = etag
        elif etag and etag != self.validator and not _weak_match(etag, self.validator):
            raise _SourceChanged(f"ETag {etag} differs from {self.validator}")
        elif not etag and not self.sha256 and seg[2] == seg[0] > 0:
            # A range of a split file with nothing of its own to compare: only a validator
            # proves it comes from the same version as the rest.
            raise _SourceChanged("a range came without the ETag the file was started with")

    def _stream(
        self, response: httpx.Response, seg: list[int], start: int, limit: int | None
    ) -> Iterator[int]:
        fd = self.fd
        check_magic = seg[2] == 0 and _is_gguf_name(self.file.filename)
        head = b""
        probe: list[float] = []
        pos = start  # the file offset of the next body byte
        for chunk in response.iter_raw():
            if self.cancel.is_set():
                raise _Cancelled()
            n = len(chunk)
            if limit is not None and pos + n > limit:
                raise IntegrityError(
                    f"{self.file.filename}: {self.remote.source} sent more than the "
                    f"{limit} bytes it announced"
                )
            if pos < seg[2]:  # the overlap: must equal what is held
                k = min(n, seg[2] - pos)
                if os.pread(fd, k, pos) != bytes(chunk[:k]):
                    raise _SourceChanged(f"the bytes before offset {seg[2]} differ on resume")
                pos += k
                chunk = chunk[k:]
                n -= k
                if not n:
                    continue
            if seg[1] != -1 and seg[2] + n > seg[1]:
                n = seg[1] - seg[2]  # a split shortened this segment; another one has the rest
                chunk = chunk[:n]
            if check_magic:  # refuse an HTML error page at its first bytes, not after 4 GB
                head += bytes(chunk[: 4 - len(head)])
                if len(head) >= 4:
                    check_magic = False
                    if head != GGUF_MAGIC:
                        raise IntegrityError(
                            f"{self.file.filename}: {self.remote.source} sent {head[:4]!r} where "
                            "a GGUF file starts with b'GGUF' (an error page?)"
                        )
            os.pwrite(fd, chunk, seg[2])
            seg[2] += n
            pos += n
            if self.may_split and seg is self.segments[0]:
                self._maybe_split(seg, probe)
            self._note_progress()
            yield n
            if seg[1] != -1 and seg[2] >= seg[1]:
                return

    def _open(self, start: int, end: int | None) -> httpx.Response:
        url = self.url
        for _ in range(_MAX_REDIRECTS + 1):
            # Every URL, the first (a Hub's Location) and each redirect, must be http(s):
            # file:, ftp: and the like are refused at once, never retried.
            if _scheme(url) not in ("http", "https"):
                raise fail(self.remote.source, "http", f"not an http(s) URL: {url}", url)
            headers = {"range": f"bytes={start}-{'' if end is None else end}"}
            client = self.d.client(url)
            request = client.build_request("GET", url, headers=headers)
            # Decided on the URL as httpx will connect to it, hop by hop: a redirect to another
            # port, host or scheme loses the secret.
            if self.remote.headers and may_carry_secret(str(request.url), self.remote.auth_origin):
                request.headers.update(self.remote.headers)
            response = send_with_deadline(
                client, request, self.s.connect_timeout + self.s.stall_timeout
            )
            if response.status_code not in _REDIRECTS:
                _read_in_large_blocks(response)
                return response
            location = response.headers.get("location")
            response.close()
            if not location:
                raise fail(self.remote.source, "http", "redirect without a Location", url)
            try:
                url = str(httpx.URL(url).join(location))
            except httpx.InvalidURL as exc:
                message = f"bad redirect Location: {exc}"
                raise fail(self.remote.source, "http", message, url) from exc
        raise fail(self.remote.source, "http", "too many redirects", self.url)

    # Bookkeeping ---------------------------------------------------------------------------
    def _downloaded(self) -> int:
        return sum(s[2] - s[0] for s in self.segments)

    def _watermark(self) -> int:
        mark = 0
        for start, end, done in self.segments:
            if start > mark:
                break
            mark = max(mark, done)
            if end == -1 or done < end:
                break
        return mark

    def _note_progress(self, force: bool = False, stalled: bool = False) -> None:
        done = self._downloaded()
        mark = self._watermark()
        if self.hasher is not None:
            self.hasher.advance(mark)
        self.probe.offer(mark)
        self.progress(done, self.total)
        if force:
            self._save()
        elif self._save_due(done):
            # The sync a save waits for must not stall a connection: a thread of its own does it.
            self._last_save = time.monotonic()
            self._saved_bytes = done
            self.saver.request()

    def _save_due(self, done: int) -> bool:
        """Every 0.5 s, or every 1/64 of the file (at most 20 times a second): a process killed
        at any moment loses little, however fast the bytes arrive."""
        since = time.monotonic() - self._last_save
        if since >= _SAVE_EVERY:
            return True
        step = self.total // _SAVE_FRACTION if self.total else _HASH_BLOCK
        return since >= _SAVE_MIN_GAP and done - self._saved_bytes >= step

    def _save(self) -> None:
        """Write the sidecar that vouches for the bytes held, after those bytes are on disk:
        after a power cut it never claims bytes that are zeros (the file is preallocated)."""
        with self.lock:
            segments = [list(s) for s in self.segments]  # written before the sync below
            _fdatasync(self.fd)
            self._last_save = time.monotonic()
            self.partial.meta.update(
                segments=segments,
                size=self.total,
                validator=self.validator,
                source=self.remote.source,
                url_host=host_of(self.url),
            )
            self.partial.save(durable=True)


class _Background:
    """Runs `work` in a thread of its own whenever requested; requests made while it runs fold
    into one more run."""

    def __init__(self, work: Callable[[], None], name: str) -> None:
        self.work = work
        self.name = name
        self.cond = threading.Condition()
        self.pending = False
        self.stopped = False
        self.thread: threading.Thread | None = None

    def request(self) -> None:
        with self.cond:
            if self.stopped:
                return
            self.pending = True
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self.thread.start()
            self.cond.notify()

    def stop(self) -> None:
        """Finish a run in progress (a pending one is dropped) and end the thread."""
        with self.cond:
            self.stopped = True
            self.pending = False
            self.cond.notify()
            thread = self.thread
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending or self.stopped)
                if self.stopped:
                    return
                self.pending = False
            try:
                self.work()
            except Exception as exc:  # noqa: BLE001 - a lost sidecar costs only resumability
                log.warning("could not record download progress: %s", exc)


class _Cancelled(Exception):
    """Another segment failed; this one stops."""


class _RetryableStatus(Exception):
    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.retry_after = _parse_retry_after(response.headers.get("retry-after"))
        super().__init__(f"HTTP {self.status}")


class _PrefixHasher:
    """Hashes the file from disk as its contiguous prefix grows, in a thread of its own.

    Overlaps hashing with the network (hashlib releases the GIL) and works the same for one
    stream, parallel ranges and resumed partials.
    """

    def __init__(self, fd: int, on_hashed: Callable[[int], None] | None = None) -> None:
        self.fd = fd
        self.on_hashed = on_hashed or (lambda pos: None)
        """Called in the hashing thread with the length of the prefix hashed so far."""
        self.h = hashlib.sha256()
        self.pos = 0
        self.mark = 0
        self.cond = threading.Condition()
        self.stopped = False
        self.final: int | None = None
        self.thread = threading.Thread(target=self._loop, name="llmlb-hash", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def advance(self, mark: int) -> None:
        if mark - self.mark >= _HASH_BLOCK:
            with self.cond:
                self.mark = mark
                self.cond.notify()

    def finish(self, size: int) -> str:
        with self.cond:
            self.final = size
            self.mark = size
            self.cond.notify()
        self.thread.join()
        if self.pos != size:
            raise IntegrityError(f"hashed {self.pos} bytes of {size}")
        return self.h.hexdigest()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join()

    def _loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(
                    lambda: self.stopped or self.pos < self.mark or self.final is not None
                )
                if self.stopped:
                    return
                mark, final = self.mark, self.final
            while self.pos < mark:
                block = os.pread(self.fd, min(_HASH_BLOCK, mark - self.pos), self.pos)
                if not block:
                    return  # the file is shorter than claimed; finish() reports it
                self.h.update(block)
                _start_writeback(self.fd, self.pos, len(block))
                self.pos += len(block)
                self.on_hashed(self.pos)
            if final is not None:
                return


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's sync_file_range(2), which Python's os module does not expose."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.sync_file_range
        func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    except (OSError, AttributeError):
        return None
    return lambda fd, offset, n: func(fd, offset, n, 2)  # SYNC_FILE_RANGE_WRITE: start, no wait


_SYNC_FILE_RANGE = _load_sync_file_range()


def _start_writeback(fd: int, offset: int, n: int) -> None:
    """Start writing a verified block to disk now, so the fsync before publishing has little
    left to wait for (the pages stay cached for llama.cpp's load)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, n)


_READ_BLOCK = 256 * 1024


def _read_in_large_blocks(response: httpx.Response) -> bool:
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


def can_resume(meta: dict, remote: Remote, file: ModelFile) -> bool:
    """Whether a partial file (described by its sidecar `meta`) may be continued from `remote`.

    Only against the same bytes: equal validators (ETag / sha256), the same source (its answer's
    ETag is checked again), or a sha256 known up front that the finished file must match.
    """
    if not meta.get("segments"):
        return False
    size = remote.size if remote.size is not None else file.size_bytes
    if size is not None and meta.get("size") not in (None, size):
        return False
    known = meta.get("validator")
    if remote.validator and known:
        return bool(known == remote.validator)
    return meta.get("source") == remote.source or bool(remote.sha256 or file.sha256)


def _scheme(url: str) -> str | None:
    try:
        return httpx.URL(url).scheme
    except httpx.InvalidURL:
        return None


def _is_gguf_name(filename: str) -> bool:
    return filename.lower().endswith(".gguf")


def _etag(response: httpx.Response) -> str | None:
    value = response.headers.get("x-linked-etag") or response.headers.get("etag")
    if not value:
        return None
    return value.strip().removeprefix("W/").strip('"').lower()


def _weak_match(a: str, b: str) -> bool:
    return a.strip('"').lower() == b.strip('"').lower()


def _content_range(response: httpx.Response) -> tuple[int | None, int | None, int | None]:
    """(first, last, total) of ``Content-Range: bytes first-last/total``; None where absent."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
    if match is None:
        return None, None, None
    total = match[3]
    return int(match[1]), int(match[2]), None if total == "*" else int(total)


def _int_header(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name, "").strip()
    return int(value) if value.isdigit() else None


def _declared_size(remote: Remote, file: ModelFile) -> int | None:
    """The exact size known before the transfer; the catalog and the source must agree on it."""
    if remote.size is not None and file.size_bytes is not None and remote.size != file.size_bytes:
        raise IntegrityError(
            f"{file.filename}: {remote.source} says {remote.size} bytes, "
            f"the catalog says {file.size_bytes}"
        )
    return remote.size if remote.size is not None else file.size_bytes


def _fdatasync(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _retry_delay(exc: BaseException, failures: int, base: float) -> float:
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        return min(retry_after, 60.0)
    return min(base * 2 ** max(failures - 1, 0), 8.0)


def _auth_advice(remote: Remote, status: int) -> str:
    if remote.source.startswith("huggingface"):
        return f"HTTP {status}: set HF_TOKEN, or accept the model's license on the Hub"
    if remote.source == "llmlb-proxy":
        return f"HTTP {status} from the llmlb proxy: check LLMLB_API_KEY"
    return f"HTTP {status}: the server refused access"


def _free(path: os.PathLike[str] | str) -> int:
    import shutil

    try:
        return shutil.disk_usage(os.path.dirname(os.fspath(path))).free
    except OSError:
        return 0
