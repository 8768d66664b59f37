"""The seam between the resolver and the places bytes come from.

A `Source` answers one question, `locate(entry, file) -> Remote`: where are this file's bytes?
It knows nothing of locks, partial files or progress; `download/` fetches what it returns.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..catalog import ModelEntry, ModelFile
from ..errors import SourceError, SourceFailure


@dataclass(frozen=True)
class Remote:
    """Where one file's bytes are, as a source found them."""

    source: str
    """The label of the source that found it (for errors, progress and the install record)."""
    url: str | None = None
    """HTTP(S) URL of the bytes; None for a local source."""
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Extra request headers, which may hold a secret: sent only to `auth_origin`."""
    auth_origin: str | None = None
    """A URL of the one origin (scheme, host, port) `headers` may go to; see `may_carry_secret`."""
    size: int | None = None
    """Exact size, when the source knows it before the transfer."""
    sha256: str | None = None
    """Exact sha256 the source vouches for (the Hub's LFS etag), checked after download."""
    validator: str | None = None
    """Identifies this version of the bytes, so a partial file resumes only against the same one."""
    parts: tuple[Path, ...] = ()
    """For local sources: files whose concatenation is the file."""
    ranges: bool = True
    """Whether the source is expected to honour Range (False skips parallel ranged download)."""
    etag_is_sha256: bool = False
    """The server's ETag states the file's sha256 (llmlb's blob endpoint): the bytes must hash
    to it, as to any sha256 known up front."""


class Source(ABC):
    """One external source of model files (Hugging Face, a URL, installed packages, the proxy)."""

    label: str = "source"
    pinned: str | None = None
    """The revision (a commit) every file of this source came from, once the source knows it:
    the install record keeps it."""

    @abstractmethod
    def locate(self, entry: ModelEntry, file: ModelFile) -> Remote:
        """Return where `file` of `entry` can be fetched, or raise `SourceError` saying why not."""


def fail(source: str, kind: str, message: str, url: str | None = None) -> SourceError:
    """A `SourceError` for `source`; raise the result."""
    return SourceError(SourceFailure(source=source, kind=kind, message=message, url=url))


def host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def origin_allowed(url: str, allowlist: tuple[str, ...]) -> bool:
    """True when `url`'s host matches a pattern of `allowlist` (an empty list allows all)."""
    if not allowlist:
        return True
    host = host_of(url)
    return any(fnmatch.fnmatchcase(host, pattern) for pattern in allowlist)


def check_origin(source: str, url: str, allowlist: tuple[str, ...]) -> None:
    """Raise a `blocked` `SourceError` when `url`'s host is not on the allowlist."""
    if not origin_allowed(url, allowlist):
        raise fail(
            source,
            "blocked",
            f"host {host_of(url)!r} is not in LLMLB_ORIGIN_ALLOWLIST ({','.join(allowlist)})",
            url,
        )
