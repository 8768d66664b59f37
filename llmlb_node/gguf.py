"""Just enough of the GGUF format to trust a file and plan its load, read straight from its header.

`read_header` parses version, metadata, tensor infos and alignment in one streaming pass that skips
the values nobody needs (the tokenizer's arrays); `check_complete` proves a file is at least as long
as the data its header declares. Neither loads the model.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

_SCALARS = {
    0: struct.Struct("<B"),
    1: struct.Struct("<b"),
    2: struct.Struct("<H"),
    3: struct.Struct("<h"),
    4: struct.Struct("<I"),
    5: struct.Struct("<i"),
    6: struct.Struct("<f"),
    7: struct.Struct("<?"),
    10: struct.Struct("<Q"),
    11: struct.Struct("<q"),
    12: struct.Struct("<d"),
}
_STRING, _ARRAY = 8, 9
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_BATCH = 4096  # strings skipped between GIL releases in a background parse
_KEEP_ARRAY = 4096  # numeric arrays up to this many items (per-layer values) are kept
# What a header may make the parser hold, whatever its counts say: a lying file of N bytes could
# otherwise declare N/24 empty tensor infos (gigabytes of Python objects, minutes of CPU). Real
# headers hold a few hundred KiB (2,000 tensors, 60 keys); the vocabulary is skipped, not held.
_MAX_KEPT = 32 * 1024 * 1024  # bytes of keys, strings, tensor infos, charged as below
_KEY_COST = 64  # a dict entry and its value object
_TENSOR_COST = 160  # a TensorInfo, its name and shape
_MAX_STRINGS = 1 << 24  # items of one string array (vocabularies have up to ~1M)

# ggml_type -> (name, elements per block, bytes per block), as ggml's type traits define them
# (ggml/src/ggml.c `type_traits`). Numbers missing here (4, 5, 31-33, 36-38: removed from GGUF
# files) or past the end are types ggml refuses to load; so does this check.
_GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME = 64  # GGML_MAX_NAME: a tensor name must be shorter
_GGUF_U32 = 4  # general.alignment must have this GGUF type

Value = Union[int, float, bool, str, tuple]  # noqa: UP007 - a runtime alias on 3.10


class GGUFError(ValueError):
    """The file is not a well-formed GGUF, or is shorter than its header declares."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header declares it; `offset` counts from `GGUFHeader.data_offset`."""

    name: str
    shape: tuple[int, ...]
    type: int
    offset: int
    size: int
    """Bytes of data (a type ggml does not know is refused while parsing)."""


@dataclass(frozen=True)
class GGUFHeader:
    """The parsed header of one GGUF file (or one shard of a split GGUF)."""

    version: int
    metadata: dict[str, Value]
    """Scalars and strings; numeric arrays of up to 4096 items as tuples. Longer arrays and
    arrays of strings are skipped: their lengths are in `array_lengths`."""
    array_lengths: dict[str, int]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int
    """Where the tensor data section starts in the file."""
    data_end: int
    """The smallest file size that holds every declared tensor's data."""
    file_size: int = field(default=0, compare=False)
    tensor_count: int = field(default=0, compare=False)
    """How many tensor infos the header declares (known even with ``tensors=False``)."""

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def arch_field(self, name: str) -> Value | None:
        """``<architecture>.<name>``, e.g. ``arch_field("block_count")``; None if absent."""
        arch = self.architecture
        return None if arch is None else self.metadata.get(f"{arch}.{name}")


def read_header(path: str | os.PathLike[str], *, tensors: bool = True) -> GGUFHeader:
    """Parse the header of the GGUF at `path`; raise `GGUFError` (malformed or cut short)
    or `OSError`. With ``tensors=False`` it stops after the metadata (data fields are 0)."""
    fd = open_regular(path)
    try:
        return _Parser(fd).parse(tensors=tensors)
    finally:
        os.close(fd)


def open_regular(path: str | os.PathLike[str]) -> int:
    """Open `path` for reading, refusing anything but a regular file (after symlinks): a FIFO
    named ``model.gguf`` would block the open forever, a device read without end."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise GGUFError(f"{os.fspath(path)} is not a regular file")
    return fd


def read_header_prefix(fd: int, available: int) -> GGUFHeader | None:
    """The header of a GGUF still being written to `fd`, if its first `available` bytes (all
    that is written so far) hold the whole header; else None (also when it cannot be read)."""
    try:
        return _Parser(fd, limit=available, polite=True).parse(tensors=True)
    except (GGUFError, OSError):
        return None


def check_complete(path: str | os.PathLike[str], *, name: str | None = None) -> GGUFHeader:
    """The header of a GGUF that is whole: parseable and at least as long as its declared data.

    Bytes past the declared end are allowed (llama.cpp ignores them). Raises `GGUFError`
    naming the declared and the actual size.
    """
    label = name or os.path.basename(os.fspath(path))
    try:
        header = read_header(path)
    except GGUFError as exc:
        raise GGUFError(f"{label}: {exc}") from None
    if header.file_size < header.data_end:
        raise GGUFError(
            f"{label}: truncated: the GGUF header declares {header.data_end} bytes of data "
            f"but the file has {header.file_size}"
        )
    return header


def check_split_set(shards: list[tuple[str, GGUFHeader]]) -> None:
    """Raise `GGUFError` unless these GGUFs (a model's files in catalog order, headers read
    with or without tensors) are one model: a single file, or every shard of one split set as
    llama.cpp's loader wants it — each shard's ``split.no`` its place, ``split.count`` and
    ``split.tensors.count`` the same in all and true of the set, one architecture."""
    split = [(name, h) for name, h in shards if "split.count" in h.metadata]
    if not split:
        return
    first, head = shards[0]
    count, total = head.metadata.get("split.count"), head.metadata.get("split.tensors.count")
    if split[0][0] != first or count != len(shards):
        raise GGUFError(
            f"{first}: split.count is {count!r} but the model has {len(shards)} GGUF files "
            f"({len(split)} of them shards): not one split set"
        )
    for no, (name, h) in enumerate(shards):
        _check_shard(name, h, no, head)
    declared = sum(h.tensor_count for _, h in shards)
    if total != declared:
        raise GGUFError(
            f"{first}: split.tensors.count is {total!r} but the shards hold {declared} tensors"
        )


def _check_shard(name: str, h: GGUFHeader, no: int, head: GGUFHeader) -> None:
    meta, want = h.metadata, head.metadata
    for key, expected in (
        ("split.no", no),
        ("split.count", want.get("split.count")),
        ("split.tensors.count", want.get("split.tensors.count")),
    ):
        if meta.get(key) != expected:
            raise GGUFError(
                f"{name}: {key} is {meta.get(key)!r}, the set needs {expected!r}: "
                "this shard belongs to another split set"
            )
    if h.architecture is not None and h.architecture != head.architecture:
        raise GGUFError(
            f"{name}: architecture {h.architecture!r}, the first shard's is "
            f"{head.architecture!r}: not one model"
        )


def ggml_type_bytes(ggml_type: int, n_elements: int) -> int:
    """Bytes that `n_elements` values of `ggml_type` take (F16 sizes for a type not known here)."""
    _, block, nbytes = _GGML_TYPES.get(ggml_type, _GGML_TYPES[1])
    return -(-n_elements // block) * nbytes


def block_count(path: str | os.PathLike[str]) -> int | None:
    """The model's layer count from its GGUF header, or None if it cannot be read."""
    try:
        fd = open_regular(path)
        try:
            parser = _Parser(fd)
            parser.parse(tensors=False, stop=_has_block_count)
        finally:
            os.close(fd)
    except (OSError, GGUFError):
        return None
    value = _block_count_of(parser.metadata)
    return value if isinstance(value, int) and value > 0 else None


def read_architecture(fd: int, available: int) -> str | None:
    """``general.architecture`` from the first `available` bytes of the GGUF at `fd`: the
    key/values are read only until it appears. None when they name none; `GGUFError` (a
    "truncated" one when the bytes end first) when they are not a GGUF's."""
    parser = _Parser(fd, limit=available)
    parser.parse(tensors=False, stop=lambda meta: "general.architecture" in meta)
    arch = parser.metadata.get("general.architecture")
    return arch if isinstance(arch, str) else None


def _block_count_of(meta: dict[str, Value]) -> Value | None:
    arch = meta.get("general.architecture")
    return meta.get(f"{arch}.block_count") if isinstance(arch, str) else None


def _has_block_count(meta: dict[str, Value]) -> bool:
    return _block_count_of(meta) is not None


class _Parser:
    """A forward-only reader over a window of the file, refilled in large blocks."""

    def __init__(self, fd: int, limit: int | None = None, polite: bool = False) -> None:
        self.fd = fd
        self.polite = polite  # in a background thread: let others have the GIL often
        self.file_size = os.fstat(fd).st_size
        self.size = self.file_size if limit is None else min(limit, self.file_size)
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # file offset of the next unread byte
        self.metadata: dict[str, Value] = {}
        self.array_lengths: dict[str, int] = {}
        self.kept = 0  # what the parse holds so far, in `_MAX_KEPT`'s units
        self.n_tensors = 0

    # -- the sections ---------------------------------------------------------------------
    def parse(
        self, *, tensors: bool, stop: Callable[[dict[str, Value]], bool] | None = None
    ) -> GGUFHeader:
        magic = self._take(4)
        if magic != MAGIC:
            raise GGUFError(f"not a GGUF file (starts with {magic!r})")
        (version,) = _U32.unpack(self._take(4))
        if version not in (2, 3):
            raise GGUFError(f"GGUF version {version} is not supported")
        (n_tensors,) = _U64.unpack(self._take(8))
        (n_kv,) = _U64.unpack(self._take(8))
        # Every key/value takes at least 13 bytes, every tensor info at least 24.
        self._plausible(n_kv * 13 + n_tensors * 24, "key/value and tensor counts")
        for _ in range(n_kv):
            self._key_value()
            if stop is not None and stop(self.metadata):
                break
        self.n_tensors = n_tensors
        if not tensors:
            return self._header(version, (), 0, 0)
        layout = _Layout(self._alignment())
        infos = tuple(layout.place(self._tensor_info()) for _ in range(n_tensors))
        data_offset = -(-self.pos // layout.alignment) * layout.alignment
        data_end = data_offset + layout.end if infos else self.pos
        return self._header(version, infos, data_offset, data_end, layout.alignment)

    def _key_value(self) -> None:
        key = self._string()
        if not key or key in self.metadata or key in self.array_lengths:
            raise GGUFError(f"metadata key {key!r} is empty or appears twice")
        self._keep(_KEY_COST, "metadata")
        (kind,) = _U32.unpack(self._take(4))
        if key == "general.alignment" and kind != _GGUF_U32:
            raise GGUFError(f"general.alignment has GGUF type {kind}; ggml requires uint32 (4)")
        self._value(key, kind)

    def _alignment(self) -> int:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"general.alignment {alignment!r} is not a power of two")
        return alignment

    def _header(
        self,
        version: int,
        infos: tuple[TensorInfo, ...],
        data_offset: int,
        data_end: int,
        alignment: int = DEFAULT_ALIGNMENT,
    ) -> GGUFHeader:
        return GGUFHeader(
            version=version,
            metadata=self.metadata,
            array_lengths=self.array_lengths,
            tensors=infos,
            alignment=alignment,
            data_offset=data_offset,
            data_end=data_end,
            file_size=self.file_size,
            tensor_count=self.n_tensors,
        )

    def _value(self, key: str, kind: int) -> None:
        if kind in _SCALARS:
            fmt = _SCALARS[kind]
            self.metadata[key] = fmt.unpack(self._take(fmt.size))[0]
        elif kind == _STRING:
            self.metadata[key] = self._string()
        elif kind == _ARRAY:
            (item,) = _U32.unpack(self._take(4))
            (n,) = _U64.unpack(self._take(8))
            self.array_lengths[key] = n
            if item in _SCALARS:
                width = _SCALARS[item].size
                self._plausible(n * width, f"array {key!r}")
                if n <= _KEEP_ARRAY:
                    self._keep(n * 40, "metadata")  # a tuple of Python numbers
                    raw = self._take(n * width)
                    fmt = struct.Struct(f"<{n}{_SCALARS[item].format[1:]}")
                    self.metadata[key] = fmt.unpack(raw)
                else:
                    self._skip(n * width)
            elif item == _STRING:
                self._plausible(n * 8, f"array {key!r}")
                if n > _MAX_STRINGS:
                    raise GGUFError(f"array {key!r} declares an implausible {n} strings")
                self._skip_strings(n)
            else:
                raise GGUFError(f"array {key!r} of GGUF type {item} is not supported")
        else:
            raise GGUFError(f"unknown GGUF value type {kind} for {key!r}")

    def _tensor_info(self) -> TensorInfo:
        name = self._string()
        self._keep(_TENSOR_COST, "tensor infos")
        if len(name.encode()) >= _MAX_NAME:
            size = len(name.encode())
            raise GGUFError(f"tensor name {name[:80]!r} is {size} bytes; ggml allows 63")
        (n_dims,) = _U32.unpack(self._take(4))
        if n_dims > _MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions; ggml allows {_MAX_DIMS}")
        shape = struct.unpack(f"<{n_dims}Q", self._take(8 * n_dims))
        (kind,) = _U32.unpack(self._take(4))
        (offset,) = _U64.unpack(self._take(8))
        return TensorInfo(name, tuple(shape), kind, offset, _tensor_bytes(name, shape, kind))

    # -- bytes ----------------------------------------------------------------------------
    def _keep(self, nbytes: int, what: str) -> None:
        """Charge what the parse is about to hold; a header past the budget is refused."""
        self.kept += nbytes
        if self.kept > _MAX_KEPT:
            raise GGUFError(
                f"implausible header: its {what} would take more than {_MAX_KEPT >> 20} MiB "
                f"to hold (stopped at byte {self.pos})"
            )

    def _plausible(self, nbytes: int, what: str) -> None:
        if self.pos + nbytes > self.size:
            raise GGUFError(
                f"truncated: the header's {what} need {self.pos + nbytes} bytes "
                f"but the file has {self.size}"
            )

    def _fill(self, end: int) -> None:
        """Make file bytes [pos, end) available in the window."""
        if end > self.size:
            raise GGUFError(
                f"truncated: the header runs past the end of the file ({self.size} bytes)"
            )
        have = self.base + len(self.buf)
        if end <= have:
            return
        keep = self.buf[self.pos - self.base :] if self.pos < have else b""
        start = max(self.pos, have)
        want = max(end - start, 1 << 20, 2 * len(keep))
        more = os.pread(self.fd, min(want, self.size - start), start)
        self.buf = keep + more
        self.base = self.pos if self.pos < have else start
        if self.base + len(self.buf) < end:
            raise GGUFError("truncated: the file ended while reading its header")

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > self.base + len(self.buf):
            self._fill(end)
        at = self.pos - self.base
        self.pos = end
        return self.buf[at : at + n]

    def _skip(self, n: int) -> None:
        self._plausible(n, "values")
        self.pos += n

    def _string(self) -> str:
        (n,) = _U64.unpack(self._take(8))
        if n > 1 << 20:
            raise GGUFError(f"implausible string length {n} at byte {self.pos - 8}")
        self._keep(n, "strings")  # every string parsed is held: keys, values, tensor names
        return self._take(n).decode("utf-8", "replace")

    def _skip_strings(self, n: int) -> None:
        """Skip `n` length-prefixed strings: the hot loop for a tokenizer's vocabulary."""
        unpack = _U64.unpack_from
        while n:
            self._fill(self.pos + 8)
            buf, base = self.buf, self.base
            p, last = self.pos - base, len(buf) - 8
            batch = min(n, _BATCH) if self.polite else n
            n -= batch
            while batch and p <= last:
                p += 8 + unpack(buf, p)[0]
                batch -= 1
            n += batch
            self.pos = base + p
            if self.polite:
                # A download thread waiting for the GIL gets it now, not after the 5 ms switch
                # interval: this parse then costs a transfer almost nothing.
                time.sleep(0)
            if self.pos > self.size:
                raise GGUFError(
                    f"truncated: a string array runs past the end of the file ({self.size} bytes)"
                )


def _tensor_bytes(name: str, shape: tuple[int, ...], kind: int) -> int:
    """The bytes of a tensor as ggml's loader computes them, refusing what it refuses: a type
    it does not know, rows that are not whole blocks, more elements than an int64 holds."""
    traits = _GGML_TYPES.get(kind)
    if traits is None:
        raise GGUFError(
            f"tensor {name!r} has ggml type {kind}, which ggml does not know "
            f"(known: 0-3, 6-30, 34, 35, 39-41)"
        )
    type_name, block, nbytes = traits
    elements = 1
    for d in shape:
        elements *= d
    if elements >= 1 << 63:
        raise GGUFError(f"tensor {name!r} of shape {shape} has more elements than ggml can count")
    row = shape[0] if shape else 1
    if row % block:
        raise GGUFError(
            f"tensor {name!r}: rows of {row} {type_name} elements, not whole blocks of {block}"
        )
    return elements // block * nbytes


class _Layout:
    """The rule ggml's loader applies to tensor offsets, checked as each info is read: tensors
    lie in header order, each at the end of the one before padded to the alignment. That one
    rule refuses misaligned offsets, two tensors at one offset, overlaps and gaps."""

    def __init__(self, alignment: int) -> None:
        self.alignment = alignment
        self.next = 0  # where ggml expects the next tensor
        self.end = 0  # where the data of the tensors so far ends (unpadded)
        self.names: set[str] = set()

    def place(self, t: TensorInfo) -> TensorInfo:
        if t.name in self.names:
            raise GGUFError(f"tensor {t.name!r} is declared twice")
        self.names.add(t.name)
        if t.offset != self.next:
            raise GGUFError(self._misplaced(t))
        self.end = t.offset + t.size
        self.next = -(-self.end // self.alignment) * self.alignment
        return t

    def _misplaced(self, t: TensorInfo) -> str:
        if t.offset % self.alignment:
            why = f"is not a multiple of general.alignment {self.alignment}"
        elif t.offset < self.end:
            why = f"overlaps the tensor before it (which ends at {self.end})"
        else:
            why = "leaves a gap after the tensor before it"
        return f"tensor {t.name!r}: data offset {t.offset} {why}; ggml expects {self.next}"
