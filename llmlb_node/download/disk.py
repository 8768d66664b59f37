"""Disk durability for partial files: opening them safely, preallocation, early writeback and the
sync that must come before a sidecar vouches for bytes."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import InsufficientDiskSpaceError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a symlink planted at a partial's path is not followed


def open_partial(path: os.PathLike[str] | str, truncate: bool = False) -> int:
    """The partial file's descriptor, read-write, created if missing; never through a symlink."""
    flags = os.O_RDWR | os.O_CREAT | NOFOLLOW | (os.O_TRUNC if truncate else 0)
    return os.open(path, flags, 0o644)


def preallocate(fd: int, path: Path, total: int, needed: int) -> None:
    """Reserve `total` bytes for the file, or raise `InsufficientDiskSpaceError` when the `needed`
    bytes still to come do not fit. A filesystem that cannot preallocate still takes writes."""
    free = free_bytes(path)
    if needed > free:
        raise InsufficientDiskSpaceError(path.parent, needed, free)
    with contextlib.suppress(AttributeError):  # no posix_fallocate on macOS
        try:
            os.posix_fallocate(fd, 0, total)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            # EOPNOTSUPP and friends: the filesystem cannot preallocate; writes still work.


def fdatasync(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)


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


def start_writeback(fd: int, offset: int, n: int) -> None:
    """Start writing a verified block to disk now, so the fsync before publishing has little
    left to wait for (the pages stay cached for llama.cpp's load)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, n)


def free_bytes(path: os.PathLike[str] | str) -> int:
    try:
        return shutil.disk_usage(os.path.dirname(os.fspath(path))).free
    except OSError:
        return 0
