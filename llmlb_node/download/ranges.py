"""Range planning: a file's byte ranges as `Segment`s, how much of them is held, and the split of
one slow stream into several connections.

A `Segment` owns its state under its own lock: a worker thread advances it, the sidecar saver and
the hasher read it from other threads, and only a split shortens it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

MIN_PART = 1024 * 1024  # never split into parts smaller than this


@dataclass(eq=False)
class Segment:
    """The bytes ``[start, end)`` of the file, of which ``[start, done)`` are held.

    `end` is None while the file's size is unknown (one stream to its end).
    """

    start: int
    end: int | None
    done: int
    lead: bytes = field(default=b"", repr=False)
    """A parallel range's first answer starts inside its neighbour: those bytes, compared with
    the neighbour's once it holds them (two versions under one ETag would differ there)."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_json(cls, data: list[int]) -> Segment:
        """From the sidecar's ``[start, end, done]`` (end -1: unknown)."""
        start, end, done = (int(x) for x in data)
        return cls(start, None if end == -1 else end, done)

    def to_json(self) -> list[int]:
        with self.lock:
            return [self.start, -1 if self.end is None else self.end, self.done]

    @property
    def held(self) -> int:
        return self.done - self.start

    @property
    def finished(self) -> bool:
        end = self.end
        return end is not None and self.done >= end

    def room(self, n: int) -> int:
        """How many of `n` bytes arriving at `done` still belong to this segment (a split may
        have shortened it; another segment fetches the rest)."""
        end = self.end
        return n if end is None else max(0, min(n, end - self.done))

    def advance(self, n: int) -> None:
        with self.lock:
            self.done += n

    def rewind(self, done: int) -> None:
        """Forget what is held past `done` (a server that ignored Range restarts the file)."""
        with self.lock:
            self.done = done

    def close_at(self, end: int) -> None:
        """The end becomes known (the stream ended, or the size was learned)."""
        with self.lock:
            self.end = end

    def finish_at(self, end: int) -> None:
        """Everything up to `end` is held (a 416 at the end of the file)."""
        with self.lock:
            self.end = self.done = end


@dataclass
class Ranges:
    """All segments of one file, in file order."""

    segments: list[Segment] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_json(cls, data: list[list[int]]) -> Ranges:
        return cls([Segment.from_json(s) for s in data])

    def to_json(self) -> list[list[int]]:
        with self.lock:
            segments = list(self.segments)
        return [s.to_json() for s in segments]

    def __bool__(self) -> bool:
        return bool(self.segments)

    def __len__(self) -> int:
        return len(self.segments)

    @property
    def first(self) -> Segment:
        return self.segments[0]

    def todo(self) -> list[Segment]:
        with self.lock:
            return [s for s in self.segments if not s.finished]

    def downloaded(self) -> int:
        with self.lock:
            return sum(s.held for s in self.segments)

    def watermark(self) -> int:
        """The length of the contiguous prefix held (what may be hashed and served)."""
        mark = 0
        with self.lock:
            segments = list(self.segments)
        for seg in segments:
            if seg.start > mark:
                break
            mark = max(mark, seg.done)
            if not seg.finished:
                break
        return mark

    def split(self, seg: Segment, n: int) -> list[Segment]:
        """Cut what is left of `seg` into `n` parts: `seg` keeps the first, the new segments
        returned (appended here) are the others."""
        assert seg.end is not None
        rest = seg.end - seg.done
        step = -(-rest // n)
        with seg.lock:
            starts = range(seg.done + step, seg.end, step)
            extra = [Segment(start, min(start + step, seg.end), start) for start in starts]
            seg.end = seg.done + step  # this connection now stops at the end of its own part
        with self.lock:
            self.segments.extend(extra)
        return extra
