"""The GGUF header reader: the offload planner's layer count and the store's structural check."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from gguf import make_gguf

from llmlb_node.gguf import GGUFError, block_count, check_complete, read_header, read_header_prefix


def _s(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _kv_string(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(value)


def _kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<I", 4) + struct.pack("<I", value)


def _kv_string_array(key: str, values: list[str]) -> bytes:
    body = b"".join(_s(v) for v in values)
    return _s(key) + struct.pack("<I", 9) + struct.pack("<IQ", 8, len(values)) + body


def _kv_f32_array(key: str, n: int) -> bytes:
    return _s(key) + struct.pack("<I", 9) + struct.pack("<IQ", 6, n) + b"\0" * (4 * n)


def _gguf(*pairs: bytes) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(pairs)) + b"".join(pairs)


def test_reads_the_architectures_block_count(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(
        _gguf(
            _kv_string("general.architecture", "llama"),
            _kv_string_array("tokenizer.ggml.tokens", ["a", "b", "c"]),
            _kv_f32_array("tokenizer.ggml.scores", 3),
            _kv_u32("llama.context_length", 4096),
            _kv_u32("llama.block_count", 28),
        )
    )
    assert block_count(path) == 28


def test_unknown_when_absent_or_not_a_gguf(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(make_gguf(1000))
    html = tmp_path / "page.gguf"
    html.write_bytes(b"<!DOCTYPE html><html></html>")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(_gguf(_kv_string("general.architecture", "llama"))[:30])

    assert block_count(empty) is None
    assert block_count(html) is None
    assert block_count(truncated) is None
    assert block_count(tmp_path / "missing.gguf") is None


# ------------------------------------------------------------------ structure: header and extent
def _tensor(name: str, shape: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    dims = struct.pack(f"<I{len(shape)}Q", len(shape), *shape)
    return _s(name) + dims + struct.pack("<IQ", ggml_type, offset)


def _kv_u32_array(key: str, values: list[int]) -> bytes:
    body = struct.pack(f"<{len(values)}I", *values)
    return _s(key) + struct.pack("<I", 9) + struct.pack("<IQ", 4, len(values)) + body


def _model(tensors: list[bytes], pairs: list[bytes], alignment: int = 32, data: int = 0) -> bytes:
    """A GGUF with these tensor infos and key/values, padded to `alignment`, then `data` bytes."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(pairs)) + b"".join(pairs)
    head += b"".join(tensors)
    head += b"\0" * (-len(head) % alignment)
    return head + bytes(data)


def test_read_header_gives_metadata_tensors_and_the_data_extent(tmp_path: Path) -> None:
    # 256 Q4_K elements = 1 block of 144 bytes; 10 F32 = 40 bytes at offset 160 (aligned to 32).
    data = _model(
        [_tensor("blk.0.w", (256,), 12, 0), _tensor("out", (5, 2), 0, 160)],
        [
            _kv_string("general.architecture", "gemma3"),
            _kv_u32("gemma3.block_count", 18),
            _kv_string_array("tokenizer.ggml.tokens", ["<s>", "a", "bc"]),
            _kv_u32_array("gemma3.attention.head_count_kv", [1, 1, 2]),
            _kv_f32_array("tokenizer.ggml.scores", 5000),
        ],
        data=200,
    )
    path = tmp_path / "m.gguf"
    path.write_bytes(data)

    header = read_header(path)

    assert header.version == 3
    assert header.architecture == "gemma3"
    assert header.arch_field("block_count") == 18
    assert header.metadata["gemma3.attention.head_count_kv"] == (1, 1, 2)
    assert "tokenizer.ggml.tokens" not in header.metadata  # string arrays are skipped...
    assert header.array_lengths["tokenizer.ggml.tokens"] == 3  # ...their length is kept
    assert "tokenizer.ggml.scores" not in header.metadata  # long arrays too
    assert header.array_lengths["tokenizer.ggml.scores"] == 5000
    assert [(t.name, t.shape, t.type, t.offset, t.size) for t in header.tensors] == [
        ("blk.0.w", (256,), 12, 0, 144),
        ("out", (5, 2), 0, 160, 40),
    ]
    assert header.data_offset == len(data) - 200
    assert header.data_offset % 32 == 0
    assert header.data_end == header.data_offset + 200
    assert check_complete(path).data_end == len(data)


def test_alignment_comes_from_general_alignment(tmp_path: Path) -> None:
    data = _model(
        [_tensor("w", (64,), 24, 0)],
        [_s("general.alignment") + struct.pack("<II", 4, 256)],
        alignment=256,
        data=64,
    )
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    header = read_header(path)
    assert header.alignment == 256
    assert header.data_offset == 256
    assert header.data_end == 320 == len(data)


def test_a_file_shorter_than_its_declared_data_names_both_sizes(tmp_path: Path) -> None:
    whole = make_gguf(262_144, seed=1)
    path = tmp_path / "m.gguf"
    path.write_bytes(whole[:100_000])
    with pytest.raises(GGUFError, match=r"m.gguf: truncated.* 262144 .* 100000"):
        check_complete(path)


def test_trailing_bytes_past_the_declared_data_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(make_gguf(5000) + b"trailing")
    assert check_complete(path).data_end == 5000


@pytest.mark.parametrize(
    "data, message",
    [
        (b"<!DOCTYPE html><html></html>", "not a GGUF"),
        (b"GGUF" + struct.pack("<I", 1), "version 1"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0), "truncated"),  # absurd tensor count
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s("k") + struct.pack("<I", 77), "type 77"),
        (_gguf(_kv_string_array("t", ["a"] * 1000))[:-500], "truncated"),  # cut inside an array
        (_model([_tensor("w", (1 << 40,), 24, 0)], [])[:-1], "truncated"),  # cut in the header
        (_model([_tensor("w", (100,), 2, 0)], []), "blocks of 32"),  # Q4_0 needs whole blocks
        (_model([], [_s("general.alignment") + struct.pack("<II", 4, 48)]), "power of two"),
    ],
)
def test_malformed_headers_are_refused(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFError, match=message):
        check_complete(path)


def test_huge_declared_tensor_is_caught_by_the_extent(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(_model([_tensor("w", (1 << 40,), 24, 0)], [], data=10))
    with pytest.raises(GGUFError, match="truncated"):
        check_complete(path)


def _layout(*tensors: tuple[str, tuple[int, ...], int, int], alignment: int = 32) -> bytes:
    pairs = [] if alignment == 32 else [_s("general.alignment") + struct.pack("<II", 4, alignment)]
    return _model([_tensor(*t) for t in tensors], pairs, alignment=alignment, data=4096)


# What ggml's loader (gguf.cpp, llama-model-loader) refuses, each with the words that name it.
_REFUSED_LAYOUTS = {
    "misaligned": (_layout(("a", (8,), 24, 0), ("b", (8,), 24, 40)), "40 is not a multiple of"),
    "same-offset": (_layout(("a", (64,), 24, 0), ("b", (64,), 24, 0)), "'b'.* 0 overlaps"),
    "first-not-at-0": (_layout(("a", (64,), 24, 32), ("b", (64,), 24, 0)), "'a'.* 32 leaves a gap"),
    "overlap": (_layout(("a", (100,), 24, 0), ("b", (8,), 24, 64)), "'b'.* 64 overlaps"),
    "gap": (_layout(("a", (8,), 24, 0), ("b", (8,), 24, 64)), "'b'.* gap.* expects 32"),
    "gap-at-128": (_layout(("a", (8,), 24, 0), ("b", (8,), 24, 256), alignment=128), "a gap"),
    "duplicate-name": (_layout(("a", (8,), 24, 0), ("a", (8,), 24, 32)), "'a' is declared twice"),
    "unknown-type": (_layout(("w", (8,), 200, 0)), "'w' has ggml type 200, which ggml does not"),
    "removed-type": (_layout(("w", (32,), 31, 0)), "ggml type 31"),  # Q4_0_4_4: gone from GGUF
    "five-dims": (_layout(("w", (1, 1, 1, 1, 1), 24, 0)), "5 dimensions"),
    "long-name": (_layout(("x" * 64, (8,), 24, 0)), "64 bytes; ggml allows 63"),
    "partial-block-row": (_layout(("w", (16, 2), 2, 0)), "rows of 16 Q4_0 elements, not whole"),
    "int64-elements": (_layout(("w", (1 << 32, 1 << 32), 24, 0)), "more elements than ggml"),
    "alignment-not-u32": (
        _model([], [_s("general.alignment") + struct.pack("<IQ", 10, 32)]),
        "general.alignment has GGUF type 10; ggml requires uint32",
    ),
    "duplicate-key": (_gguf(_kv_u32("k", 1), _kv_u32("k", 2)), "'k' is empty or appears twice"),
}


@pytest.mark.parametrize("data, message", _REFUSED_LAYOUTS.values(), ids=_REFUSED_LAYOUTS.keys())
def test_a_layout_ggml_refuses_is_refused_naming_why(
    tmp_path: Path, data: bytes, message: str
) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFError, match=message):
        check_complete(path)


def test_every_ggml_type_gets_ggmls_size(tmp_path: Path) -> None:
    # Rows of 256 elements are whole blocks of every type; sizes from ggml's type traits.
    sizes = {0: 1024, 1: 512, 2: 144, 12: 144, 14: 210, 30: 512, 35: 66, 39: 136, 40: 144}
    tensors, offset = [], 0
    for n, (kind, size) in enumerate(sizes.items()):
        tensors.append((f"t{n}", (256,), kind, offset))
        offset += size + (-size % 32)
    header = check_complete(_write(tmp_path, _layout(*tensors)))
    assert [t.size for t in header.tensors] == list(sizes.values())


def test_a_tensor_ending_past_the_file_is_truncated(tmp_path: Path) -> None:
    data = _model([_tensor("a", (64,), 24, 0), _tensor("b", (4096,), 24, 64)], [], data=64 + 4000)
    with pytest.raises(GGUFError, match=r"truncated.* declares \d+ bytes"):
        check_complete(_write(tmp_path, data))


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    return path


def test_the_test_builder_makes_structurally_whole_files(tmp_path: Path) -> None:
    for size in (24, 64, 65, 1000, 3 * 1024 * 1024 + 7):
        path = tmp_path / f"{size}.gguf"
        path.write_bytes(make_gguf(size))
        assert check_complete(path).data_end <= size
        if size > 64:
            path.write_bytes(make_gguf(size)[:-1])
            with pytest.raises(GGUFError, match="truncated"):
                check_complete(path)


def test_a_header_is_read_from_a_file_still_being_written(tmp_path: Path) -> None:
    # More strings than one background batch, and a prefix that does or does not hold it all.
    tokens = [f"t{i}" for i in range(10_000)]
    data = _model(
        [_tensor("w", (64,), 24, 0)], [_kv_string_array("tokenizer.ggml.tokens", tokens)], data=64
    )
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_header_prefix(fd, len(data) - 64 - 40) is None  # the header is not all there
        header = read_header_prefix(fd, len(data) - 64)
    finally:
        os.close(fd)
    assert header is not None and header.data_end == len(data)
    assert header.array_lengths["tokenizer.ggml.tokens"] == 10_000
