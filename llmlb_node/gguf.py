"""Just enough of the GGUF format to plan an offload: the header's key/value metadata.

Reads ``general.architecture`` and ``<arch>.block_count`` (the layer count) without loading the
model; stops at the first tensor-sized array it does not need.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

MAGIC = b"GGUF"
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_MAX_KEYS = 4096


def block_count(path: str | os.PathLike[str]) -> int | None:
    """The model's layer count from its GGUF header, or None if it cannot be read."""
    try:
        with open(path, "rb") as fh:
            meta = _read_metadata(fh, wanted_suffix=".block_count")
    except (OSError, ValueError, struct.error):
        return None
    arch = meta.get("general.architecture")
    value = meta.get(f"{arch}.block_count") if isinstance(arch, str) else None
    return value if isinstance(value, int) and value > 0 else None


def _read_metadata(fh: BinaryIO, wanted_suffix: str) -> dict[str, object]:
    if fh.read(4) != MAGIC:
        raise ValueError("not a GGUF file")
    (version,) = struct.unpack("<I", fh.read(4))
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    _tensors, kv_count = struct.unpack("<QQ", fh.read(16))
    meta: dict[str, object] = {}
    for _ in range(min(kv_count, _MAX_KEYS)):
        key = _string(fh)
        (kind,) = struct.unpack("<I", fh.read(4))
        meta[key] = _value(fh, kind)
        arch = meta.get("general.architecture")
        if isinstance(arch, str) and f"{arch}{wanted_suffix}" in meta:
            break
    return meta


def _string(fh: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", fh.read(8))
    if n > 1 << 20:
        raise ValueError("implausible string length")
    return fh.read(n).decode("utf-8", "replace")


def _value(fh: BinaryIO, kind: int) -> object:
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]
    if kind == _STRING:
        return _string(fh)
    if kind == _ARRAY:
        (item_kind,) = struct.unpack("<I", fh.read(4))
        (n,) = struct.unpack("<Q", fh.read(8))
        if item_kind in _SCALARS:
            fh.seek(n * struct.calcsize(_SCALARS[item_kind]), os.SEEK_CUR)
        else:
            for _ in range(n):
                _value(fh, item_kind)
        return None  # arrays are never needed here
    raise ValueError(f"unknown GGUF value type {kind}")
