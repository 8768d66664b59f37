"""Validators and resume rules: which held bytes may be continued from what a server offers, and
how the next request proves it reads the same version. One decision, `decide`, made three times:
when a partial file is claimed, before each request, and on each answer.

The rules, in order (tests/test_download_rules.py holds the table):

1. A 416 is the end of the file when everything is held; to any other request not from byte 0 it
   means the partial is of no use: restart from zero, in one stream without Range.
2. Sizes stated that differ, or validators that differ: another version; restart.
3. Nothing held: fetch. The file may be split into parallel ranges only under a strong validator
   (an ETag without ``W/``) or a sha256 known up front; a parallel range starts `OVERLAP` bytes
   early, inside its neighbour, and those bytes must equal the neighbour's (else `integrity`).
4. Something held: resume, asking again for up to `OVERLAP` of the held bytes and comparing them
   (unless a sha256 known up front proves the finished file). Bytes of a split file resume only
   under a strong validator or a sha256; another source's bytes only under an equal strong
   validator or a sha256.

A weak ETag or `Last-Modified` never licenses splitting, nor a resume without the overlap check.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from ..catalog import ModelFile
from ..sources.base import Remote

OVERLAP = 64 * 1024  # bytes asked for again and compared before a resume or a parallel range


class Restart(Exception):
    """The held bytes are of no use (another version, a 416 to a resume, Range ignored): discard
    them and fetch the file from zero, once."""

    def __init__(self, why: str, one_stream: bool = False) -> None:
        super().__init__(why)
        self.one_stream = one_stream
        """Fetch it in one stream (the server ignored Range, or refused every resume)."""


@dataclass(frozen=True)
class Validator:
    """An ETag: strong (``"x"``) or weak (``W/"x"``), which only says the bytes are similar."""

    value: str
    strong: bool

    @classmethod
    def parse(cls, raw: str | None) -> Validator | None:
        """From an ETag header, or from a validator recorded by `str()` (``W/x`` when weak)."""
        text = (raw or "").strip()
        weak = text[:2] in ("W/", "w/")
        value = text[2:].strip() if weak else text
        value = value.strip('"').lower()
        return cls(value, not weak) if value else None

    def __str__(self) -> str:
        return self.value if self.strong else f"W/{self.value}"


def answer_validator(response: httpx.Response) -> Validator | None:
    """The validator an answer carries (the Hub's `X-Linked-Etag` first)."""
    h = response.headers
    return Validator.parse(h.get("x-linked-etag") or h.get("etag"))


@dataclass(frozen=True)
class Held:
    """What is held of one segment of a file (or of the whole file, when a partial is claimed)."""

    start: int = 0
    end: int | None = None
    done: int = 0
    parts: int = 1
    """How many segments the file is in: more than one means it was split."""
    validator: Validator | None = None
    """The version the held bytes are of (recorded from the first answer, or the source's)."""
    size: int | None = None
    source: str | None = None


@dataclass(frozen=True)
class Offer:
    """What a server offers now: a source's metadata before any request, or one answer."""

    source: str
    validator: Validator | None = None
    size: int | None = None
    sha256: bool = False
    """A sha256 known up front, which the finished file must match."""
    status: int | None = None
    """The answer's status; None before the request."""
    one_stream: bool = False
    """No Range beyond resuming, and none at byte 0 (after a 416 or a server ignoring Range)."""


@dataclass(frozen=True)
class Plan:
    """What to do next, and the request that does it: its offset and Range header together."""

    action: str
    """``fetch`` (from the segment's start), ``resume``, ``restart`` (discard, from zero) or
    ``finished`` (nothing left to fetch)."""
    why: str
    offset: int = 0
    """The file offset the request starts at (its first byte is the body's first)."""
    range: str | None = None
    """The Range header to send, or None for a plain GET."""
    overlap: int = 0
    """Held bytes before the segment's `done` the answer repeats: they must equal the disk's."""
    lead: int = 0
    """Bytes before the segment's `start` (its neighbour's) the answer repeats, to compare."""
    split: bool = False
    """Whether parallel ranges are licensed."""


def decide(held: Held, offer: Offer) -> Plan:
    """The one resume decision (the rules in this module's docstring, in that order)."""
    if offer.status == 416:
        return _after_416(held)
    if held.size is not None and offer.size is not None and held.size != offer.size:
        return Plan("restart", f"{offer.size} bytes now, {held.size} before")
    old, new = held.validator, offer.validator
    if old is not None and new is not None and old.value != new.value:
        return Plan("restart", f"ETag {new} differs from {old}")
    strong = offer.sha256 or _strong(held, offer)
    if held.done == held.start:
        return _fetch(held, offer, strong)
    return _resume(held, offer, strong)


def _strong(held: Held, offer: Offer) -> bool:
    """A strong validator vouches for this version: the answer's (or, before the request, the
    recorded one, which the answer must then repeat)."""
    vouching = offer.validator
    if offer.status is None:
        vouching = offer.validator or held.validator
    return vouching is not None and vouching.strong


def _after_416(held: Held) -> Plan:
    if held.size is not None and held.done >= held.size:
        return Plan("finished", "416: everything is held")
    if held.done > 0:
        return Plan("restart", "416 to a resume: the partial file is of no use")
    return Plan("fetch", "416 from byte 0")  # the status is the failure


def _fetch(held: Held, offer: Offer, strong: bool) -> Plan:
    if held.start == 0:
        split = strong and not offer.one_stream
        header = None if offer.one_stream else _range(0, held.end)
        return Plan("fetch", "nothing held", 0, header, split=split)
    if offer.status is not None and not strong:
        return Plan("restart", "a parallel range came without a strong validator")
    lead = min(OVERLAP, held.start)
    offset = held.start - lead
    header = _range(offset, held.end)
    return Plan("fetch", "a parallel range", offset, header, lead=lead, split=strong)


def _resume(held: Held, offer: Offer, strong: bool) -> Plan:
    elsewhere = offer.status is None and held.source not in (None, offer.source)
    if elsewhere and not (offer.sha256 or (held.validator and offer.validator and strong)):
        return Plan("restart", f"held bytes came from {held.source}, not {offer.source}")
    if (held.parts > 1 or held.start > 0) and not strong:
        return Plan("restart", "a split file without a strong validator")
    overlap = 0 if offer.sha256 else min(OVERLAP, held.done - held.start)
    offset = held.done - overlap
    why = "resume, the final sha256 proves it" if offer.sha256 else "resume over an overlap"
    return Plan("resume", why, offset, _range(offset, held.end), overlap=overlap, split=strong)


def _range(offset: int, end: int | None) -> str:
    return f"bytes={offset}-{'' if end is None else end - 1}"


def can_resume(meta: dict, remote: Remote, file: ModelFile) -> bool:
    """Whether a partial file (described by its sidecar `meta`) may be continued from `remote`."""
    segments = meta.get("segments") or []
    if not segments:
        return False
    held = Held(
        done=sum(s[2] - s[0] for s in segments),
        parts=len(segments),
        validator=Validator.parse(meta.get("validator")),
        size=meta.get("size"),
        source=meta.get("source"),
    )
    offer = Offer(
        remote.source,
        Validator.parse(remote.validator),
        remote.size if remote.size is not None else file.size_bytes,
        bool(remote.sha256 or file.sha256),
    )
    return decide(held, offer).action == "resume"
