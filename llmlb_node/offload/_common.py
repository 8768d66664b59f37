"""Shared pieces of the offload strategies: the device record and a hang-proof tool runner.

Every detector calls external tools through `run_tool`, which never raises and never waits long.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..units import human_bytes  # noqa: F401  (re-exported for the strategies)

if TYPE_CHECKING:
    import subprocess

logger = logging.getLogger(__name__)

TOOL_TIMEOUT = 2.0
"""Seconds any detection tool (nvidia-smi, rocm-smi, vulkaninfo, sysctl) may take."""


@dataclass(frozen=True)
class GpuDevice:
    """One GPU a detector saw, with its memory in bytes when the tool reports it."""

    backend: str
    """``cuda``, ``rocm``, ``vulkan`` or ``metal``."""
    name: str
    total_memory: int | None = None
    free_memory: int | None = None
    uuid: str | None = field(default=None, compare=False)
    """The device's UUID when the tool reports it (``GPU-…``, ``MIG-…``)."""

    def __str__(self) -> str:
        parts = [f"{self.backend}: {self.name}"]
        if self.total_memory is not None:
            parts.append(f"{human_bytes(self.total_memory)} total")
        if self.free_memory is not None:
            parts.append(f"{human_bytes(self.free_memory)} free")
        return ", ".join(parts)


def run_tool(args: Sequence[str], timeout: float = TOOL_TIMEOUT) -> str | None:
    """Run a detection tool and return its stdout, or None if missing, failing or too slow."""
    exe = shutil.which(args[0])
    if exe is None:
        return None
    import subprocess  # only when a tool is there to run

    env = dict(os.environ, LC_ALL="C")
    try:
        proc = subprocess.Popen(
            [exe, *args[1:]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=env,
            start_new_session=os.name == "posix",
        )
    except OSError as exc:
        logger.debug("cannot run %s: %s", args[0], exc)
        return None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        logger.debug("%s did not answer within %gs; ignored", args[0], timeout)
        return None
    if proc.returncode != 0:
        logger.debug("%s exited with %s: %s", args[0], proc.returncode, (err or "").strip()[:200])
        return None
    return out


def _kill(proc: subprocess.Popen[str]) -> None:
    """Kill the tool and anything it started, then reap it without waiting on its pipes."""
    import subprocess

    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except OSError:
        pass
    try:
        proc.communicate(timeout=0.5)
    except (subprocess.TimeoutExpired, OSError, ValueError):
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)


def visible(
    devices: Sequence[GpuDevice], env: Mapping[str, str], *names: str
) -> tuple[GpuDevice, ...]:
    """Keep the devices a ``*_VISIBLE_DEVICES`` variable exposes, by index or by UUID (a unique
    prefix, as the runtimes accept). Like the runtimes, stop at the first entry that names no
    device: a device that cannot be mapped is never counted."""
    for name in names:
        value = env.get(name)
        if value is None:
            continue
        value = value.strip()
        if not value or value.startswith("-1"):
            return ()
        picked: list[GpuDevice] = []
        for token in value.split(","):
            device = by_token(devices, token.strip())
            if device is None:
                break  # the runtimes stop at the first invalid entry
            if all(device is not p for p in picked):
                picked.append(device)
        devices = picked
    return tuple(devices)


def by_token(devices: Sequence[GpuDevice], token: str) -> GpuDevice | None:
    """The device a ``*_VISIBLE_DEVICES`` entry names: an index, or a unique UUID prefix."""
    if token.isdigit():
        index = int(token)
        return devices[index] if index < len(devices) else None
    matches = [d for d in devices if d.uuid and token and d.uuid.lower().startswith(token.lower())]
    return matches[0] if len(matches) == 1 else None


def to_int(text: str | None, scale: int = 1) -> int | None:
    """Parse a tool's number ('24564', ' 1.5e3 ') times `scale`; None for '[N/A]' and the like."""
    if text is None:
        return None
    try:
        return int(float(text.strip()) * scale)
    except ValueError:
        return None
