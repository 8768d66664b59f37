"""The node's memory budget: what a model will occupy once loaded (from its GGUF header) and how
much of the machine's memory the node may fill (LLMLB_MEMORY_BUDGET).

The pool asks before every load, evicting idle models to make room; a model that cannot fit even
alone is refused with `InsufficientMemoryError` (507) instead of letting llama.cpp abort.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..units import human_bytes

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", re.I)


@dataclass(frozen=True)
class MemoryBudget:
    """LLMLB_MEMORY_BUDGET: a share of the memory available (``90%``) or bytes (``12GiB``)."""

    fraction: float | None = 0.9
    bytes: int | None = None

    @classmethod
    def parse(cls, text: str | None) -> MemoryBudget:
        """``90%``, ``0.9`` (a share), ``12GiB``, ``8GB``, ``500MiB``, ``8000000000`` (bytes)."""
        value = (text or "").strip()
        if not value:
            return cls()
        if value.endswith("%"):
            share = _number(value[:-1], text) / 100
        elif re.fullmatch(r"0?\.\d+|1(\.0*)?", value):
            share = float(value)
        else:
            return cls(None, _bytes(value, text))
        if not 0 < share <= 1:
            raise ValueError(
                f"LLMLB_MEMORY_BUDGET={text!r}: a share must be above 0% and at most 100%"
            )
        return cls(share, None)

    def capacity(self, available: int, held: int) -> int:
        """Bytes the node's models may hold in all, given the memory `available` now and the
        estimate of what its loaded models `held` (they would free it if unloaded)."""
        if self.bytes is not None:
            return self.bytes
        assert self.fraction is not None
        return int(self.fraction * (available + held))

    def __str__(self) -> str:
        if self.bytes is not None:
            return human_bytes(self.bytes)
        return f"{self.fraction:.0%} of the memory available"


@dataclass(frozen=True)
class MemoryNeed:
    """What one model context will occupy, from its GGUF header."""

    ram_bytes: int
    """Host memory once loaded and answering (`offload.resident_bytes`)."""
    n_ctx: int
    weights_bytes: int
    kv_cache_bytes: int
    contexts: int = 1
    """KV caches of `n_ctx` cells: the model's own, plus one per engine sequence."""

    def describe(self) -> str:
        times = f" x {self.contexts} (its own and LLMLB_PARALLEL)" if self.contexts > 1 else ""
        return (
            f"{human_bytes(self.ram_bytes)} at n_ctx={self.n_ctx}{times} (weights "
            f"{human_bytes(self.weights_bytes)}, KV cache {human_bytes(self.kv_cache_bytes)})"
        )


def need_for(path: Path, n_ctx: int | None, contexts: int = 1) -> MemoryNeed | None:
    """The need of the GGUF at `path` with `contexts` KV caches of `n_ctx` cells, or None when
    its header says too little (then the budget cannot judge it and the load goes ahead)."""
    from ..gguf import GGUFError, read_header
    from ..offload.memory import estimate_memory, resident_bytes

    try:
        header = read_header(path)
    except (OSError, GGUFError):
        return None
    cells = n_ctx * contexts if n_ctx else n_ctx
    estimate = estimate_memory(header, cells)
    resident = resident_bytes(header, cells)
    if estimate is None or resident is None:
        return None
    weights = sum(t.size or 0 for t in header.tensors)
    per_context = estimate.n_ctx // contexts if n_ctx else estimate.n_ctx
    return MemoryNeed(resident, per_context, weights, estimate.kv_cache_bytes, contexts)


def available_bytes() -> int | None:
    """Memory available now (MemAvailable), or None where the system does not say."""
    from ..offload.cpu import memory_info

    return memory_info().get("available")


def _number(text: str, original: str | None) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"LLMLB_MEMORY_BUDGET={original!r} is not a share like '90%' nor a size like '12GiB'"
        ) from None


def _bytes(value: str, original: str | None) -> int:
    match = _SIZE.fullmatch(value)
    if match is None:
        _number("x", original)  # raises the message
    assert match is not None
    unit = (match.group(2) or "").lower()
    base = 1024 if "i" in unit else 1000
    scale = 1 if unit in ("", "b") else base ** ("kmgt".index(unit[0]) + 1)
    size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise ValueError(f"LLMLB_MEMORY_BUDGET={original!r} must be more than 0 bytes")
    return size
