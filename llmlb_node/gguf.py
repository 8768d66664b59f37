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

# ggml_type -> (elements per block, bytes per block), as ggml's type traits define them.
_GGML_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
}

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
    size: int | None
    """Bytes of data, or None for a ggml type this reader does not know."""


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


def ggml_type_bytes(ggml_type: int, n_elements: int) -> int:
    """Bytes that `n_elements` values of `ggml_type` take (F16 sizes for a type not known here)."""
    block, nbytes = _GGML_TYPES.get(ggml_type, _GGML_TYPES[1])
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
            key = self._string()
            self._keep(_KEY_COST, "metadata")
            (kind,) = _U32.unpack(self._take(4))
            self._value(key, kind)
            if stop is not None and stop(self.metadata):
                break
        if not tensors:
            return self._header(version, (), 0, 0)
        infos = tuple(self._tensor_info() for _ in range(n_tensors))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"general.alignment {alignment!r} is not a power of two")
        data_offset = -(-self.pos // alignment) * alignment
        ends = [t.offset + (t.size or 0) for t in infos]
        data_end = data_offset + max(ends) if ends else self.pos
        return self._header(version, infos, data_offset, data_end, alignment)

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
        (n_dims,) = _U32.unpack(self._take(4))
        if n_dims > 8:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions")
        shape = struct.unpack(f"<{n_dims}Q", self._take(8 * n_dims))
        (kind,) = _U32.unpack(self._take(4))
        (offset,) = _U64.unpack(self._take(8))
        elements = 1
        for d in shape:
            elements *= d
        traits = _GGML_TYPES.get(kind)
        size = None
        if traits is not None:
            block, nbytes = traits
            if elements % block:
                raise GGUFError(f"tensor {name!r}: {elements} elements in blocks of {block}")
            size = elements // block * nbytes
        else:
            log.debug(
                "tensor %r: ggml type %d is unknown here; its size is not checked", name, kind
            )
        return TensorInfo(name, tuple(shape), kind, offset, size)

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
