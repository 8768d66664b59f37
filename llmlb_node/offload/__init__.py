"""GPU offload planning: how many layers llama.cpp should put on which GPU, and why.

One module per platform strategy (metal, cuda, rocm, vulkan, cpu) sits behind `plan_offload`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import re
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path

from . import cpu, cuda, metal, rocm, vulkan
from ._common import GpuDevice, human_bytes
from .memory import MemoryEstimate, estimate_memory

__all__ = [
    "ENV_VAR",
    "GpuDevice",
    "MemoryEstimate",
    "OffloadPlan",
    "built_backends",
    "detect_devices",
    "estimate_memory",
    "gpu_offload_supported",
    "node_platform",
    "plan_for_model",
    "plan_offload",
    "rebuild_hint",
]

logger = logging.getLogger(__name__)

ENV_VAR = "LLMLB_N_GPU_LAYERS"
GPU_HEADROOM = 0.95
"""Share of a GPU's free memory a plan may fill (drivers and fragmentation take the rest)."""

_STRATEGIES = {"cuda": cuda, "rocm": rocm, "vulkan": vulkan, "metal": metal}
_DETECTORS: tuple[Callable[[Mapping[str, str]], tuple[GpuDevice, ...]], ...] = (
    cuda.detect,
    rocm.detect,
    vulkan.detect,
    metal.detect,
    cpu.detect,  # always empty: the CPU is the fallback, not a device
)
_PRIORITY = ("metal", "cuda", "rocm", "sycl", "vulkan")
_LIB_BACKENDS = {
    "cuda": "cuda",
    "hip": "rocm",
    "vulkan": "vulkan",
    "metal": "metal",
    "sycl": "sycl",
    "blas": "blas",
    "opencl": "opencl",
}
_LIB_PATTERN = re.compile(r"^(?:lib)?ggml-([a-z]+)\.(?:so|dylib|dll)(?:\.|$)")

_warned: set[str] = set()
_warn_lock = threading.Lock()


@dataclass(frozen=True)
class OffloadPlan:
    """What `plan_offload` decided: pass ``n_gpu_layers`` to ``llama_cpp.Llama``."""

    n_gpu_layers: int
    """-1 means all layers; 0 means CPU only."""
    backend: str
    """``metal``, ``cuda``, ``rocm``, ``vulkan`` (``sycl`` for SYCL builds) or ``cpu``."""
    reason: str
    devices: tuple[GpuDevice, ...] = ()
    estimate: MemoryEstimate | None = None
    """The memory estimate from the model's GGUF header, when it could be read."""

    @property
    def layers_text(self) -> str:
        """``all layers (-1)``, ``CPU only (0)`` or ``20 layers``."""
        n = self.n_gpu_layers
        if n < 0:
            return f"all layers ({n})"
        if n == 0:
            return "no layers offloaded (0)"
        return f"{n} layer" if n == 1 else f"{n} layers"

    def __str__(self) -> str:
        return f"{self.backend}, {self.layers_text}: {self.reason}"


def gpu_offload_supported() -> bool:
    """Whether the installed llama.cpp can offload to a GPU it sees; False if not importable."""
    try:
        import llama_cpp
    except Exception as exc:  # ImportError, or OSError when the shared library fails to load
        logger.debug("llama_cpp is not importable: %s", exc)
        return False
    try:
        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as exc:
        logger.debug("llama_supports_gpu_offload() failed: %s", exc)
        return False


def built_backends() -> tuple[str, ...]:
    """The ggml backends compiled into the installed llama-cpp-python, from its library files.

    Reads file names only (no import): e.g. ``("cuda",)`` for a CUDA build, ``()`` for CPU only.
    """
    try:
        spec = importlib_util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return ()
    if spec is None or not spec.submodule_search_locations:
        return ()
    found: set[str] = set()
    for location in spec.submodule_search_locations:
        for folder in (Path(location) / "lib", Path(location)):
            try:
                names = [p.name for p in folder.iterdir()]
            except OSError:
                continue
            for file_name in names:
                match = _LIB_PATTERN.match(file_name)
                if match and match.group(1) in _LIB_BACKENDS:
                    found.add(_LIB_BACKENDS[match.group(1)])
    return tuple(sorted(found, key=lambda b: (_PRIORITY + ("blas", "opencl")).index(b)))


_SYSTEMS = {"Linux": "linux", "Darwin": "macos", "Windows": "windows"}


def node_platform() -> str:
    """This node's platform as llmlb's catalog spells it: ``<os>-<llama.cpp GPU backend>``
    (``linux-cuda``, ``macos-metal``, ``windows-vulkan``, ...), ``<os>-cpu`` for a CPU build."""
    system = platform.system()
    gpu = [b for b in built_backends() if b in _PRIORITY]
    return f"{_SYSTEMS.get(system, system.lower())}-{gpu[0] if gpu else 'cpu'}"


def detect_devices(env: Mapping[str, str] | None = None) -> tuple[GpuDevice, ...]:
    """Every GPU the platform tools can see: CUDA, ROCm, Vulkan, then Metal.

    The tools run in parallel, each for at most 2 s; a missing or failing one contributes
    nothing. `env` (default os.environ) is only read for the ``*_VISIBLE_DEVICES`` variables.
    """
    from concurrent.futures import ThreadPoolExecutor  # only machines that may have a GPU pay

    env = os.environ if env is None else env
    with ThreadPoolExecutor(len(_DETECTORS), thread_name_prefix="llmlb-gpu-detect") as pool:
        futures = [pool.submit(detect, env) for detect in _DETECTORS]  # tools run side by side
    devices: list[GpuDevice] = []
    for detect, future in zip(_DETECTORS, futures, strict=True):
        try:
            devices.extend(future.result())
        except Exception as exc:  # a detector must never break loading
            logger.debug("GPU detector %s failed: %s", detect.__module__, exc)
    return tuple(devices)


def rebuild_hint(backend: str) -> str:
    """The commands that rebuild llama-cpp-python for `backend` (a preset name)."""
    from ..backend import rebuild_hint as _hint

    preset = _STRATEGIES[backend].PRESET if backend in _STRATEGIES else backend
    return _hint(preset)


def plan_for_model(
    path: str | os.PathLike[str] | None,
    *,
    n_ctx: int | None = None,
    n_gpu_layers: int | str | None = "auto",
    required_memory_bytes: int | None = None,
    type_k: int | None = None,
    type_v: int | None = None,
    env: Mapping[str, str] | None = None,
    devices: Sequence[GpuDevice] | None = None,
) -> OffloadPlan:
    """The offload plan for the GGUF at `path` run with context `n_ctx`: what LazyLlama loads
    with and what ``doctor ID`` shows, from one function.

    The memory need comes from the file's header (`estimate_memory`: weights per layer, the KV
    cache for `n_ctx` and the compute buffers), read only when a GPU is there to plan for.
    Without a readable header (`path` None, not yet installed, or unparseable) the plan goes by
    bytes: `required_memory_bytes` (the catalog's figure, else the file size) either fits or the
    model runs on the CPU; a layer count is never guessed.
    """

    def estimate() -> MemoryEstimate | None:
        if path is None:
            return None
        from ..gguf import GGUFError, read_header

        try:
            return estimate_memory(read_header(path), n_ctx, type_k=type_k, type_v=type_v)
        except (OSError, GGUFError) as exc:
            logger.debug("cannot read the GGUF header of %s: %s", path, exc)
            return None

    required = required_memory_bytes
    if required is None and path is not None:
        with contextlib.suppress(OSError):
            required = os.path.getsize(path) or None
    return plan_offload(
        required, n_gpu_layers=n_gpu_layers, env=env, estimate=estimate, devices=devices
    )


def plan_offload(
    required_memory_bytes: int | None = None,
    *,
    n_gpu_layers: int | str | None = "auto",
    n_layers: int | None = None,
    env: Mapping[str, str] | None = None,
    estimate: MemoryEstimate | Callable[[], MemoryEstimate | None] | None = None,
    devices: Sequence[GpuDevice] | None = None,
) -> OffloadPlan:
    """Decide ``n_gpu_layers`` for a model (see `plan_for_model` for a GGUF file).

    Rules, in order:

    1. an explicit `n_gpu_layers` (int, or a numeric string) always wins;
    2. else ``LLMLB_N_GPU_LAYERS`` from `env` (default os.environ): an int, or ``auto``;
    3. else auto, with a build that can offload and a visible GPU (CUDA, ROCm, Vulkan, or Metal
       on Apple silicon): all layers (-1) when the model fits in `GPU_HEADROOM` of the free
       memory of that backend's devices (summed: llama.cpp splits layers across them; Metal's
       is the recommended working set, not all of unified memory). Else, with `estimate`, the
       most layers whose weights, KV cache and compute buffer fit; with only `n_layers`,
       ``floor(n_layers * free / required)``; with neither, the CPU (never a guessed layer
       count). A model size or free memory that no tool reports counts as "fits".
       Everything else -> CPU (0).

    `estimate` may be a function that makes it, called only when a GPU is there to plan for.
    `devices` saves detecting them again (``doctor`` passes the ones it shows). A GPU that is
    visible while the installed llama.cpp cannot offload logs one WARNING per process (and
    backend) with the rebuild command. Raises `ValueError` for a malformed value.
    """
    env = os.environ if env is None else env
    found = tuple(devices) if devices is not None else None
    need = _Need(required_memory_bytes, n_layers, estimate)
    fixed = _parse_layers(n_gpu_layers, "n_gpu_layers")
    if fixed is not None:
        plan = _plan_fixed(fixed, f"explicit n_gpu_layers={fixed}", env, found)
    else:
        fixed = _parse_layers(env.get(ENV_VAR), ENV_VAR)
        if fixed is not None:
            plan = _plan_fixed(fixed, f"{ENV_VAR}={fixed} from the environment", env, found)
        else:
            plan = _plan_auto(need, env, found)
    if need.made is not None and plan.estimate is None:
        plan = dataclasses.replace(plan, estimate=need.made)
    logger.debug("offload plan: %s", plan)  # callers log it with the model it is for
    return plan


class _Need:
    """What the model needs, as far as the caller knows it; the estimate made on first use."""

    def __init__(
        self,
        required: int | None,
        n_layers: int | None,
        estimate: MemoryEstimate | Callable[[], MemoryEstimate | None] | None,
    ) -> None:
        self.required = required
        self.n_layers = n_layers
        self._estimate = estimate
        self._made = not callable(estimate)

    @property
    def estimate(self) -> MemoryEstimate | None:
        if not self._made:
            self._made = True
            self._estimate = self._estimate()  # type: ignore[operator]
        return self._estimate  # type: ignore[return-value]

    @property
    def made(self) -> MemoryEstimate | None:
        """The estimate if it was needed (and could be made); never makes it."""
        return self._estimate if self._made else None  # type: ignore[return-value]

    @property
    def full_bytes(self) -> int | None:
        estimate = self.estimate
        return estimate.gpu_bytes(-1) if estimate is not None else self.required


def _parse_layers(value: int | str | None, source: str) -> int | None:
    """An int, or None for auto; `ValueError` for anything else."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{source}={value!r} must be an integer or 'auto'")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not text or text.lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{source}={value!r} must be an integer or 'auto'") from None


def _plan_fixed(
    layers: int, reason: str, env: Mapping[str, str], found: tuple[GpuDevice, ...] | None
) -> OffloadPlan:
    if layers == 0:
        return OffloadPlan(0, "cpu", reason)
    supported = gpu_offload_supported()
    devices = detect_devices(env) if found is None else found
    built = built_backends()
    choice = _choose(devices, built)
    if not supported:
        if choice is not None:
            _warn_cannot_offload(choice[0], choice[1], built)
        return OffloadPlan(
            layers,
            "cpu",
            f"{reason}, but this llama.cpp build cannot offload: runs on CPU",
            devices,
        )
    if choice is None:
        return OffloadPlan(layers, _guess_backend(built), reason)
    return OffloadPlan(layers, choice[0], reason, choice[1])


def _gpu_may_exist(env: Mapping[str, str]) -> bool:
    """Cheap signs of a GPU (device nodes, vendor tools on PATH, a Mac): only then is it worth
    running the detectors for a CPU-only build, to warn that it cannot use the GPU."""
    if platform.system() != "Linux":
        return True
    if any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")):
        return True
    import glob

    if glob.glob("/dev/dri/renderD*"):
        return True
    path = env.get("PATH", os.environ.get("PATH"))
    return any(shutil.which(tool, path=path) for tool in ("nvidia-smi", "rocm-smi", "vulkaninfo"))


def _plan_auto(
    need: _Need, env: Mapping[str, str], found: tuple[GpuDevice, ...] | None
) -> OffloadPlan:
    supported = gpu_offload_supported()
    if not supported and found is None and not _gpu_may_exist(env):
        return OffloadPlan(0, "cpu", "no GPU detected: running on CPU")
    devices = detect_devices(env) if found is None else found
    built = built_backends()
    choice = _choose(devices, built)
    if not supported:
        if choice is None:
            return OffloadPlan(0, "cpu", "no GPU detected: running on CPU")
        backend, devs = choice
        hint = _warn_cannot_offload(backend, devs, built)
        return OffloadPlan(
            0,
            "cpu",
            f"{_names(devs)} visible but this llama.cpp build cannot offload to it: "
            f"running on CPU; {hint}",
            devices,
        )
    if choice is None:
        backend = _guess_backend(built)
        return OffloadPlan(
            -1, backend, "llama.cpp reports a usable GPU (no device details found): all layers"
        )
    backend, devs = choice
    free, note = _free_memory(backend, devs, devices)
    where = f"{_names(devs)}{note}"
    required = need.full_bytes
    if required is None:
        return OffloadPlan(-1, backend, f"model size unknown, assuming it fits on {where}", devs)
    if free is None:
        return OffloadPlan(-1, backend, f"free memory of {where} unknown, assuming it fits", devs)
    budget = int(free * GPU_HEADROOM)
    what = "model needs" if need.estimate is None else f"model needs {need.estimate}:"
    text = f"{what} {human_bytes(required)}, {human_bytes(free)} {_free_word(backend)} on {where}"
    if required <= budget:
        return OffloadPlan(-1, backend, f"{text}: fits", devs)
    if need.estimate is not None:
        n = need.estimate.max_layers_within(budget)
        reason = (
            f"{text}: {n} of {need.estimate.n_layers} layers fit in "
            f"{round(GPU_HEADROOM * 100)}% of it"
        )
    elif need.n_layers and need.n_layers > 0:
        n = max(0, need.n_layers * budget // required)
        reason = f"{text}: {n} of {need.n_layers} layers (n_layers * free / required)"
    else:
        n = 0
        reason = f"{text}: does not fit, and without the GGUF's layer count it cannot be split"
    if n == 0:
        return OffloadPlan(0, "cpu", f"{reason}; running on CPU", devs)
    return OffloadPlan(n, backend, reason, devs)


def _free_word(backend: str) -> str:
    return "usable (recommended working set)" if backend == "metal" else "free"


def _choose(
    devices: Sequence[GpuDevice], built: Sequence[str]
) -> tuple[str, tuple[GpuDevice, ...]] | None:
    """The backend to use and its devices: the compiled-in backend if it sees one, else priority."""
    by_backend: dict[str, list[GpuDevice]] = {}
    for device in devices:
        by_backend.setdefault(device.backend, []).append(device)
    for backend in (*built, *_PRIORITY):
        if backend in by_backend:
            return backend, tuple(by_backend[backend])
    return None


def _guess_backend(built: Sequence[str]) -> str:
    """A label for a GPU llama.cpp uses but no tool showed us."""
    for backend in built:
        if backend in _PRIORITY:
            return backend
    return "metal" if metal.is_apple_silicon() else "cuda"


def _free_memory(
    backend: str, devs: Sequence[GpuDevice], devices: Sequence[GpuDevice]
) -> tuple[int | None, str]:
    """Free bytes over the chosen devices (llama.cpp splits layers across them).

    Vulkan reports no memory; then the same cards as seen by nvidia-smi / rocm-smi stand in.
    """
    known = [d.free_memory for d in devs if d.free_memory is not None]
    if known:
        return sum(known), ""
    if backend == "vulkan":
        others = [d for d in devices if d.backend != backend and d.free_memory is not None]
        if others:
            tools = sorted({d.backend for d in others})
            return sum(d.free_memory or 0 for d in others), f" (memory per {'/'.join(tools)})"
    return None, ""


def _names(devs: Sequence[GpuDevice]) -> str:
    names = [d.name for d in devs]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{devs[0].backend} GPU {shown}" if devs else "no GPU"


def _warn_cannot_offload(backend: str, devs: Sequence[GpuDevice], built: Sequence[str]) -> str:
    """Log, once per process and backend, that a visible GPU goes unused; return the hint."""
    hint = f"rebuild it with {rebuild_hint(backend)}"
    if backend in built:
        hint = (
            f"the {backend} backend is built in but found no usable device "
            f"(check the driver and runtime), or {hint}"
        )
    with _warn_lock:
        if backend in _warned:
            return hint
        _warned.add(backend)
    logger.warning(
        "%s is visible but the installed llama-cpp-python cannot offload to it, so models run "
        "on the CPU (much slower); %s",
        _names(devs),
        hint,
    )
    return hint


def _reset_warnings() -> None:
    """Forget which warnings were logged (for tests)."""
    with _warn_lock:
        _warned.clear()
