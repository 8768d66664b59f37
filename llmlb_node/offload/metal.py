"""Apple strategy: macOS on Apple silicon, where Metal shares unified memory with the CPU.

Only Darwin/arm64 counts; the device is the SoC, named and sized via sysctl when available. What
Metal lets one process keep resident is its recommended working set, not all of unified memory.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping

from ._common import GpuDevice, run_tool, to_int

BACKEND = "metal"
PRESET = "metal"
# -i: a key this macOS does not know (iogpu.wired_limit_mb before macOS 14) prints nothing.
QUERY = ["sysctl", "-i", "-n", "machdep.cpu.brand_string", "hw.memsize", "iogpu.wired_limit_mb"]
_MIB = 1024 * 1024
_GIB = 1024 * _MIB


def is_apple_silicon() -> bool:
    """True on macOS running natively on Apple silicon (Darwin, arm64)."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def detect(env: Mapping[str, str]) -> tuple[GpuDevice, ...]:
    """The Apple GPU, if this is Apple silicon; total memory is the unified RAM, and the usable
    memory reported as free is Metal's recommended working set (see `working_set`)."""
    del env  # Metal has no visibility variable
    if not is_apple_silicon():
        return ()
    return parse_sysctl(run_tool(QUERY) or "")


def parse_sysctl(text: str) -> tuple[GpuDevice, ...]:
    """Parse the three lines of `QUERY` (the third may be missing)."""
    lines = text.splitlines()
    brand = lines[0].strip() if lines and lines[0].strip() else "Apple silicon"
    total = to_int(lines[1]) if len(lines) > 1 else None
    wired_mb = to_int(lines[2]) if len(lines) > 2 else None
    return (GpuDevice(BACKEND, f"{brand} GPU", total, working_set(total, wired_mb)),)


def working_set(total: int | None, wired_limit_mb: int | None = None) -> int | None:
    """Metal's ``recommendedMaxWorkingSetSize`` for `total` bytes of unified memory.

    An explicit ``iogpu.wired_limit_mb`` (set by the user; 0 means the default) wins. Otherwise
    macOS gives the GPU two thirds of memory up to 36 GiB and three quarters above, which is what
    ``recommendedMaxWorkingSetSize`` reports on the machines llama.cpp documents.
    """
    if wired_limit_mb:
        return wired_limit_mb * _MIB
    if total is None:
        return None
    return total * 3 // 4 if total > 36 * _GIB else total * 2 // 3
