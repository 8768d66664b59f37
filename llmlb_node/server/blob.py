"""``GET``/``HEAD /v0/models/blob/{id}[?file=NAME]``: this node's files for other nodes.

The contract our proxy source consumes (the llmlb blob endpoint, with Range): an installed file
is served by Starlette's `FileResponse`; a catalog model not installed yet is downloaded (or the
download under way is joined) and served while it arrives, in order, as far as it is verified.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse

from ..catalog import ModelEntry, ModelFile
from ..resolver import Filling, ModelResolver, ResolvedModel
from .pool import ModelPool

log = logging.getLogger(__name__)

CHUNK = 1 << 20
"""Bytes per read and per body message (Starlette's FileResponse default is 64 KiB)."""
POLL_S = 0.01
"""How often a reader that caught up with a download looks for more bytes."""
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class ServedFile:
    """One installed file: where it is, its size and sha256 (from the install record)."""

    path: Path
    size: int
    sha256: str | None


class Feeds:
    """The downloads this node runs for blob requests: one resolve per model, shared by every
    request for it (and joined with an inference request's download by the resolver itself).

    They run like the pool's own: in its worker threads, with its progress hook (metrics, and
    the clean shutdown that stops them resumably).
    """

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool
        self._tasks: dict[str, asyncio.Future[ResolvedModel]] = {}

    def download(self, model_id: str) -> asyncio.Future[ResolvedModel]:
        task = self._tasks.get(model_id)
        if task is None or task.done():
            pool = self.pool
            resolve = functools.partial(
                pool.resolver.resolve, model_id, progress=pool.progress_hook()
            )
            task = asyncio.get_running_loop().run_in_executor(pool.executor, resolve)
            task.add_done_callback(_retrieve)
            self._tasks[model_id] = task
        return task


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.info("blob download failed: %s", task.exception())


# -- the handler -----------------------------------------------------------------------------
async def blob(request: Request) -> Response:
    pool: ModelPool = request.state.pool
    model_id = request.path_params["model_id"]
    filename = request.query_params.get("file")
    await pool.check_known(model_id)  # 404 model_not_found, no network
    served = await asyncio.to_thread(installed_file, pool.resolver, model_id, filename)
    if served is not None:
        return file_response(served)
    entry = pool.resolver.catalog.get(model_id)
    file = _catalog_file(entry, filename)
    return await _pull_through(request, entry, file)


def installed_file(
    resolver: ModelResolver, model_id: str, filename: str | None
) -> ServedFile | None:
    """The installed file (`filename`, else the model's main file), or None if not installed;
    404 when the model is installed without that file."""
    found = resolver.installed(model_id)
    if found is None:
        return None
    base = resolver.settings.models_dir / model_id
    names = [p.relative_to(base).as_posix() for p in found.paths]
    name = filename or names[0]
    if name not in names:
        raise _no_file(model_id, name)
    record = resolver.store.read_record(model_id)
    files = {f.filename: f for f in record.files} if record is not None else {}
    path = base / name
    sha256 = files[name].sha256 if name in files else None
    return ServedFile(path, path.stat().st_size, sha256)


def file_response(served: ServedFile) -> Response:
    headers = {"accept-ranges": "bytes"}
    if served.sha256:
        headers["etag"] = f'"{served.sha256}"'
    response = FileResponse(
        served.path,
        headers=headers,
        media_type="application/octet-stream",
        filename=served.path.name,
    )
    response.chunk_size = CHUNK
    return response


def _catalog_file(entry: ModelEntry, filename: str | None) -> ModelFile:
    if filename is None:
        return entry.files[0]
    for f in entry.files:
        if f.filename == filename:
            return f
    raise _no_file(entry.id, filename)


def _no_file(model_id: str, filename: str) -> HTTPException:
    return HTTPException(404, f"model {model_id!r} has no file {filename!r}")


# -- pull-through ----------------------------------------------------------------------------
async def _pull_through(request: Request, entry: ModelEntry, file: ModelFile) -> Response:
    """Serve `file` while this node downloads it: headers as soon as its size is known, then
    bytes as far as they are verified in order; a range past them waits for them."""
    resolver: ModelResolver = request.state.pool.resolver
    task = request.state.feeds.download(entry.id)
    known = await _size_known(resolver, entry.id, file.filename, task)
    if known is None:  # installed before a byte could be followed: serve the file
        served = await asyncio.to_thread(installed_file, resolver, entry.id, file.filename)
        assert served is not None
        return file_response(served)
    filling, generation, size = known
    headers = {
        "accept-ranges": "bytes",
        "content-type": "application/octet-stream",
        "content-disposition": f'attachment; filename="{Path(file.filename).name}"',
    }
    if filling.sha256:
        headers["etag"] = f'"{filling.sha256}"'
    try:
        start, end, status = _span(request.headers.get("range"), size)
    except _Unsatisfiable:
        headers["content-range"] = f"bytes */{size}"
        return Response(status_code=416, headers=headers)
    headers["content-length"] = str(end + 1 - start)
    if status == 206:
        headers["content-range"] = f"bytes {start}-{end}/{size}"
    follower = _Follower(resolver, entry.id, file.filename, filling, task, generation, size)
    try:
        await follower.open()
        # Until the first byte is there, a failed download can still be a 502 (after it, only
        # a short body): a range past the bytes arrived waits here.
        await follower.wait_for(start)
    except BaseException:
        follower.close()
        raise
    if request.method == "HEAD":
        follower.close()
        return Response(status_code=status, headers=headers)
    body = follower.read(start, end)
    return StreamingResponse(
        body, status_code=status, headers=headers, background=BackgroundTask(follower.close)
    )


async def _size_known(
    resolver: ModelResolver, model_id: str, filename: str, task: asyncio.Future[ResolvedModel]
) -> tuple[Filling, int, int] | None:
    """The download of `filename` once its exact size is known, with the generation of the
    partial file that size belongs to; None if it finished first. Raises the download's error
    (ModelDownloadError: 502) if it failed."""
    while True:
        filling = resolver.filling(model_id, filename)
        if filling is not None:
            generation = filling.partial.generation  # read before the size it vouches for
            size = filling.size
            if size is not None and filling.partial.generation == generation:
                return filling, generation, size
        if task.done():
            task.result()
            return None
        await asyncio.wait({task}, timeout=POLL_S)


class _Unsatisfiable(Exception):
    """A Range that starts past the end of the file."""


def _span(value: str | None, size: int) -> tuple[int, int, int]:
    """(first byte, last byte, status) for a Range header; a malformed or multi-range header
    is ignored (the whole file, 200), as RFC 9110 allows."""
    match = _RANGE.fullmatch((value or "").strip())
    if match is None or match.groups() == ("", ""):
        return 0, size - 1, 200
    first, last = match.groups()
    if not first:  # the last N bytes
        if int(last) == 0:
            raise _Unsatisfiable
        return max(0, size - int(last)), size - 1, 206
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise _Unsatisfiable
    return start, end, 206


class _Follower:
    """Reads a file while it is being downloaded: never past its verified prefix.

    Follows the download to a next source's partial file if one fails, and to the installed file
    if another process finished it; ends the response early (a short body the client notices)
    if the download fails.
    """

    def __init__(
        self,
        resolver: ModelResolver,
        model_id: str,
        filename: str,
        filling: Filling,
        task: asyncio.Future[ResolvedModel],
        generation: int,
        size: int,
    ) -> None:
        self.resolver = resolver
        self.model_id = model_id
        self.filename = filename
        self.filling: Filling | None = filling
        self.task = task
        self.path = filling.partial.path
        self.fd = -1
        self.generation = generation
        self.size = size
        """Promised in the response's headers: every byte sent must be of the version of the
        file that size belongs to (this partial, never rewritten, or the file it became)."""

    async def open(self) -> None:
        """Open the partial file now: the download renames it into place when it ends."""
        try:
            self.fd = await asyncio.to_thread(os.open, self.path, os.O_RDONLY)
        except FileNotFoundError:  # it just ended (or moved on to another source)
            await asyncio.wait({self.task})
            self.task.result()
            served = await asyncio.to_thread(
                installed_file, self.resolver, self.model_id, self.filename
            )
            if served is None or served.size != self.size:  # not the version promised
                raise _VersionChanged(f"{self.filename}: installed from other bytes") from None
            self.filling = None
            await self._reopen(served.path)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    async def wait_for(self, pos: int) -> None:
        """Wait until byte `pos` is verified; raise the download's error if it fails first."""
        while self._ready() <= pos:
            await self._wait_for_more(pos)

    async def read(self, start: int, end: int) -> AsyncIterator[bytes]:
        pos = start
        try:
            while pos <= end:
                ready = self._ready()
                if ready > pos:
                    n = min(CHUNK, ready - pos, end + 1 - pos)
                    data = await asyncio.to_thread(os.pread, self.fd, n, pos)
                    if not data:
                        raise OSError(f"{self.path} ends at byte {pos}")
                    self._check_same()  # the read may have met a restart: checked after it
                    pos += len(data)
                    yield data
                else:
                    await self._wait_for_more(pos)
        finally:
            self.close()

    def _ready(self) -> int:
        """Bytes that may be sent: hashed in order, and never the last one before the whole
        file is proven (a download failing its checks then ends every body short)."""
        if self.filling is None:
            return 1 << 62
        if self.filling.proven.is_set():
            return self.filling.verified
        return min(self.filling.verified, self.size - 1)

    def _check_same(self) -> None:
        """End the response short (the client resumes and checks what it holds) rather than
        go on with bytes of another version than those already sent."""
        if self.filling is not None and self.filling.partial.generation != self.generation:
            raise _VersionChanged(f"{self.path}: the download started the file again")

    async def _wait_for_more(self, pos: int) -> None:
        if self.task.done():
            self.task.result()  # the download failed: end this response short
            filling = self.filling
            if filling is not None and (filling.verified <= pos or not filling.proven.is_set()):
                await self._switch_to_installed()  # proven by its install, if it is that file
            return
        self._check_same()
        now = self.resolver.filling(self.model_id, self.filename)
        if now is not None and now is not self.filling:
            await self._switch(now)
        await asyncio.wait({self.task}, timeout=POLL_S)

    async def _switch(self, filling: Filling) -> None:
        """Another partial file now takes the bytes (the next source, after one failed): it
        may hold another version than the one this response promised, so the response ends
        (before its first byte: an error the client retries; after: a short body it resumes,
        checking what it holds)."""
        raise _VersionChanged(f"{self.filename}: the download moved to {filling.partial.path}")

    async def _switch_to_installed(self) -> None:
        served = await asyncio.to_thread(
            installed_file, self.resolver, self.model_id, self.filename
        )
        if served is None:
            raise OSError(f"{self.model_id}/{self.filename}: downloaded but not installed")
        # Only the very file this response read from, renamed into place and never rewritten,
        # may finish it.
        same = await asyncio.to_thread(_same_file, self.fd, served.path)
        rewritten = self.filling is not None and self.filling.partial.generation != self.generation
        if not same or rewritten:
            raise _VersionChanged(f"{self.filename}: installed from other bytes")
        self.filling = None
        await self._reopen(served.path)

    async def _reopen(self, path: Path) -> None:
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        self.close()
        self.fd, self.path = fd, path


class _VersionChanged(OSError):
    """The bytes after those already sent would be of another version: end the body short."""


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
