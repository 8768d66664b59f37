"""Apple strategy: macOS on Apple silicon, where Metal shares unified memory with the CPU.

Only Darwin/arm64 counts; the device is the SoC, named and sized via sysctl when available.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping

from ._common import GpuDevice, run_tool, to_int

BACKEND = "metal"
PRESET = "metal"
QUERY = ["sysctl", "-n", "machdep.cpu.brand_string", "hw.memsize"]


def is_apple_silicon() -> bool:
    """True on macOS running natively on Apple silicon (Darwin, arm64)."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def detect(env: Mapping[str, str]) -> tuple[GpuDevice, ...]:
    """The Apple GPU, if this is Apple silicon; total memory is the unified RAM."""
    del env  # Metal has no visibility variable
    if not is_apple_silicon():
        return ()
    lines = (run_tool(QUERY) or "").splitlines()
    brand = lines[0].strip() if lines and lines[0].strip() else "Apple silicon"
    total = to_int(lines[1]) if len(lines) > 1 else None
    return (GpuDevice(BACKEND, f"{brand} GPU", total, None),)
