"""What the llmlb load balancer reads: ``/api/system``, ``/api/health``, ``/api/models/{id}/info``.

The LB detects llmlb's own node type (xLLM) by ``xllm_version`` in ``/api/system``, then polls
``/api/health`` and reads each model's context length from its info. Health and system answer
from memory (pool counters, download activity, a hardware snapshot refreshed in the background),
so a node busy loading or downloading still answers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__, backend, offload
from ..gguf import GGUFError, read_header
from ..offload import GpuDevice
from ..offload.cpu import memory_info
from ..progress import ProgressEvent
from ..resolver import DownloadActivity
from .pool import ModelPool

log = logging.getLogger(__name__)

REFRESH_S = 30.0
"""Seconds between hardware detections (GPU memory moves; the LB polls every 30 s)."""
_GPU_BACKENDS = frozenset({"cuda", "rocm", "vulkan", "metal", "sycl"})
_SYNC_STATE = {"installed": "success", "failed": "failed", "interrupted": "failed"}
_GIB = 1024**3
SERVER_NAME = "llmlb-node"
_QUANT = re.compile(r"[._-](i?q\d+(?:_[a-z0-9]+)*|bf16|f16|f32)(?=[._-]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class HardwareSnapshot:
    """GPUs and the llama.cpp build, as detected last (off the event loop)."""

    devices: tuple[GpuDevice, ...] = ()
    llama_cpp_version: str | None = None
    gpu_offload: bool = False


class Hardware:
    """Keeps a `HardwareSnapshot` fresh: detected at start, then every `REFRESH_S` seconds.

    Detection runs GPU tools (nvidia-smi, rocm-smi, ...) for up to 2 s each, so it never runs
    in a request: requests read `snapshot`.
    """

    def __init__(self, refresh: float = REFRESH_S) -> None:
        self.refresh = refresh
        self.snapshot = HardwareSnapshot()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            try:
                self.snapshot = await asyncio.to_thread(detect_hardware)
            except Exception as exc:  # a detector must never take the node down
                log.warning("hardware detection failed: %s", exc)
            await asyncio.sleep(self.refresh)


def detect_hardware() -> HardwareSnapshot:
    """GPUs the platform tools see, and the installed llama.cpp's version and offload support."""
    return HardwareSnapshot(
        devices=offload.detect_devices(),
        llama_cpp_version=backend.installed_version(),
        gpu_offload=_gpu_offload(),
    )


def _gpu_offload() -> bool:
    """llama.cpp's own answer once it is imported; until then, whether a GPU backend is built in
    (read from file names: importing llama_cpp only to answer this would cost an idle node RSS)."""
    if "llama_cpp" in sys.modules:
        return offload.gpu_offload_supported()
    return bool(_GPU_BACKENDS & set(offload.built_backends()))


# -- handlers --------------------------------------------------------------------------------
async def health(request: Request) -> Response:
    pool: ModelPool = request.state.pool
    body = health_body(pool, request.state.hardware.snapshot)
    return JSONResponse(body, 503 if body["status"] == "offline" else 200)


async def system(request: Request) -> Response:
    return JSONResponse(system_body(request.state.hardware.snapshot))


async def model_info(request: Request) -> Response:
    pool: ModelPool = request.state.pool
    model_id = request.path_params["model_id"]
    await pool.check_known(model_id)
    return JSONResponse(await asyncio.to_thread(model_info_body, pool, model_id))


# -- bodies ----------------------------------------------------------------------------------
def health_body(pool: ModelPool, hw: HardwareSnapshot) -> dict[str, Any]:
    """The LB's health shape: status, gpu, load, memory, sync state, loaded models, version."""
    settings = pool.settings
    gpu = {**_gpu(hw.devices), "capability_score": capability_score(hw)}
    ram = memory_info()
    ram_total = ram["total"] or 0
    ram_free = ram["available"] if ram["available"] is not None else ram_total
    activity = pool.resolver.activity()
    return {
        "status": _status(pool),
        "gpu": gpu,
        "load": {
            "active_requests": pool.in_flight(),
            # Each loaded model runs one request and queues LLMLB_MAX_QUEUE more before 429.
            "max_concurrent_requests": settings.max_loaded_models * (1 + settings.max_queue),
        },
        "memory": {
            "ram_total_bytes": ram_total,
            "ram_used_bytes": ram_total - ram_free,
            "vram_total_bytes": gpu["total_memory_bytes"],
            "vram_used_bytes": gpu["used_memory_bytes"],
        },
        "sync_state": sync_state(activity),
        "sync_progress": sync_progress(activity),
        "loaded_models": sorted(pool.loaded()),
        "version": __version__,
    }


def system_body(hw: HardwareSnapshot) -> dict[str, Any]:
    """The LB's system shape: ``xllm_version`` (what makes the LB detect llmlb's own node
    type), device type and GPUs, node version, llama.cpp build."""
    gpu_type = bool(hw.devices) and hw.gpu_offload
    return {
        "xllm_version": __version__,
        "server_name": SERVER_NAME,
        "gpu": {"device_count": len(hw.devices)},
        "device": {
            "device_type": "gpu" if gpu_type else "cpu",
            "gpu_devices": [_device(d) for d in hw.devices],
        },
        "version": __version__,
        "llama_cpp": {"version": hw.llama_cpp_version, "gpu_offload": hw.gpu_offload},
    }


def capability_score(hw: HardwareSnapshot) -> float:
    """GiB of GPU memory llama.cpp can offload layers to (0 without a GPU it can use): how
    large a model this node runs on its GPUs, comparable across nodes."""
    if not hw.gpu_offload:
        return 0.0
    return round(sum(d.total_memory or 0 for d in hw.devices) / _GIB, 1)


def model_info_body(pool: ModelPool, model_id: str) -> dict[str, Any]:
    """xLLM's model info: the context this node runs it with (the LB's max_tokens), size,
    quantization and family; read from the installed GGUF's header, else the catalog."""
    installed = pool.resolver.installed(model_id)
    entry = pool.resolver.catalog.find(model_id)
    meta = _gguf_metadata(installed.path) if installed else {}
    arch = meta.get("general.architecture")
    trained = meta.get(f"{arch}.context_length") if arch else None
    n_ctx = pool.settings.n_ctx or trained
    filename = installed.path.name if installed else entry.filename if entry else ""
    size = sum(p.stat().st_size for p in installed.paths) if installed else None
    return {
        "model": model_id,
        "context_length": n_ctx if isinstance(n_ctx, int) else None,
        "size_bytes": size if size is not None else (entry.total_size if entry else None),
        "quantization": _quantization(filename),
        "family": arch if isinstance(arch, str) else None,
        "parameter_size": _text(meta.get("general.size_label")),
    }


def _gguf_metadata(path: Any) -> dict[str, Any]:
    try:
        return dict(read_header(path, tensors=False).metadata)
    except (OSError, GGUFError):
        return {}


def _quantization(filename: str) -> str | None:
    """``Q4_K_M`` from ``gemma-3-270m-q4_k_m.gguf``; None when the name does not say."""
    match = _QUANT.search(filename.removesuffix(".gguf"))
    return match.group(1).upper() if match else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _status(pool: ModelPool) -> str:
    if pool.shutting_down:
        return "offline"
    return "busy" if pool.saturated() else "online"


def sync_state(activity: DownloadActivity) -> str:
    """idle (nothing downloaded since start), running, success or failed (the last download)."""
    if activity.running:
        return "running"
    if activity.last is None:
        return "idle"
    return _SYNC_STATE.get(activity.last.stage, "failed")


def sync_progress(activity: DownloadActivity) -> dict[str, Any] | None:
    """The running download's (else the last one's) model, file and bytes; None when idle."""
    event = activity.running[0] if activity.running else activity.last
    return None if event is None else _progress(event)


def _progress(event: ProgressEvent) -> dict[str, Any]:
    return {
        "model_id": event.model_id,
        "file": event.filename,
        "downloaded_bytes": event.downloaded,
        "total_bytes": event.total,
    }


def _gpu(devices: tuple[GpuDevice, ...]) -> dict[str, Any]:
    rows = [_device(d) for d in devices]
    total = sum(r["total_memory_bytes"] for r in rows)
    used = sum(r["used_memory_bytes"] for r in rows)
    return {
        "device_count": len(rows),
        "total_memory_bytes": total,
        "used_memory_bytes": used,
        "free_memory_bytes": total - used,
        "devices": rows,
    }


def _device(device: GpuDevice) -> dict[str, Any]:
    """One GPU; memory a tool did not report counts as 0 (the LB reads numbers)."""
    total = device.total_memory or 0
    used = total - device.free_memory if device.free_memory is not None else 0
    return {
        "name": device.name,
        "backend": device.backend,
        "total_memory_bytes": total,
        "used_memory_bytes": max(used, 0),
    }
