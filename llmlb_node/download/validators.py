"""Validators and resume rules: which bytes may be continued from which server, and how a
continued request proves it reads the same version of the file."""

from __future__ import annotations

import httpx

from ..catalog import ModelFile
from ..sources.base import Remote

OVERLAP = 64 * 1024  # a resume without a strong validator re-reads this much and compares


class SourceChanged(Exception):
    """The server now serves other bytes than the partial file was started with."""


class RangesIgnored(Exception):
    """The server answered 200 to a Range request for a segment that does not start at 0."""


def etag_of(response: httpx.Response) -> str | None:
    value = response.headers.get("x-linked-etag") or response.headers.get("etag")
    if not value:
        return None
    return value.strip().removeprefix("W/").strip('"').lower()


def weak_match(a: str, b: str) -> bool:
    return a.strip('"').lower() == b.strip('"').lower()


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


def overlap(sha256: str | None, start: int, done: int) -> int:
    """How many held bytes to ask for again and compare before resuming a segment.

    With a sha256 known up front the final hash proves the whole file; otherwise the
    server's answer must match the tail of what this segment already holds.
    """
    if sha256:
        return 0
    return min(OVERLAP, done - start)


def check_validator(
    known: str | None, response: httpx.Response, sha256: str | None, start: int, done: int
) -> str | None:
    """The validator to keep after `response` (for a segment `start`..`done`), or raise
    `SourceChanged` when the answer is of another version than the bytes held."""
    etag = etag_of(response)
    if known is None:
        return etag
    if etag and etag != known and not weak_match(etag, known):
        raise SourceChanged(f"ETag {etag} differs from {known}")
    if not etag and not sha256 and done == start > 0:
        # A range of a split file with nothing of its own to compare: only a validator
        # proves it comes from the same version as the rest.
        raise SourceChanged("a range came without the ETag the file was started with")
    return known
