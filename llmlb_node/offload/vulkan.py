"""Vulkan strategy: list real GPUs from `vulkaninfo --summary`, skipping software rasterizers.

The summary has no memory figures, so Vulkan devices report memory as unknown.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ._common import GpuDevice, run_tool, visible

BACKEND = "vulkan"
PRESET = "vulkan"
QUERY = ["vulkaninfo", "--summary"]
_GPU_HEADER = re.compile(r"^GPU(\d+):\s*$")
_SOFTWARE = "PHYSICAL_DEVICE_TYPE_CPU"


def detect(env: Mapping[str, str]) -> tuple[GpuDevice, ...]:
    """Vulkan GPUs (honours GGML_VK_VISIBLE_DEVICES); llvmpipe and other CPU devices left out."""
    return visible(parse_vulkaninfo(run_tool(QUERY) or ""), env, "GGML_VK_VISIBLE_DEVICES")


def parse_vulkaninfo(text: str) -> tuple[GpuDevice, ...]:
    """Parse the ``GPUn:`` blocks of `vulkaninfo --summary`."""
    blocks: list[dict[str, str]] = []
    for line in text.splitlines():
        if _GPU_HEADER.match(line.strip()):
            blocks.append({})
        elif blocks and "=" in line:
            key, _, value = line.partition("=")
            blocks[-1][key.strip()] = value.strip()
    return tuple(
        GpuDevice(BACKEND, block.get("deviceName") or "Vulkan GPU")
        for block in blocks
        if block.get("deviceType") != _SOFTWARE
    )
