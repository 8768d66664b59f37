"""NVIDIA strategy: find CUDA GPUs and their free memory with nvidia-smi.

Falls back to /proc/driver/nvidia/gpus (names only) when nvidia-smi is missing or failing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

from ._common import GpuDevice, by_token, run_tool, to_int

logger = logging.getLogger(__name__)

BACKEND = "cuda"
PRESET = "cuda"
QUERY = [
    "nvidia-smi",
    "--query-gpu=index,uuid,name,memory.total,memory.free",
    "--format=csv,noheader,nounits",
]
LIST = ["nvidia-smi", "-L"]
"""Lists MIG slices with their UUIDs and profiles (run only when CUDA_VISIBLE_DEVICES names one)."""
PROC_GPUS = Path("/proc/driver/nvidia/gpus")
_MIB = 1024 * 1024
_BROKEN = ("requires reset", "unknown error", "gpu is lost")
_MIG_LINE = re.compile(r"^\s*MIG\s+(\S+)\s+Device\s+\d+:\s*\(UUID:\s*(MIG-[^)\s]+)\)")
_MIG_MEMORY = re.compile(r"\.(\d+)gb$", re.I)


def detect(env: Mapping[str, str]) -> tuple[GpuDevice, ...]:
    """CUDA devices visible to this process: CUDA_VISIBLE_DEVICES by index, GPU UUID or MIG
    UUID (a MIG slice counts with its own memory); a GPU that needs a reset is left out."""
    rows = parse_nvidia_smi(run_tool(QUERY) or "") or tuple((d, True) for d in _from_proc())
    gpus = tuple(device for device, _ in rows)
    broken = [device for device, usable in rows if not usable]
    spec = env.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        picked = gpus
    else:
        slices = parse_mig_list(run_tool(LIST) or "") if "MIG-" in spec.upper() else ()
        picked = _select(gpus, slices, spec)
    return tuple(d for d in picked if all(d is not b for b in broken))


def _select(
    gpus: tuple[GpuDevice, ...], slices: tuple[GpuDevice, ...], spec: str
) -> tuple[GpuDevice, ...]:
    """What CUDA_VISIBLE_DEVICES exposes; like the runtime, stop at the first unknown entry."""
    spec = spec.strip()
    if not spec or spec.startswith("-1"):
        return ()
    picked: list[GpuDevice] = []
    for token in (t.strip() for t in spec.split(",")):
        pool = slices if token.upper().startswith("MIG-") else gpus
        device = by_token(pool, token)
        if device is None:
            break
        if all(device is not p for p in picked):
            picked.append(device)
    return tuple(picked)


def parse_nvidia_smi(text: str) -> tuple[tuple[GpuDevice, bool], ...]:
    """Parse ``index, uuid, name, total MiB, free MiB`` lines into (device, usable) pairs.

    Memory is None where it says [N/A]; a name of N/A becomes ``NVIDIA GPU <index>``; a GPU
    whose fields say ``[GPU requires reset]`` (or another fault) is kept for its index but
    marked unusable. Lines of the older ``name, total, free`` query are read too.
    """
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 5:
            index, uuid, name = fields[0], fields[1], ", ".join(fields[2:-2])
        elif len(fields) == 3:
            index, uuid, name = str(len(rows)), "", fields[0]
        else:  # e.g. a bare "[GPU requires reset]" line: it still takes an index
            if any(b in line.lower() for b in _BROKEN):
                rows.append((GpuDevice(BACKEND, f"NVIDIA GPU {len(rows)}"), False))
            continue
        total, free = fields[-2], fields[-1]
        broken = any(b in f.lower() for f in fields for b in _BROKEN)
        if not name or name.startswith("[") or name.upper() == "N/A":  # [N/A], [Unknown Error]
            name = f"NVIDIA GPU {index}"
        uuid_value = uuid if uuid.upper().startswith(("GPU-", "MIG-")) else None
        device = GpuDevice(BACKEND, name, to_int(total, _MIB), to_int(free, _MIB), uuid_value)
        rows.append((device, not broken))
    return tuple(rows)


def parse_mig_list(text: str) -> tuple[GpuDevice, ...]:
    """MIG slices from `nvidia-smi -L`, each with the memory its profile names (``1g.5gb``)."""
    slices = []
    for line in text.splitlines():
        match = _MIG_LINE.match(line)
        if not match:
            continue
        profile, uuid = match.groups()
        gb = _MIG_MEMORY.search(profile)
        size = int(gb.group(1)) * 1000**3 if gb else None
        slices.append(GpuDevice(BACKEND, f"MIG {profile}", size, size, uuid))
    return tuple(slices)


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
