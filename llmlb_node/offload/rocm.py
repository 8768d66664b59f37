"""AMD strategy: find ROCm (HIP) GPUs with rocm-smi, or the amdgpu sysfs files behind /dev/kfd.

sysfs gives exact VRAM totals and usage even where rocm-smi is not installed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._common import GpuDevice, run_tool, to_int, visible

logger = logging.getLogger(__name__)

BACKEND = "rocm"
PRESET = "rocm"
QUERY = ["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--json"]
KFD = Path("/dev/kfd")
DRM = Path("/sys/class/drm")
_NAME_KEYS = ("card series", "device name", "card model", "card sku", "marketing name")
_AMD_VENDOR = "0x1002"


def detect(env: Mapping[str, str]) -> tuple[GpuDevice, ...]:
    """ROCm devices visible to this process (honours ROCR_/HIP_VISIBLE_DEVICES)."""
    devices = parse_rocm_smi(run_tool(QUERY) or "")
    if not devices and KFD.exists():
        devices = _from_sysfs()
    return visible(devices, env, "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")


def parse_rocm_smi(text: str) -> tuple[GpuDevice, ...]:
    """Parse `rocm-smi --showproductname --showmeminfo vram --json` (field names vary)."""
    start = text.find("{")
    if start < 0:
        return ()
    try:  # raw_decode: rocm-smi may print warnings after the JSON as well as before it
        data, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return ()
    if not isinstance(data, dict):
        return ()
    devices = []
    for key in sorted((k for k in data if re.fullmatch(r"card\d+", k)), key=lambda k: int(k[4:])):
        card = data[key]
        if not isinstance(card, dict):
            continue
        fields = {str(k).strip().lower(): v for k, v in card.items()}
        name = next(
            (str(fields[k]) for k in _NAME_KEYS if _named(fields.get(k))), f"AMD GPU ({key})"
        )
        total = to_int(_str(fields.get("vram total memory (b)")))
        used = to_int(_str(fields.get("vram total used memory (b)")))
        free = total - used if total is not None and used is not None else None
        devices.append(GpuDevice(BACKEND, name, total, free))
    return tuple(devices)


def _from_sysfs() -> tuple[GpuDevice, ...]:
    """AMD cards from /sys/class/drm/cardN/device (vendor 0x1002 with VRAM counters)."""
    try:
        cards = [p for p in DRM.glob("card*") if re.fullmatch(r"card\d+", p.name)]
    except OSError:
        return ()
    devices = []
    for card in sorted(cards, key=lambda p: int(p.name[4:])):
        dev = card / "device"
        if _read(dev / "vendor") != _AMD_VENDOR:
            continue
        total = to_int(_read(dev / "mem_info_vram_total"))
        if total is None:
            continue
        used = to_int(_read(dev / "mem_info_vram_used"))
        name = _read(dev / "product_name") or f"AMD GPU {_read(dev / 'device') or card.name}"
        devices.append(GpuDevice(BACKEND, name, total, total - used if used is not None else None))
    return tuple(devices)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip() or None
    except OSError:
        return None


def _named(value: Any) -> bool:
    """A real name, not empty nor a tool's placeholder (N/A, [N/A], Unknown)."""
    text = str(value or "").strip().strip("[]").strip().lower()
    return bool(text) and text not in ("n/a", "na", "unknown")


def _str(value: Any) -> str | None:
    return None if value is None else str(value)
