"""The GGUF header reader that gives the offload planner the real layer count."""

from __future__ import annotations

import struct
from pathlib import Path

from gguf import make_gguf

from llmlb_node.gguf import block_count


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
