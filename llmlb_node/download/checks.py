"""What proves a file: the sha256 hashed from disk as its prefix grows, the GGUF header parsed
while the file arrives, and the checks at the end (sizes, digests, the GGUF's declared extent)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable

from ..catalog import ModelFile
from ..errors import IntegrityError
from ..gguf import GGUFError, GGUFHeader, check_complete, read_header_prefix
from ..sources.base import Remote
from . import disk

HASH_BLOCK = 4 * 1024 * 1024


def is_gguf_name(filename: str) -> bool:
    return filename.lower().endswith(".gguf")


def declared_size(remote: Remote, file: ModelFile) -> int | None:
    """The exact size known before the transfer; the catalog and the source must agree on it."""
    if remote.size is not None and file.size_bytes is not None and remote.size != file.size_bytes:
        raise IntegrityError(
            f"{file.filename}: {remote.source} says {remote.size} bytes, "
            f"the catalog says {file.size_bytes}"
        )
    return remote.size if remote.size is not None else file.size_bytes


def verify_fetched(
    remote: Remote,
    path: str | os.PathLike[str],
    file: ModelFile,
    size: int,
    digest: str,
    header: GGUFHeader | None,
) -> None:
    """Raise `IntegrityError` unless the finished file has every size and sha256 stated for it
    and, for a GGUF, the extent its header declares."""
    expected_size = declared_size(remote, file)
    if expected_size is not None and size != expected_size:
        raise IntegrityError(
            f"{file.filename}: got {size} bytes, expected {expected_size} (from {remote.source})"
        )
    for label, want in (("the catalog", file.sha256), (remote.source, remote.sha256)):
        if want and want != digest:
            raise IntegrityError(
                f"{file.filename}: sha256 {digest} does not match {want} given by {label}"
            )
    if is_gguf_name(file.filename):
        try:
            verify_gguf(path, file.filename, header)
        except GGUFError as exc:
            raise IntegrityError(f"{exc} (from {remote.source})") from None


def etag_sha256(remote: Remote, file: ModelFile, etag: str | None, digest: str) -> None:
    """Raise `IntegrityError` unless the bytes hash to the sha256 the server's ETag states."""
    if etag and len(etag) == 64 and etag != digest:
        raise IntegrityError(
            f"{file.filename}: sha256 {digest} does not match {etag}, the ETag {remote.source} "
            "sent: it served bytes it had not verified"
        )


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


class HeaderProbe:
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


class PrefixHasher:
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
        if mark - self.mark >= HASH_BLOCK:
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
                block = os.pread(self.fd, min(HASH_BLOCK, mark - self.pos), self.pos)
                if not block:
                    return  # the file is shorter than claimed; finish() reports it
                self.h.update(block)
                disk.start_writeback(self.fd, self.pos, len(block))
                self.pos += len(block)
                self.on_hashed(self.pos)
            if final is not None:
                return
