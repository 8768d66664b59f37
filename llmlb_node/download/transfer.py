"""The transfer loop: one file over HTTP into its partial file, a first connection that may be
split into parallel ranges, each range retried, resumed and checked as it streams."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx

from ..catalog import ModelFile
from ..errors import DownloadStalledError, IntegrityError, SourceError
from ..gguf import MAGIC as GGUF_MAGIC
from ..sources.base import Remote, fail, host_of
from ..sources.http_errors import describe_exception
from ..store import Partial
from . import disk, http
from .checks import HeaderProbe, PrefixHasher, declared_size, is_gguf_name
from .ranges import MIN_PART, Ranges, Segment
from .sidecar import Background, SaveClock
from .validators import Held, Offer, Plan, Restart, Validator, answer_validator, can_resume, decide

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, "int | None"], None]
"""Called with (bytes downloaded so far for this file, total bytes or None)."""

_PROBE_S = 0.25  # how long one connection runs before deciding whether to split the file


class Cancelled(Exception):
    """Another segment failed; this one stops."""


class ShortBody(Exception):
    """A body ended (cleanly) before the bytes its response promised: retried like a drop."""


@dataclass
class _Tries:
    """A segment's failed attempts in a row. Counted afresh only when bytes arrive past the
    furthest ever held: a server that drops at the same byte every time runs out of tries."""

    furthest: int
    failures: int = 0
    stalls: int = 0

    def progress(self, done: int) -> None:
        if done > self.furthest:
            self.furthest = done
            self.failures = self.stalls = 0


class HttpTransfer:
    """One file over HTTP: a probe request, then one or more segment workers."""

    def __init__(
        self, clients: Any, remote: Remote, partial: Partial, file: ModelFile, progress: ProgressFn
    ) -> None:
        assert remote.url is not None
        self.clients = clients
        """Anything with ``client(url) -> httpx.Client`` and ``settings`` (the `Downloader`)."""
        self.s = clients.settings
        self.remote = remote
        self.partial = partial
        self.file = file
        self.progress = progress
        self.url = remote.url
        self.declared = declared_size(remote, file)
        """The exact size known before any answer (catalog, Hub metadata): servers must agree."""
        self.total: int | None = self.declared
        self.sha256 = remote.sha256 or file.sha256
        self.validator = Validator.parse(remote.validator)
        """The version the bytes held are of: the source's, else learned from the first answer
        (the weaker of the two when they agree only weakly)."""
        self.ranges = Ranges()
        self.lock = threading.Lock()
        self.cancel = threading.Event()
        self.fd = -1
        self.hasher: PrefixHasher | None = None
        self.probe = HeaderProbe(-1, enabled=False)
        self.workers: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.may_split = False
        self.one_stream = False
        """After a restart that Range caused (ignored, or 416 to a resume): no Range at all."""
        self.preallocated = False
        self.clock = SaveClock()
        self.saver = Background(self._save, "llmlb-sidecar")

    # The whole transfer --------------------------------------------------------------------
    def run(self) -> tuple[int, str]:
        """Fill the partial file; its size and sha256."""
        self._adopt(self.partial.meta)
        self.fd = disk.open_partial(self.partial.path)
        self._new_probe()
        try:
            self._transfer_with_restarts()
            size = self.ranges.downloaded() if self.total is None else self.total
            os.ftruncate(self.fd, size)
            assert self.hasher is not None
            return size, self.hasher.finish(size)
        finally:
            if self.hasher is not None:
                self.hasher.stop()
            self.probe.result()  # never close the fd under a parse or a sync
            self.saver.stop()
            os.close(self.fd)

    def _adopt(self, meta: dict) -> None:
        """Continue the partial its sidecar describes, if the resume rules allow it."""
        if not (meta.get("segments") and can_resume(meta, self.remote, self.file)):
            meta.clear()
            return
        self.ranges = Ranges.from_json(meta["segments"])
        self.total = meta.get("size", self.total)
        self.validator = Validator.parse(meta.get("validator")) or self.validator
        log.info(
            "%s: resuming %s at byte %d of %s",
            self.remote.source,
            self.file.filename,
            self.ranges.downloaded(),
            self.total,
        )

    def _transfer_with_restarts(self) -> None:
        """The transfer, and once more from zero if the held bytes turn out to be of no use; a
        second `Restart` reaches the caller."""
        try:
            self._transfer()
        except Restart as exc:
            log.warning(
                "%s: %s; discarding the partial %s and fetching it from zero",
                self.url,
                exc,
                self.file.filename,
            )
            self._restart(exc.one_stream)
            self._transfer()

    def _new_probe(self) -> None:
        self.probe.result()
        self.probe = HeaderProbe(self.fd, enabled=is_gguf_name(self.file.filename))

    def _forget_bytes(self) -> None:
        """Before a held byte is overwritten: readers of the partial stop here, and the hash and
        the header probe start over (the one reset every restart path shares)."""
        self.partial.generation += 1
        self._new_probe()
        if self.hasher is not None:
            self.hasher.stop()
            self.hasher = None
        self.partial.verified = 0

    def _restart(self, one_stream: bool) -> None:
        """Discard everything held: the next `_transfer` fetches the file from zero."""
        self._forget_bytes()
        self.saver.stop()  # no sidecar for the old bytes may land after this
        self.saver = Background(self._save, "llmlb-sidecar")
        self.cancel.clear()
        self.ranges = Ranges()
        self.partial.meta.clear()
        os.ftruncate(self.fd, 0)
        self.total = self.declared
        self.validator = Validator.parse(self.remote.validator)
        self.preallocated = False
        self.one_stream = one_stream

    def _new_hasher(self) -> PrefixHasher:
        self.partial.verified = 0
        hasher = PrefixHasher(self.fd, on_hashed=self._hashed)
        hasher.start()
        return hasher

    def _hashed(self, pos: int) -> None:
        self.partial.verified = pos

    def _transfer(self) -> None:
        if not self.ranges:
            # One connection first. If it turns out slow (a per-connection cap), the rest of the
            # file is split over more; a fast one is kept, since more connections would only add
            # CPU work on this side. Splitting needs a strong validator (ETag or sha256): ranges
            # of different versions of a file must never be joined.
            self.ranges = Ranges([Segment(0, self.total, 0)])
            ranged = self.remote.ranges and not self.one_stream
            self.may_split = ranged and self.s.download_connections > 1
        self._preallocate()
        self.hasher = self._new_hasher()
        self._note_progress(force=True)
        todo = self.ranges.todo()
        for seg in todo[1:]:
            self._spawn(seg)
        try:
            if todo:
                self._run_segment(todo[0])
            self._join()
            self._check_leads()
        except Cancelled:
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

    def _spawn(self, seg: Segment) -> None:
        def work() -> None:
            try:
                self._run_segment(seg)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self.errors.append(exc)
                self.cancel.set()

        thread = threading.Thread(target=work, name=f"llmlb-range-{seg.start}", daemon=True)
        self.workers.append(thread)
        thread.start()

    def _join(self, quiet: bool = False) -> None:
        for thread in self.workers:
            thread.join()
        self.workers = []
        errors, self.errors = self.errors, []
        if errors and not quiet:
            # A stall or a source failure matters more than the cancellations it caused.
            raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])

    def _learn_size(self, response: httpx.Response, verdict: Plan) -> None:
        """From the first answer: whether the file may be split later (without a strong
        validator it is fetched in one stream, resumed over an overlap)."""
        if response.status_code != 206 or self.total is None or not verdict.split:
            self.may_split = False
        self._preallocate()

    def _check_leads(self) -> None:
        """Each parallel range's first bytes repeated its neighbour's last: they must agree."""
        for seg in self.ranges.segments:
            lead = seg.lead
            if lead and os.pread(self.fd, len(lead), seg.start - len(lead)) != lead:
                raise IntegrityError(
                    f"{self.file.filename}: {self.remote.source} sent other bytes before offset "
                    f"{seg.start} in the range starting there than in the range before it "
                    f"(two versions of the file under one ETag {self.validator})"
                )

    def _agree(self, size: int, label: str, seg: Segment) -> None:
        """Every size a server states must match what is known: never trim, never pad."""
        if self.total is None:
            self.total = size
            if seg.end is None and len(self.ranges) == 1:
                seg.close_at(size)
            return
        if size == self.total:
            return
        if self.declared is not None:
            raise IntegrityError(
                f"{self.file.filename}: {self.remote.source} states {size} bytes ({label}), "
                f"but the file is {self.declared} bytes (as the catalog or source metadata says)"
            )
        raise Restart(f"{label} says {size} bytes, the server said {self.total} before")

    def _maybe_split(self, seg: Segment, probe: list[float]) -> None:
        """After the probe window, split the rest of a slow single stream over N connections."""
        now = time.monotonic()
        if not probe:
            probe.extend((now, seg.done))
            return
        elapsed = now - probe[0]
        if elapsed < _PROBE_S:
            return
        self.may_split = False
        rate = (seg.done - probe[1]) / elapsed
        n = self.s.download_connections
        if self.total is None or seg.end is None or self.total < self.s.parallel_threshold:
            return
        if seg.end - seg.done < n * MIN_PART:
            return
        if rate >= self.s.split_below:
            log.debug("%s: %.0f MB/s on one connection; not splitting", self.file, rate / 1e6)
            return
        extra = self.ranges.split(seg, n)
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
        needed = self.total - self.ranges.downloaded()
        disk.preallocate(self.fd, self.partial.path, self.total, needed)

    # One segment --------------------------------------------------------------------------
    def _run_segment(self, seg: Segment) -> None:
        tries = _Tries(seg.done)
        while not seg.finished:
            if self.cancel.is_set():
                raise Cancelled()
            try:
                self._attempt(seg, tries)
            except (SourceError, Restart, Cancelled, IntegrityError):
                raise
            except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
                self._stalled(seg, tries, exc)
            except (httpx.TransportError, http.RetryableStatus, ShortBody) as exc:
                self._failed(seg, tries, exc)

    def _held(self, seg: Segment) -> Held:
        parts = len(self.ranges)
        return Held(seg.start, seg.end, seg.done, parts, self.validator, self.total)

    def _offer(self, response: httpx.Response | None = None) -> Offer:
        """What the server offers: before a request, only what is known of the file."""
        known = Offer(self.remote.source, sha256=bool(self.sha256), one_stream=self.one_stream)
        if response is None:
            return known
        return replace(known, validator=answer_validator(response), status=response.status_code)

    def _attempt(self, seg: Segment, tries: _Tries) -> None:
        """One request for the rest of `seg`, streamed to disk until it ends."""
        plan = decide(self._held(seg), self._offer())
        if plan.action == "restart":
            raise Restart(plan.why)
        seg.lead = b""
        deadline = self.s.connect_timeout + self.s.stall_timeout
        response = http.get_range(self.clients, self.remote, plan.range, deadline)
        try:
            verdict = decide(self._held(seg), self._offer(response))
            if verdict.action == "finished":
                seg.finish_at(self.total or seg.done)
                return  # 416 at the end: nothing left to fetch
            if verdict.action == "restart":
                raise Restart(verdict.why, one_stream=response.status_code == 416)
            start, limit = self._check_response(response, seg, plan.offset)
            if self.may_split and seg is self.ranges.first:
                self._learn_size(response, verdict)
            for _ in self._stream(response, seg, start, limit):
                tries.progress(seg.done)
            if seg.end is None:
                seg.close_at(seg.done)
                self.total = seg.done
            elif seg.done < seg.end:
                raise ShortBody(f"the body ended at byte {seg.done} of {seg.end}")
        finally:
            response.close()

    def _stalled(self, seg: Segment, tries: _Tries, exc: Exception) -> None:
        tries.stalls += 1
        self._note_progress(force=True)
        if tries.stalls >= self.s.max_stalls:
            raise DownloadStalledError(
                self.remote.source, self.url, seg.done, tries.stalls, self.s.stall_timeout
            ) from exc
        log.warning(
            "%s: no data for %gs at byte %d of %s; reconnecting",
            self.remote.source,
            self.s.stall_timeout,
            seg.done,
            self.file.filename,
        )

    def _failed(self, seg: Segment, tries: _Tries, exc: Exception) -> None:
        if isinstance(exc, httpx.ConnectError) and seg.done == 0 and tries.furthest == 0:
            kind, message = describe_exception(exc)
            if kind in ("refused", "dns"):
                raise fail(self.remote.source, kind, message, self.url) from exc
        tries.failures += 1
        if tries.failures >= self.s.max_retries:
            kind, message = describe_exception(exc)
            if isinstance(exc, http.RetryableStatus):
                kind, message = "http", str(exc)
            elif isinstance(exc, ShortBody):
                kind, message = "network", str(exc)
            message = f"{message} (after {tries.failures} attempts)"
            raise fail(self.remote.source, kind, message, self.url) from exc
        delay = http.retry_delay(exc, tries.failures, self.s.retry_backoff)
        log.info(
            "%s: %s at byte %d of %s; retrying in %.1fs",
            self.remote.source,
            exc,
            seg.done,
            self.file.filename,
            delay,
        )
        if self.cancel.wait(delay):
            raise Cancelled() from exc

    def _check_response(
        self, response: httpx.Response, seg: Segment, offset: int
    ) -> tuple[int, int | None]:
        """Accept the answer for `seg` (asked from `offset`) or raise. Returns the file offsets
        where its body starts and which it must not go past (None: unknown)."""
        http.raise_for_status(response, self.remote, self.file.filename)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # We ask for identity: a compressed body is not the file's bytes, whatever its name
            # (a GGUF's magic check would catch it, a non-GGUF file without a sha256 would not).
            raise IntegrityError(
                f"{self.file.filename}: {self.remote.source} sent it with Content-Encoding "
                f"{encoding!r}, not the file's own bytes"
            )
        self._record_validator(answer_validator(response))
        if response.status_code == 200:
            return self._whole_answer(response, seg)
        return self._range_answer(response, seg, offset)

    def _record_validator(self, answer: Validator | None) -> None:
        """The answer's validator becomes the file's when none is known, or when it is only weak
        (`decide` has made sure the values agree)."""
        if answer is not None and (self.validator is None or not answer.strong):
            self.validator = answer
            self.partial.meta["validator"] = str(answer)

    def _whole_answer(self, response: httpx.Response, seg: Segment) -> tuple[int, int | None]:
        """A 200: the whole file from byte 0, whatever was asked."""
        length = http.int_header(response, "content-length")
        if length is not None:
            self._agree(length, "Content-Length", seg)
        if seg.done != 0:
            if seg.start != 0 or len(self.ranges) > 1:
                raise Restart("the server ignores Range", one_stream=True)
            # One stream restarted by a server that ignores Range: this body is the file anew.
            log.info("%s ignored Range; restarting %s from 0", self.url, self.file.filename)
            self._forget_bytes()
            seg.rewind(0)
            self.hasher = self._new_hasher()
        return 0, length if length is not None else self.total

    def _range_answer(
        self, response: httpx.Response, seg: Segment, offset: int
    ) -> tuple[int, int | None]:
        """A 206: its Content-Range must be the range asked for, of the file's known size."""
        first, last, total = http.content_range(response)
        if first is None or last is None or last < first:
            raise IntegrityError(
                f"{self.file.filename}: {self.remote.source} answered 206 with Content-Range "
                f"{response.headers.get('content-range')!r}"
            )
        if total is not None:
            self._agree(total, "Content-Range", seg)
        if first != offset:
            message = f"asked for byte {offset}, server sent from {first}"
            raise fail(self.remote.source, "http", message, self.url)
        length = http.int_header(response, "content-length")
        if length is not None and length != last - first + 1:
            raise IntegrityError(
                f"{self.file.filename}: {self.remote.source} sent Content-Length {length} for "
                f"the {last - first + 1} bytes of Content-Range {first}-{last}"
            )
        return first, last + 1

    def _stream(
        self, response: httpx.Response, seg: Segment, start: int, limit: int | None
    ) -> Iterator[int]:
        head: bytes | None = b"" if seg.done == 0 and is_gguf_name(self.file.filename) else None
        probe: list[float] = []
        pos = start  # the file offset of the next body byte
        for raw in response.iter_raw():
            if self.cancel.is_set():
                raise Cancelled()
            if limit is not None and pos + len(raw) > limit:
                raise IntegrityError(
                    f"{self.file.filename}: {self.remote.source} sent more than the "
                    f"{limit} bytes it announced"
                )
            chunk, pos = self._past_overlap(raw, pos, seg)
            n = seg.room(len(chunk))
            if not n:
                continue
            if n < len(chunk):
                chunk = chunk[:n]  # a split shortened this segment; another one has the rest
            if head is not None:  # refuse an HTML error page at its first bytes, not after 4 GB
                head = self._check_magic(head, chunk)
            os.pwrite(self.fd, chunk, seg.done)
            seg.advance(n)
            pos += n
            if self.may_split and seg is self.ranges.first:
                self._maybe_split(seg, probe)
            self._note_progress()
            yield n
            if seg.finished:
                return

    def _past_overlap(self, chunk: bytes, pos: int, seg: Segment) -> tuple[bytes, int]:
        """The part of `chunk` (body bytes from file offset `pos`) past what `seg` holds, and its
        offset. Bytes before the segment's start are its lead (compared at the end); bytes it
        holds must equal the disk's, or the server serves another version now."""
        if pos < seg.start:
            k = min(len(chunk), seg.start - pos)
            seg.lead += bytes(chunk[:k])
            chunk, pos = chunk[k:], pos + k
        if pos >= seg.done or not chunk:
            return chunk, pos
        k = min(len(chunk), seg.done - pos)
        if os.pread(self.fd, k, pos) != bytes(chunk[:k]):
            raise Restart(f"the {k} bytes before offset {seg.done} differ on resume")
        return chunk[k:], pos + k

    def _check_magic(self, head: bytes, chunk: bytes) -> bytes | None:
        """The file's first bytes so far; None once they proved to be a GGUF's."""
        head += bytes(chunk[: 4 - len(head)])
        if len(head) < 4:
            return head
        if head != GGUF_MAGIC:
            raise IntegrityError(
                f"{self.file.filename}: {self.remote.source} sent {head[:4]!r} where "
                "a GGUF file starts with b'GGUF' (an error page?)"
            )
        return None

    # Bookkeeping ---------------------------------------------------------------------------
    def _note_progress(self, force: bool = False) -> None:
        done = self.ranges.downloaded()
        mark = self.ranges.watermark()
        if self.hasher is not None:
            self.hasher.advance(mark)
        self.probe.offer(mark)
        self.progress(done, self.total)
        if force:
            self._save()
        elif self.clock.due(done, self.total):
            # The sync a save waits for must not stall a connection: a thread of its own does it.
            self.clock.mark(done)
            self.saver.request()

    def _save(self) -> None:
        """Write the sidecar that vouches for the bytes held, after those bytes are on disk:
        after a power cut it never claims bytes that are zeros (the file is preallocated)."""
        with self.lock:
            segments = self.ranges.to_json()  # taken before the sync below
            disk.fdatasync(self.fd)
            self.clock.mark()
            self.partial.meta.update(
                segments=segments,
                size=self.total,
                validator=None if self.validator is None else str(self.validator),
                source=self.remote.source,
                url_host=host_of(self.url),
            )
            self.partial.save(durable=True)
