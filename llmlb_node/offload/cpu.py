"""CPU strategy: the fallback when nothing can be offloaded, plus the host facts reports show.

No device to detect here; `cpu_info` and `memory_info` describe what the CPU path runs on.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path

from ._common import GpuDevice, run_tool, to_int

BACKEND = "cpu"
PRESET = "cpu"
CPUINFO = Path("/proc/cpuinfo")
MEMINFO = Path("/proc/meminfo")
_MODEL_KEYS = ("model name", "hardware", "cpu model", "model", "processor")


def detect(env: Mapping[str, str]) -> tuple[GpuDevice, ...]:
    """The CPU is not an offload target: always empty."""
    del env
    return ()


def cpu_info() -> dict[str, object]:
    """``{"model": str, "cores": int | None, "usable_cores": int | None}`` for this host."""
    cores = os.cpu_count()
    try:
        usable: int | None = len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        usable = cores
    return {"model": _cpu_model(), "cores": cores, "usable_cores": usable}


def memory_info() -> dict[str, int | None]:
    """``{"total": bytes, "available": bytes}`` of system RAM; None where unknown."""
    total = available = None
    try:
        for line in MEMINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            number = value.split()[0] if value.split() else None
            if key == "MemTotal":
                total = to_int(number, 1024)
            elif key == "MemAvailable":
                available = to_int(number, 1024)
    except OSError:
        pass
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            if platform.system() == "Darwin":
                total = to_int(run_tool(["sysctl", "-n", "hw.memsize"]))
    return {"total": total, "available": available}


def _cpu_model() -> str:
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        text = ""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and value.strip() and key in _MODEL_KEYS and key not in found:
            found[key] = value.strip()
    for key in _MODEL_KEYS[:-1]:  # "processor" is only an index on x86
        if key in found:
            return found[key]
    if platform.system() == "Darwin":
        brand = (run_tool(["sysctl", "-n", "machdep.cpu.brand_string"]) or "").strip()
        if brand:
            return brand
    return platform.processor() or platform.machine() or "unknown"
