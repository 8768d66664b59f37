"""NVIDIA strategy: find CUDA GPUs and their free memory with nvidia-smi.

Falls back to /proc/driver/nvidia/gpus (names only) when nvidia-smi is missing or failing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from ._common import GpuDevice, run_tool, to_int, visible

logger = logging.getLogger(__name__)

BACKEND = "cuda"
PRESET = "cuda"
QUERY = [
    "nvidia-smi",
    "--query-gpu=name,memory.total,memory.free",
    "--format=csv,noheader,nounits",
]
PROC_GPUS = Path("/proc/driver/nvidia/gpus")
_MIB = 1024 * 1024


def detect(env: Mapping[str, str]) -> tuple[GpuDevice, ...]:
    """CUDA devices visible to this process (honours CUDA_VISIBLE_DEVICES)."""
    devices = parse_nvidia_smi(run_tool(QUERY) or "")
    if not devices:
        devices = _from_proc()
    return visible(devices, env, "CUDA_VISIBLE_DEVICES")


def parse_nvidia_smi(text: str) -> tuple[GpuDevice, ...]:
    """Parse ``name, total MiB, free MiB`` lines; memory is None where it says [N/A]."""
    devices = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.rsplit(",", 2)]
        if len(fields) != 3 or not fields[0]:
            continue
        name, total, free = fields
        devices.append(GpuDevice(BACKEND, name, to_int(total, _MIB), to_int(free, _MIB)))
    return tuple(devices)


def _from_proc() -> tuple[GpuDevice, ...]:
    """Names from the kernel driver's /proc files; memory unknown."""
    try:
        infos = sorted(PROC_GPUS.glob("*/information"))
    except OSError:
        return ()
    devices = []
    for info in infos:
        try:
            text = info.read_text(errors="replace")
        except OSError:
            continue
        name = "NVIDIA GPU"
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model" and value.strip():
                name = value.strip()
                break
        devices.append(GpuDevice(BACKEND, name))
    if devices:
        logger.debug("nvidia-smi unavailable; found %d GPU(s) in %s", len(devices), PROC_GPUS)
    return tuple(devices)
