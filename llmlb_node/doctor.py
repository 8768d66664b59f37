"""The `doctor` report: platform, CPU, llama.cpp build, GPUs and the offload plan in one place.

`doctor_report` gathers plain data (JSON-ready); `format_report` renders it as "key: value" lines.
"""

from __future__ import annotations

import logging
import platform
import sys
from dataclasses import asdict
from typing import Any

from . import backend, offload
from .errors import LlmlbError
from .offload import cpu
from .units import human_bytes

logger = logging.getLogger(__name__)


def doctor_report(
    required_memory_bytes: int | None = None,
    model_id: str | None = None,
    *,
    n_ctx: int | None = None,
) -> dict[str, Any]:
    """Everything that decides how fast a model will run here, as a JSON-ready dict.

    With `model_id` the plan is the one LazyLlama would make (`offload.plan_for_model`): from the
    installed GGUF's header for context `n_ctx` (Llama's default 512), else by the catalog's
    memory figure. Each GPU tool runs once. Never raises for a missing or broken llama_cpp.
    """
    report: dict[str, Any] = {
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "python_executable": sys.executable,
        },
        "cpu": cpu.cpu_info(),
        "memory": cpu.memory_info(),
        "llama_cpp": _llama_cpp_info(),
    }
    path = None
    if model_id is not None:
        model = _model_info(model_id)
        report["model"] = model
        path = model.get("path")
        if required_memory_bytes is None:
            required_memory_bytes = model.get("required_memory_bytes")
    devices = offload.detect_devices()
    report["gpus"] = [asdict(d) for d in devices]
    try:
        plan = offload.plan_for_model(
            path, n_ctx=n_ctx, required_memory_bytes=required_memory_bytes, devices=devices
        )
    except ValueError as exc:  # e.g. a malformed LLMLB_N_GPU_LAYERS
        report["plan"] = {"summary": f"error: {exc}", "error": str(exc)}
    else:
        report["plan"] = {
            "summary": str(plan),
            "n_gpu_layers": plan.n_gpu_layers,
            "backend": plan.backend,
            "reason": plan.reason,
            "devices": [d.name for d in plan.devices],
            "required_memory_bytes": required_memory_bytes,
            "estimate": _estimate_info(plan.estimate),
            "resident_bytes": _resident(path, n_ctx),
            "n_ctx": n_ctx or 512,
        }
    return report


def _resident(path: Any, n_ctx: int | None) -> int | None:
    """What the model will occupy in host memory on the CPU: what `serve` checks against
    LLMLB_MEMORY_BUDGET (`offload.memory.resident_bytes`)."""
    if path is None:
        return None
    from .gguf import GGUFError, read_header
    from .offload.memory import resident_bytes

    try:
        return resident_bytes(read_header(path), n_ctx)
    except (OSError, GGUFError):
        return None


def _estimate_info(estimate: offload.MemoryEstimate | None) -> dict[str, Any] | None:
    if estimate is None:
        return None
    return {
        "n_ctx": estimate.n_ctx,
        "n_layers": estimate.n_layers,
        "weights_bytes": estimate.weights_bytes,
        "kv_cache_bytes": estimate.kv_cache_bytes,
        "compute_bytes": estimate.compute_bytes,
        "total_bytes": estimate.total_bytes,
    }


def format_report(report: dict[str, Any]) -> str:
    """Human text, one "key: value" line each, in a stable order."""
    lines: list[tuple[str, str]] = []
    plat = report.get("platform", {})
    lines.append(
        (
            "platform",
            f"{plat.get('system')} {plat.get('release')} ({plat.get('machine')}), "
            f"Python {plat.get('python')}",
        )
    )
    if plat.get("python_executable"):
        lines.append(("python", str(plat["python_executable"])))
    cpu_ = report.get("cpu", {})
    cores = cpu_.get("cores")
    usable = cpu_.get("usable_cores")
    core_text = f"{cores} logical cores" if cores else "core count unknown"
    if usable and cores and usable != cores:
        core_text += f", {usable} usable"
    lines.append(("cpu", f"{cpu_.get('model')} ({core_text})"))
    mem = report.get("memory", {})
    if mem:
        lines.append(
            (
                "memory",
                f"{human_bytes(mem.get('total'))} total, "
                f"{human_bytes(mem.get('available'))} available",
            )
        )

    llama = report.get("llama_cpp", {})
    version = llama.get("version")
    if version is None:
        status = "not installed"
    elif llama.get("importable"):
        status = version
    else:
        status = f"{version} (not importable: {llama.get('error')})"
    lines.append(("llama-cpp-python", status))
    lines.append(("gpu offload", "yes" if llama.get("supports_gpu_offload") else "no"))
    backends = llama.get("backends") or []
    lines.append(("llama.cpp backends", ", ".join(backends) or "none (no llama-cpp-python)"))
    if llama.get("system_info"):
        lines.append(("llama.cpp system info", str(llama["system_info"])))

    gpus = report.get("gpus", [])
    if not gpus:
        lines.append(("gpus", "none detected"))
    for index, gpu in enumerate(gpus):
        lines.append((f"gpu {index}", str(offload.GpuDevice(**gpu))))

    model = report.get("model")
    if model:
        if model.get("error"):
            text = f"{model.get('id')}: {model['error']}"
        else:
            text = f"{model.get('id')}, needs {human_bytes(model.get('required_memory_bytes'))}"
            if model.get("memory_source"):
                text += f" ({model['memory_source']})"
        lines.append(("model", text))

    plan = report.get("plan", {})
    estimate = plan.get("estimate")
    if estimate:
        lines.append(
            (
                "memory estimate",
                f"{human_bytes(estimate['total_bytes'])} for n_ctx={estimate['n_ctx']} "
                f"({estimate['n_layers']} layers): weights {human_bytes(estimate['weights_bytes'])}"
                f", KV cache {human_bytes(estimate['kv_cache_bytes'])}, compute buffers "
                f"{human_bytes(estimate['compute_bytes'])}",
            )
        )
    if plan.get("resident_bytes"):
        lines.append(
            (
                "resident estimate",
                f"{human_bytes(plan['resident_bytes'])} of host memory on the CPU for "
                f"n_ctx={plan.get('n_ctx')} (what `serve` checks against LLMLB_MEMORY_BUDGET)",
            )
        )
    lines.append(("plan", str(plan.get("summary"))))
    if "n_gpu_layers" in plan:
        lines.append(("n_gpu_layers", str(plan["n_gpu_layers"])))
        lines.append(("backend", str(plan["backend"])))
    return "\n".join(f"{key}: {value}" for key, value in lines)


def _llama_cpp_info() -> dict[str, Any]:
    """Installed version (metadata), import status, system info and GPU offload support."""
    info: dict[str, Any] = {
        "version": backend.installed_version(),
        "importable": False,
        "error": None,
        "system_info": None,
        "supports_gpu_offload": False,
        "backends": [],
    }
    if info["version"] is not None:  # every build has the CPU backend, plus the compiled GPU ones
        info["backends"] = ["cpu", *offload.built_backends()]
    try:
        import llama_cpp
    except Exception as exc:  # ImportError, or OSError from a broken shared library
        info["error"] = f"{type(exc).__name__}: {exc}"
        return info
    info["importable"] = True
    info["version"] = info["version"] or getattr(llama_cpp, "__version__", None)
    info["backends"] = info["backends"] or ["cpu", *offload.built_backends()]
    try:
        raw = llama_cpp.llama_print_system_info()
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        info["system_info"] = text.strip().rstrip("|").strip()
    except Exception as exc:
        logger.debug("llama_print_system_info() failed: %s", exc)
    info["supports_gpu_offload"] = offload.gpu_offload_supported()
    return info


def _model_info(model_id: str) -> dict[str, Any]:
    """The catalog's memory figure for `model_id` (file size as a fallback estimate) and the
    installed file, if any (never the network)."""
    from .resolver import ModelResolver

    info: dict[str, Any] = {"id": model_id, "required_memory_bytes": None, "path": None}
    try:
        resolver = ModelResolver()
        entry = resolver.catalog.get(model_id)
        installed = resolver.installed(model_id)
    except LlmlbError as exc:
        info["error"] = str(exc)
        return info
    if installed is not None:
        info["path"] = str(installed.path)
        info["memory_source"] = "GGUF header (weights, KV cache, compute buffers)"
    if entry.required_memory_bytes is not None:
        info["required_memory_bytes"] = entry.required_memory_bytes
        info.setdefault("memory_source", "catalog required_memory_bytes")
    elif entry.size_bytes is not None:
        info["required_memory_bytes"] = entry.size_bytes
        info.setdefault("memory_source", "estimate: model file size")
    return info
