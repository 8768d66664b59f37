"""Tests for llmlb_node.offload: detection, the auto/explicit/env rules and the rebuild warning.

Only what cannot exist here is faked (a Mac, NVIDIA/AMD/Vulkan tools); the CPU path runs for real.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmlb_node import offload
from llmlb_node.offload import (
    ASSUMED_LAYERS,
    ENV_VAR,
    GpuDevice,
    OffloadPlan,
    _common,
    cuda,
    metal,
    rocm,
    vulkan,
)

MIB = 1024 * 1024
SYSTEM_PATH = "/usr/bin:/bin"  # what the fake tools themselves use (cat, sleep)
SMI_ONE = "NVIDIA GeForce RTX 4090, 24564, 20000\n"
VULKAN_SUMMARY = textwrap.dedent(
    """\
    ==========
    VULKANINFO
    ==========

    Devices:
    ========
    GPU0:
    \tapiVersion         = 1.3.255
    \tvendorID           = 0x10de
    \tdeviceType         = PHYSICAL_DEVICE_TYPE_DISCRETE_GPU
    \tdeviceName         = NVIDIA GeForce RTX 4090
    GPU1:
    \tapiVersion         = 1.3.255
    \tvendorID           = 0x10005
    \tdeviceType         = PHYSICAL_DEVICE_TYPE_CPU
    \tdeviceName         = llvmpipe (LLVM 15.0.6, 256 bits)
    """
)


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty PATH directory for fake tools; the real /proc, /sys and /dev paths hidden."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(cuda, "PROC_GPUS", tmp_path / "no-nvidia")
    monkeypatch.setattr(rocm, "KFD", tmp_path / "no-kfd")
    monkeypatch.setattr(rocm, "DRM", tmp_path / "no-drm")
    for name in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GGML_VK_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    offload._reset_warnings()
    yield bin_dir
    offload._reset_warnings()


def fake_tool(bin_dir: Path, name: str, stdout: str = "", code: int = 0, extra: str = "") -> Path:
    """An executable `name` on PATH that prints `stdout` and exits with `code`."""
    data = bin_dir / f"{name}.out"
    data.write_text(stdout)
    script = bin_dir / name
    script.write_text(f"#!/bin/sh\nPATH={SYSTEM_PATH}\n{extra}\ncat '{data}'\nexit {code}\n")
    script.chmod(0o755)
    return script


@pytest.fixture
def gpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the installed llama.cpp can offload (the PyPI source build here cannot)."""
    monkeypatch.setattr(offload, "gpu_offload_supported", lambda: True)


@pytest.fixture
def cpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin the CPU-only answer (what this machine gives for real) without importing llama_cpp."""
    monkeypatch.setattr(offload, "gpu_offload_supported", lambda: False)


# --- import hygiene and the real CPU path -------------------------------------------------------


def test_import_does_not_import_llama_cpp() -> None:
    code = "import sys, llmlb_node.offload; assert 'llama_cpp' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_real_cpu_build_cannot_offload() -> None:
    assert offload.gpu_offload_supported() is False
    assert offload.built_backends() == ()


def test_real_plan_on_this_machine_is_cpu(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="llmlb_node.offload")
    start = time.monotonic()
    plan = offload.plan_offload(500 * MIB, env={})
    assert time.monotonic() - start < 10
    assert plan.n_gpu_layers == 0
    assert plan.backend == "cpu"
    assert "offload plan: cpu" in caplog.text


def test_gpu_offload_supported_false_without_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert offload.gpu_offload_supported() is False
    assert offload.built_backends() == ()


def test_no_tools_no_devices(tools: Path) -> None:
    assert offload.detect_devices() == ()


def test_plan_str() -> None:
    assert str(OffloadPlan(-1, "cuda", "fits")) == "cuda, all layers (-1): fits"
    assert str(OffloadPlan(0, "cpu", "none")) == "cpu, no layers offloaded (0): none"
    assert str(OffloadPlan(12, "rocm", "partial")) == "rocm, 12 layers: partial"


# --- explicit value and environment --------------------------------------------------------------


def test_explicit_int_wins_over_env_and_detection(tools: Path, gpu_build: None) -> None:
    fake_tool(tools, "nvidia-smi", SMI_ONE)
    plan = offload.plan_offload(10**12, n_gpu_layers=7, env={ENV_VAR: "3"})
    assert plan.n_gpu_layers == 7
    assert plan.backend == "cuda"
    assert plan.reason == "explicit n_gpu_layers=7"


def test_explicit_numeric_string(tools: Path, gpu_build: None) -> None:
    assert offload.plan_offload(n_gpu_layers="-1", env={}).n_gpu_layers == -1
    assert offload.plan_offload(n_gpu_layers=" 5 ", env={}).n_gpu_layers == 5


def test_explicit_zero_is_cpu_without_detection(
    tools: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(env: object = None) -> tuple[GpuDevice, ...]:
        raise AssertionError("detection should be skipped")

    monkeypatch.setattr(offload, "detect_devices", boom)
    plan = offload.plan_offload(n_gpu_layers=0, env={ENV_VAR: "-1"})
    assert (plan.n_gpu_layers, plan.backend) == (0, "cpu")


def test_explicit_on_cpu_build_keeps_value_but_runs_on_cpu(tools: Path, cpu_build: None) -> None:
    plan = offload.plan_offload(n_gpu_layers=20, env={})
    assert plan.n_gpu_layers == 20
    assert plan.backend == "cpu"
    assert plan.reason.startswith("explicit n_gpu_layers=20")
    assert "cannot offload" in plan.reason


def test_env_overrides_auto(tools: Path, gpu_build: None) -> None:
    fake_tool(tools, "nvidia-smi", SMI_ONE)
    plan = offload.plan_offload(10**12, env={ENV_VAR: "12"})
    assert plan.n_gpu_layers == 12
    assert plan.backend == "cuda"
    assert ENV_VAR in plan.reason
    # None means "not given" too
    assert offload.plan_offload(n_gpu_layers=None, env={ENV_VAR: "4"}).n_gpu_layers == 4


def test_env_read_from_os_environ(tools: Path, cpu_build: None, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ENV_VAR, "9")
    assert offload.plan_offload().n_gpu_layers == 9


def test_env_auto_means_detection(tools: Path, gpu_build: None) -> None:
    fake_tool(tools, "nvidia-smi", SMI_ONE)
    plan = offload.plan_offload(MIB, env={ENV_VAR: "auto"})
    assert (plan.n_gpu_layers, plan.backend) == (-1, "cuda")


@pytest.mark.parametrize("bad", ["lots", "1.5", "all"])
def test_bad_values_raise(tools: Path, bad: str) -> None:
    with pytest.raises(ValueError, match=ENV_VAR):
        offload.plan_offload(env={ENV_VAR: bad})
    with pytest.raises(ValueError, match="n_gpu_layers"):
        offload.plan_offload(n_gpu_layers=bad, env={})


# --- CUDA and partial offload ---------------------------------------------------------------------


def test_nvidia_smi_parsed(tools: Path) -> None:
    fake_tool(tools, "nvidia-smi", SMI_ONE + "Tesla T4, [N/A], [N/A]\n")
    devices = offload.detect_devices(env={})
    assert devices == (
        GpuDevice("cuda", "NVIDIA GeForce RTX 4090", 24564 * MIB, 20000 * MIB),
        GpuDevice("cuda", "Tesla T4", None, None),
    )


def test_nvidia_smi_failure_tolerated(tools: Path) -> None:
    fake_tool(tools, "nvidia-smi", "NVIDIA-SMI has failed because it couldn't communicate", 9)
    assert offload.detect_devices(env={}) == ()


def test_proc_fallback(tools: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = tmp_path / "proc" / "0000:01:00.0"
    gpu.mkdir(parents=True)
    (gpu / "information").write_text("Model: \t\t NVIDIA A100-SXM4-40GB\nIRQ:  \t\t 42\n")
    monkeypatch.setattr(cuda, "PROC_GPUS", tmp_path / "proc")
    assert offload.detect_devices(env={}) == (GpuDevice("cuda", "NVIDIA A100-SXM4-40GB"),)


def test_cuda_visible_devices(tools: Path) -> None:
    fake_tool(tools, "nvidia-smi", "GPU A, 100, 50\nGPU B, 200, 150\n")
    assert [d.name for d in offload.detect_devices({"CUDA_VISIBLE_DEVICES": "1"})] == ["GPU B"]
    assert offload.detect_devices({"CUDA_VISIBLE_DEVICES": ""}) == ()
    assert offload.detect_devices({"CUDA_VISIBLE_DEVICES": "-1"}) == ()
    assert len(offload.detect_devices({"CUDA_VISIBLE_DEVICES": "GPU-1234-uuid"})) == 2


def test_auto_cuda_fits(tools: Path, gpu_build: None) -> None:
    fake_tool(tools, "nvidia-smi", SMI_ONE)
    plan = offload.plan_offload(8000 * MIB, env={})
    assert (plan.n_gpu_layers, plan.backend) == (-1, "cuda")
    assert plan.devices[0].name == "NVIDIA GeForce RTX 4090"
    assert "fits" in plan.reason
    assert str(plan).startswith("cuda, all layers (-1): ")


def test_auto_unknown_size_offloads_all(tools: Path, gpu_build: None) -> None:
    fake_tool(tools, "nvidia-smi", SMI_ONE)
    plan = offload.plan_offload(None, env={})
    assert plan.n_gpu_layers == -1
    assert "unknown" in plan.reason


def test_partial_offload_with_known_layers(tools: Path, gpu_build: None) -> None:
    fake_tool(tools, "nvidia-smi", SMI_ONE)  # 20000 MiB free
    plan = offload.plan_offload(40000 * MIB, n_layers=32, env={})
    assert (plan.n_gpu_layers, plan.backend) == (16, "cuda")
    assert "16 of 32 layers" in plan.reason
    plan = offload.plan_offload(30000 * MIB, n_layers=40, env={})
    assert plan.n_gpu_layers == 26  # floor(40 * 20000 / 30000) = floor(26.67)


def test_partial_offload_unknown_layers_is_conservative(tools: Path, gpu_build: None) -> None:
    fake_tool(tools, "nvidia-smi", SMI_ONE)
    plan = offload.plan_offload(40000 * MIB, env={})
    # 24 assumed layers * 90% of the free/required ratio 0.5 = 10.8 -> 10
    assert plan.n_gpu_layers == 10
    assert f"assuming {ASSUMED_LAYERS} layers" in plan.reason
    assert "n_layers" in plan.reason


def test_partial_offload_sums_free_memory_of_all_gpus(tools: Path, gpu_build: None) -> None:
    fake_tool(tools, "nvidia-smi", "GPU A, 16000, 10000\nGPU B, 16000, 10000\n")
    assert offload.plan_offload(20000 * MIB, n_layers=40, env={}).n_gpu_layers == -1
    assert offload.plan_offload(40000 * MIB, n_layers=40, env={}).n_gpu_layers == 20


def test_partial_offload_of_zero_layers_is_cpu(tools: Path, gpu_build: None) -> None:
    fake_tool(tools, "nvidia-smi", "Tiny GPU, 1024, 10\n")
    plan = offload.plan_offload(8000 * MIB, n_layers=32, env={})
    assert (plan.n_gpu_layers, plan.backend) == (0, "cpu")


def test_supported_without_visible_device_trusts_llama_cpp(tools: Path, gpu_build: None) -> None:
    plan = offload.plan_offload(MIB, env={})
    assert plan.n_gpu_layers == -1
    assert plan.backend in {"cuda", "rocm", "vulkan", "metal", "sycl"}


# --- the rebuild warning ------------------------------------------------------------------------


def test_visible_gpu_with_cpu_build_warns_once(
    tools: Path, cpu_build: None, caplog: pytest.LogCaptureFixture
) -> None:
    fake_tool(tools, "nvidia-smi", SMI_ONE)
    caplog.set_level(logging.DEBUG, logger="llmlb_node.offload")
    first = offload.plan_offload(MIB, env={})
    second = offload.plan_offload(MIB, env={})
    assert (first.n_gpu_layers, first.backend) == (0, "cpu")
    assert second == first
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "NVIDIA GeForce RTX 4090" in message
    assert "llmlb-node backend install --preset cuda" in message
    assert 'CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_BUILD_TYPE=Release"' in message
    assert "--force-reinstall --no-cache-dir" in message
    assert "llmlb-node backend install --preset cuda" in first.reason
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("offload plan: cpu" in r.getMessage() for r in debug)


def test_no_gpu_no_warning(tools: Path, cpu_build: None, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="llmlb_node.offload")
    plan = offload.plan_offload(MIB, env={})
    assert (plan.n_gpu_layers, plan.backend) == (0, "cpu")
    assert plan.reason == "no GPU detected: running on CPU"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_explicit_layers_on_cpu_build_also_warn(
    tools: Path, cpu_build: None, caplog: pytest.LogCaptureFixture
) -> None:
    fake_tool(tools, "nvidia-smi", SMI_ONE)
    offload.plan_offload(n_gpu_layers=-1, env={})
    assert "--preset cuda" in caplog.text


def test_built_backend_without_device_blames_driver(
    tools: Path, cpu_build: None, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    fake_tool(tools, "nvidia-smi", SMI_ONE)
    monkeypatch.setattr(offload, "built_backends", lambda: ("cuda",))
    plan = offload.plan_offload(MIB, env={})
    assert plan.backend == "cpu"
    assert "built in but found no usable device" in plan.reason


# --- Apple silicon ------------------------------------------------------------------------------


@pytest.fixture
def apple_silicon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metal.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(metal.platform, "machine", lambda: "arm64")


def test_apple_silicon_metal_build_offloads_all(
    tools: Path, apple_silicon: None, gpu_build: None
) -> None:
    fake_tool(tools, "sysctl", "Apple M2 Pro\n34359738368\n")
    plan = offload.plan_offload(10**12, env={})
    assert (plan.n_gpu_layers, plan.backend) == (-1, "metal")
    assert plan.devices == (GpuDevice("metal", "Apple M2 Pro GPU", 32 * 1024**3, None),)


def test_apple_silicon_without_sysctl(tools: Path, apple_silicon: None, gpu_build: None) -> None:
    plan = offload.plan_offload(MIB, env={})
    assert (plan.n_gpu_layers, plan.backend) == (-1, "metal")
    assert plan.devices[0].name == "Apple silicon GPU"


def test_apple_silicon_cpu_build_warns_metal(
    tools: Path, apple_silicon: None, cpu_build: None, caplog: pytest.LogCaptureFixture
) -> None:
    plan = offload.plan_offload(MIB, env={})
    assert (plan.n_gpu_layers, plan.backend) == (0, "cpu")
    assert "llmlb-node backend install --preset metal" in caplog.text
    assert "-DGGML_METAL=ON" in caplog.text


def test_intel_mac_is_cpu(tools: Path, monkeypatch: pytest.MonkeyPatch, cpu_build: None) -> None:
    monkeypatch.setattr(metal.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(metal.platform, "machine", lambda: "x86_64")
    assert offload.detect_devices(env={}) == ()
    assert offload.plan_offload(MIB, env={}).backend == "cpu"


# --- ROCm and Vulkan ----------------------------------------------------------------------------


def test_rocm_smi_parsed(tools: Path, gpu_build: None) -> None:
    data = {
        "card0": {
            "Card Series": "Radeon RX 7900 XTX",
            "Card model": "0x744c",
            "VRAM Total Memory (B)": str(24 * 1024**3),
            "VRAM Total Used Memory (B)": str(4 * 1024**3),
        },
        "system": {"Driver version": "6.7"},
    }
    fake_tool(tools, "rocm-smi", "WARNING: something\n" + json.dumps(data))
    devices = offload.detect_devices(env={})
    assert devices == (GpuDevice("rocm", "Radeon RX 7900 XTX", 24 * 1024**3, 20 * 1024**3),)
    plan = offload.plan_offload(40 * 1024**3, n_layers=48, env={})
    assert (plan.n_gpu_layers, plan.backend) == (24, "rocm")


def test_rocm_sysfs_fallback(tools: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    kfd = tmp_path / "kfd"
    kfd.write_text("")
    dev = tmp_path / "drm" / "card1" / "device"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x1002\n")
    (dev / "device").write_text("0x73bf\n")
    (dev / "mem_info_vram_total").write_text(f"{16 * 1024**3}\n")
    (dev / "mem_info_vram_used").write_text(f"{1024**3}\n")
    (tmp_path / "drm" / "card1-DP-1").mkdir()
    other = tmp_path / "drm" / "card0" / "device"
    other.mkdir(parents=True)
    (other / "vendor").write_text("0x8086\n")
    monkeypatch.setattr(rocm, "KFD", kfd)
    monkeypatch.setattr(rocm, "DRM", tmp_path / "drm")
    assert offload.detect_devices(env={}) == (
        GpuDevice("rocm", "AMD GPU 0x73bf", 16 * 1024**3, 15 * 1024**3),
    )
    assert offload.detect_devices({"HIP_VISIBLE_DEVICES": "-1"}) == ()


def test_vulkaninfo_skips_software_devices(tools: Path) -> None:
    fake_tool(tools, "vulkaninfo", VULKAN_SUMMARY)
    assert offload.detect_devices(env={}) == (GpuDevice("vulkan", "NVIDIA GeForce RTX 4090"),)


def test_parsers_tolerate_garbage() -> None:
    assert vulkan.parse_vulkaninfo("ERROR: [Loader Message] no ICD\n") == ()
    assert rocm.parse_rocm_smi("not json {") == ()
    assert rocm.parse_rocm_smi("[]") == ()
    assert cuda.parse_nvidia_smi("No devices were found\n") == ()


def test_vulkan_build_prefers_vulkan_and_borrows_memory(
    tools: Path, gpu_build: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_tool(tools, "vulkaninfo", VULKAN_SUMMARY)
    fake_tool(tools, "nvidia-smi", SMI_ONE)
    monkeypatch.setattr(offload, "built_backends", lambda: ("vulkan",))
    plan = offload.plan_offload(40000 * MIB, n_layers=32, env={})
    assert (plan.n_gpu_layers, plan.backend) == (16, "vulkan")
    assert "memory per cuda" in plan.reason


def test_vulkan_only_memory_unknown_offloads_all(tools: Path, gpu_build: None) -> None:
    fake_tool(tools, "vulkaninfo", VULKAN_SUMMARY)
    plan = offload.plan_offload(10**12, env={})
    assert (plan.n_gpu_layers, plan.backend) == (-1, "vulkan")
    assert "unknown" in plan.reason


def test_cpu_build_with_vulkan_gpu_suggests_vulkan_preset(
    tools: Path, cpu_build: None, caplog: pytest.LogCaptureFixture
) -> None:
    fake_tool(tools, "vulkaninfo", VULKAN_SUMMARY)
    offload.plan_offload(MIB, env={})
    assert "--preset vulkan" in caplog.text
    assert "-DGGML_VULKAN=ON" in caplog.text


# --- never hang -----------------------------------------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="shell-script fakes")
def test_hanging_tool_is_abandoned(tools: Path) -> None:
    # the tool and a grandchild holding its stdout both sleep far past the timeout
    fake_tool(tools, "nvidia-smi", SMI_ONE, extra="sleep 30 &\nsleep 30")
    start = time.monotonic()
    assert _common.run_tool(["nvidia-smi"], timeout=0.5) is None
    assert time.monotonic() - start < 5


@pytest.mark.skipif(os.name != "posix", reason="shell-script fakes")
def test_detect_devices_bounded_with_hanging_tools(tools: Path) -> None:
    for name in ("nvidia-smi", "rocm-smi", "vulkaninfo"):
        fake_tool(tools, name, "", extra="sleep 30")
    start = time.monotonic()
    assert offload.detect_devices(env={}) == ()
    assert time.monotonic() - start < _common.TOOL_TIMEOUT + 3  # tools run in parallel
