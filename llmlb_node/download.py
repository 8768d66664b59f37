"""How bytes arrive: streaming to disk, Range resume, parallel ranges, hashing, stall watchdog.

`Downloader.fetch(remote, partial, file)` fills a partial file and verifies it (size, sha256, GGUF
magic); it knows nothing of catalogs, locks or which source comes next.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx

from . import __version__
from .catalog import ModelFile
from .errors import (
    DownloadStalledError,
    InsufficientDiskSpaceError,
    IntegrityError,
    SourceError,
)
from .origin import may_carry_secret
from .settings import Settings
from .sources.base import Remote, fail, host_of
from .sources.http_errors import describe_exception
from .store import GGUF_MAGIC, Partial

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, "int | None"], None]
"""Called with (bytes downloaded so far for this file, total bytes or None)."""

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_REDIRECTS = {301, 302, 303, 307, 308}
_MAX_REDIRECTS = 10
_HASH_BLOCK = 4 * 1024 * 1024
_SAVE_EVERY = 0.5  # seconds between progress sidecar writes
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
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
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
        try:
            if remote.parts:
                size, digest = self._copy_parts(remote, partial, progress)
            else:
                size, digest = _HttpTransfer(self, remote, partial, file, progress).run()
            self._verify(remote, partial, file, size, digest)
        except InsufficientDiskSpaceError:
            partial.discard()
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                partial.discard()
                raise InsufficientDiskSpaceError(
                    partial.path.parent, file.expected_size or 0, _free(partial.path)
                ) from exc
            raise
        except IntegrityError as exc:
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
        self, remote: Remote, partial: Partial, file: ModelFile, size: int, digest: str
    ) -> None:
        expected_size = remote.size if remote.size is not None else file.size_bytes
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
            with open(partial.path, "rb") as fh:
                magic = fh.read(4)
            if magic != GGUF_MAGIC:
                raise IntegrityError(
                    f"{file.filename}: not a GGUF file (starts with {magic!r}); "
                    "the server probably sent an error page"
                )

    # -- local parts (python-package) -----------------------------------------------------
    def _copy_parts(
        self, remote: Remote, partial: Partial, progress: ProgressFn
    ) -> tuple[int, str]:
        hasher = hashlib.sha256()
        done = 0
        total = remote.size
        buf = bytearray(_HASH_BLOCK)
        view = memoryview(buf)
        with open(partial.path, "wb") as out:
            for part in remote.parts:
                with open(part, "rb", buffering=0) as src:
                    while n := src.readinto(buf):
                        chunk = view[:n]
                        hasher.update(chunk)
                        out.write(chunk)
                        out.flush()
                        _start_writeback(out.fileno(), done, n)
                        done += n
                        progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        return done, hasher.hexdigest()


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
        self.total: int | None = remote.size if remote.size is not None else file.size_bytes
        self.validator = remote.validator
        self.segments: list[list[int]] = []  # [start, end, done]; end -1 when unknown
        self.lock = threading.Lock()
        self.cancel = threading.Event()
        self.fd = -1
        self.hasher: _PrefixHasher | None = None
        self.workers: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.may_split = False
        self.preallocated = False
        self.remote_ranges = remote.ranges
        self._last_save = 0.0

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
        self.fd = os.open(self.partial.path, os.O_RDWR | os.O_CREAT, 0o644)
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
            os.close(self.fd)

    def _resumable(self, meta: dict) -> bool:
        return can_resume(meta, self.remote, self.file)

    def _restart(self) -> None:
        self.cancel.clear()
        self.segments = []
        self.partial.meta.clear()
        os.ftruncate(self.fd, 0)
        self.remote_ranges = False
        if self.hasher is not None:
            self.hasher.stop()
            self.hasher = None

    def _transfer(self) -> None:
        if not self.segments:
            # One connection first. If it turns out slow (a per-connection cap), the rest of the
            # file is split over more; a fast one is kept, since more connections would only add
            # CPU work on this side.
            self.segments = [[0, self.total if self.total is not None else -1, 0]]
            self.may_split = self.remote_ranges and self.s.download_connections > 1
        self._preallocate()
        self.hasher = _PrefixHasher(self.fd)
        self.hasher.start()
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
        """From the first answer: the exact size, and whether the file may be split later."""
        if response.status_code != 206:
            self.may_split = False
            length = response.headers.get("content-length")
            if self.total is None and length is not None:
                self.total = seg[1] = int(length)
        elif self.total is None:
            self.total = _content_range_total(response)
            if self.total is None:
                self.may_split = False
            else:
                seg[1] = self.total
        self._preallocate()

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
        while seg[1] == -1 or seg[2] < seg[1]:
            if self.cancel.is_set():
                if response is not None:
                    response.close()
                raise _Cancelled()
            before = seg[2]
            try:
                if response is None:
                    end = None if seg[1] == -1 else seg[1] - 1
                    response = self._open(seg[2], end)
                self._check_response(response, seg)
                if self.may_split and seg is self.segments[0]:
                    self._learn_size(seg, response)
                for n in self._stream(response, seg):
                    if n:
                        failures = stalls = 0
                if seg[1] == -1:
                    seg[1] = seg[2]
                    self.total = seg[2]
            except SourceError:
                raise
            except (_SourceChanged, _RangesIgnored, _Cancelled, IntegrityError):
                raise
            except httpx.TimeoutException as exc:
                stalls = 0 if seg[2] > before else stalls + 1
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
            except (httpx.TransportError, _RetryableStatus) as exc:
                if isinstance(exc, httpx.ConnectError) and seg[2] == 0 and before == 0:
                    kind, message = describe_exception(exc)
                    if kind in ("refused", "dns"):
                        raise fail(self.remote.source, kind, message, self.url) from exc
                failures = 0 if seg[2] > before else failures + 1
                if failures >= self.s.max_retries:
                    kind, message = describe_exception(exc)
                    if isinstance(exc, _RetryableStatus):
                        kind, message = "http", str(exc)
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

    def _check_response(self, response: httpx.Response, seg: list[int]) -> None:
        status = response.status_code
        if status == 416 and self.total is not None and seg[2] >= self.total:
            seg[2] = seg[1] = self.total
            return
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
        etag = _etag(response)
        if self.validator is None:
            self.validator = etag
            self.partial.meta["validator"] = etag
        elif etag and etag != self.validator and not _weak_match(etag, self.validator):
            raise _SourceChanged(f"ETag {etag} differs from {self.validator}")
        if status == 200 and seg[2] != 0:
            if seg[0] != 0 or len(self.segments) > 1:
                raise _RangesIgnored()
            # One stream restarted by a server that ignores Range: start the file again cleanly.
            log.info("%s ignored Range; restarting %s from 0", self.url, self.file.filename)
            seg[2] = 0
            if self.hasher is not None:
                self.hasher.stop()
                self.hasher = _PrefixHasher(self.fd)
                self.hasher.start()
        if status == 206:
            start = _content_range_start(response)
            if start is not None and start != seg[2]:
                raise fail(
                    self.remote.source,
                    "http",
                    f"asked for byte {seg[2]}, server sent from {start}",
                    self.url,
                )

    def _stream(self, response: httpx.Response, seg: list[int]) -> Iterator[int]:
        fd = self.fd
        check_magic = seg[2] == 0 and _is_gguf_name(self.file.filename)
        head = b""
        probe: list[float] = []
        for chunk in response.iter_raw():
            if self.cancel.is_set():
                raise _Cancelled()
            n = len(chunk)
            if seg[1] != -1 and seg[2] + n > seg[1]:
                n = seg[1] - seg[2]
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
            if self.may_split and seg is self.segments[0]:
                self._maybe_split(seg, probe)
            self._note_progress()
            yield n
            if seg[1] != -1 and seg[2] >= seg[1]:
                return

    def _open(self, start: int, end: int | None) -> httpx.Response:
        url = self.url
        for _ in range(_MAX_REDIRECTS + 1):
            headers = {"range": f"bytes={start}-{'' if end is None else end}"}
            client = self.d.client(url)
            request = client.build_request("GET", url, headers=headers)
            # Decided on the URL as httpx will connect to it, hop by hop: a redirect to another
            # port, host or scheme loses the secret.
            if self.remote.headers and may_carry_secret(str(request.url), self.remote.auth_origin):
                request.headers.update(self.remote.headers)
            response = client.send(request, stream=True)
            if response.status_code not in _REDIRECTS:
                _read_in_large_blocks(response)
                return response
            location = response.headers.get("location")
            response.close()
            if not location:
                raise fail(self.remote.source, "http", "redirect without a Location", url)
            url = str(httpx.URL(url).join(location))
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
        if self.hasher is not None:
            self.hasher.advance(self._watermark())
        self.progress(done, self.total)
        now = time.monotonic()
        if force or now - self._last_save >= _SAVE_EVERY:
            with self.lock:
                self._last_save = now
                self.partial.meta.update(
                    segments=[list(s) for s in self.segments],
                    size=self.total,
                    validator=self.validator,
                    source=self.remote.source,
                    url_host=host_of(self.url),
                )
                self.partial.save()


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

    def __init__(self, fd: int) -> None:
        self.fd = fd
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


def _is_gguf_name(filename: str) -> bool:
    return filename.lower().endswith(".gguf")


def _etag(response: httpx.Response) -> str | None:
    value = response.headers.get("x-linked-etag") or response.headers.get("etag")
    if not value:
        return None
    return value.strip().removeprefix("W/").strip('"').lower()


def _weak_match(a: str, b: str) -> bool:
    return a.strip('"').lower() == b.strip('"').lower()


def _content_range_total(response: httpx.Response) -> int | None:
    value = response.headers.get("content-range", "")
    total = value.rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _content_range_start(response: httpx.Response) -> int | None:
    value = response.headers.get("content-range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


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
