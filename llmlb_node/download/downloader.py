"""The downloader's front: `Downloader.fetch(remote, partial, file)` fills a partial file from
HTTP or local parts, verifies it, and says every failure as the failure of that source."""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass

import httpx

from ..catalog import ModelFile
from ..errors import DownloadStalledError, InsufficientDiskSpaceError, IntegrityError, SourceError
from ..gguf import GGUFError, GGUFHeader
from ..settings import Settings
from ..sources.base import Remote, fail
from ..store import Partial
from . import checks, disk, http
from .parts import copy_parts
from .transfer import HttpTransfer, ProgressFn
from .validators import Restart


@dataclass(frozen=True)
class Fetched:
    """A verified file sitting in its temporary path, ready to publish."""

    path: str
    size: int
    sha256: str
    source: str


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
                    client = http.new_client(self.settings, tls=scheme == "https")
                    self._clients[scheme] = client
        return client

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
        try:
            size, digest = self._fill(remote, partial, file, progress or (lambda done, total: None))
        except InsufficientDiskSpaceError:
            partial.discard()
            raise
        except OSError as exc:
            if isinstance(exc, DownloadStalledError):  # a TimeoutError, so an OSError too
                raise
            raise _disk_failure(exc, remote, partial, file) from exc
        except (IntegrityError, GGUFError) as exc:
            partial.discard()
            raise fail(remote.source, "integrity", str(exc), remote.url) from exc
        except Restart as exc:  # a second time: fetching it from zero did not help
            partial.discard()
            message = f"{file.filename}: {exc}, again after fetching it from zero"
            raise fail(remote.source, "http", message, remote.url) from exc
        except (SourceError, DownloadStalledError):
            if not any(s[2] > s[0] for s in partial.meta.get("segments", [])):
                partial.discard()  # nothing worth resuming
            raise
        return Fetched(str(partial.path), size, digest, remote.source)

    def _fill(
        self, remote: Remote, partial: Partial, file: ModelFile, progress: ProgressFn
    ) -> tuple[int, str]:
        header: GGUFHeader | None = None
        checks.declared_size(remote, file)
        if remote.parts:
            size, digest, header = copy_parts(remote, partial, file.filename, progress)
        else:
            transfer = HttpTransfer(self, remote, partial, file, progress)
            size, digest = transfer.run()
            header = transfer.probe.result()
            if remote.etag_is_sha256:
                stated = transfer.validator
                checks.etag_sha256(remote, file, stated and stated.value, digest)
        checks.verify_fetched(remote, partial.path, file, size, digest, header)
        return size, digest


def _disk_failure(
    exc: OSError, remote: Remote, partial: Partial, file: ModelFile
) -> InsufficientDiskSpaceError | SourceError:
    """A full disk as such (the partial discarded), any other OSError as this source's failure
    (the partial file removed by hand mid-download, a directory made read-only, ...)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        partial.discard()
        return InsufficientDiskSpaceError(
            partial.path.parent, file.expected_size or 0, disk.free_bytes(partial.path)
        )
    where = exc.filename or partial.path
    return fail(remote.source, "disk", f"{file.filename}: {exc.strerror or exc} ({where})")
