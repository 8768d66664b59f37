"""Synthetic GGUF files for tests: a real GGUF v3 header followed by deterministic filler.

The header declares one I8 tensor whose data is the filler, so the file is structurally whole
(a cut copy fails the store's check) though llama.cpp cannot load it (no architecture).
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from collections.abc import Iterator

GGUF_MAGIC = b"GGUF"
HEADER_SIZE = 24  # magic (4) + version (uint32) + tensor_count (uint64) + kv_count (uint64)
_TENSOR = b"data"
DATA_OFFSET = 64  # HEADER_SIZE + the tensor info (36 bytes), aligned to 32
_CHUNK = 8 * 1024 * 1024


def _header(size: int) -> bytes:
    """The header of a `size`-byte file: one I8 tensor over the rest, when there is room for it."""
    if size <= DATA_OFFSET:
        return GGUF_MAGIC + struct.pack("<IQQ", 3, 0, 0)
    dims = struct.pack("<IQIQ", 1, size - DATA_OFFSET, 24, 0)  # 1 dim of n, type I8, offset 0
    info = struct.pack("<Q", len(_TENSOR)) + _TENSOR + dims
    head = GGUF_MAGIC + struct.pack("<IQQ", 3, 1, 0) + info
    return head + b"\0" * (DATA_OFFSET - len(head))


def _filler(seed: int, n: int) -> Iterator[bytes]:
    # randbytes(a) + randbytes(b) == randbytes(a + b) when a is a multiple of 4, so chunking keeps
    # make_gguf and write_gguf byte-identical (and avoids randbytes' 256 MiB limit).
    rng = random.Random(seed)
    while n > 0:
        chunk = rng.randbytes(min(_CHUNK, n))
        n -= len(chunk)
        yield chunk


def make_gguf(size: int, seed: int = 0) -> bytes:
    """Return exactly `size` bytes: a GGUF v3 header then `random.Random(seed)` filler."""
    if size < HEADER_SIZE:
        raise ValueError(f"a GGUF needs at least {HEADER_SIZE} bytes, got {size}")
    head = _header(size)
    return b"".join([head, *_filler(seed, size - len(head))])


def write_gguf(path: str | os.PathLike[str], size: int, seed: int = 0) -> str:
    """Write `make_gguf(size, seed)` to `path` without holding it all in memory; return sha256."""
    if size < HEADER_SIZE:
        raise ValueError(f"a GGUF needs at least {HEADER_SIZE} bytes, got {size}")
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        head = _header(size)
        for chunk in (head, *_filler(seed, size - len(head))):
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def make_model_gguf(arch: str, fields: dict[str, int], tensors: dict[str, int]) -> bytes:
    """A structurally whole GGUF for architecture `arch` with u32 `fields` (``block_count``...,
    prefixed with the architecture) and I8 `tensors` (name -> element count), zero-filled.

    Its header is what a memory estimate reads; llama.cpp still cannot run it.
    """

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    pairs = [s("general.architecture") + struct.pack("<I", 8) + s(arch)]
    pairs += [s(f"{arch}.{k}") + struct.pack("<II", 4, v) for k, v in fields.items()]
    infos, offset = [], 0
    for name, n in tensors.items():
        infos.append(s(name) + struct.pack("<IQIQ", 1, n, 24, offset))  # 1 dim, I8, offset
        offset += n + (-n % 32)
    head = GGUF_MAGIC + struct.pack("<IQQ", 3, len(infos), len(pairs))
    head += b"".join(pairs) + b"".join(infos)
    head += b"\0" * (-len(head) % 32)
    return head + bytes(offset)


_KV_FORMATS = {0: "<B", 2: "<H", 4: "<I", 5: "<i", 10: "<Q"}  # GGUF value type -> struct format


def build_gguf(
    metadata: dict[str, str | int | tuple[int, int]],
    tensors: list[tuple[str, int, int, int]],
    data: int,
    alignment: int = 32,
    vocab: int = 0,
) -> bytes:
    """Any GGUF layout, well formed or not: `metadata` values are strings, u32s or (GGUF type,
    int) pairs; `tensors` are (name, elements, ggml type, offset) as the header will state them,
    true or not; then `data` zero bytes after the header padded to `alignment`. `vocab` adds a
    ``tokenizer.ggml.tokens`` array of that many one-byte strings (a header slow to parse)."""

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    pairs = []
    for key, value in metadata.items():
        if isinstance(value, str):
            pairs.append(s(key) + struct.pack("<I", 8) + s(value))
        else:
            kind, number = value if isinstance(value, tuple) else (4, value)
            pairs.append(s(key) + struct.pack("<I", kind) + struct.pack(_KV_FORMATS[kind], number))
    if vocab:
        tokens = struct.pack("<Q", 1) + b"t"
        pairs.append(s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, vocab) + tokens * vocab)
    infos = [s(n) + struct.pack("<IQIQ", 1, count, kind, at) for n, count, kind, at in tensors]
    head = GGUF_MAGIC + struct.pack("<IQQ", 3, len(infos), len(pairs))
    head += b"".join(pairs) + b"".join(infos)
    head += b"\0" * (-len(head) % alignment)
    return head + bytes(data)


def make_shard(
    no: int, count: int, *, total: int | None = None, arch: str = "llama", name: str = "v1"
) -> bytes:
    """Shard `no` (0-based, as `split.no` counts) of a `count`-way split GGUF, as llama.cpp's
    gguf-split writes it: one 50,000-byte I8 tensor per shard, `split.tensors.count` = `total`
    (default `count`). `name` (general.name) tells versions of the same shard apart."""
    meta: dict[str, str | int | tuple[int, int]] = {
        "general.architecture": arch,
        "general.name": name,
        "split.no": (2, no),  # uint16, as llama.cpp writes them
        "split.count": (2, count),
        "split.tensors.count": (5, count if total is None else total),  # int32
    }
    return build_gguf(meta, [(f"blk.{no}.weight", 50_000, 24, 0)], data=50_000)
