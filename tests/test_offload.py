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


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Gemma 3 270M GGUF, assembled once from the installed demo packages."""
    from llmlb_node import ModelResolver, Settings
    from llmlb_node.catalog import PACKAGED_CATALOG

    home = tmp_path_factory.mktemp("gemma")
    settings = Settings.from_env(
        env={"LLMLB_HOME": str(home), "HF_HUB_OFFLINE": "1"}, catalog_path=PACKAGED_CATALOG
    )
    with ModelResolver(settings) as resolver:
        return resolver.resolve("gemma-3-270m").path


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
    # A UUID nvidia-smi did not report names no device: never "all GPUs".
    assert offload.detect_devices({"CUDA_VISIBLE_DEVICES": "GPU-1234-uuid"}) == ()


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
    fake_tool(tools, "nvidia-smi", SMI_ONE)  # 20000 MiB free, 95% of it usable: 19000
    plan = offload.plan_offload(40000 * MIB, n_layers=32, env={})
    assert (plan.n_gpu_layers, plan.backend) == (15, "cuda")
    assert "15 of 32 layers" in plan.reason
    plan = offload.plan_offload(30000 * MIB, n_layers=40, env={})
    assert plan.n_gpu_layers == 25  # floor(40 * 19000 / 30000) = floor(25.3)


def test_without_a_layer_count_the_plan_goes_by_bytes(tools: Path, gpu_build: None) -> None:
    fake_tool(tools, "nvidia-smi", SMI_ONE)
    assert offload.plan_offload(18000 * MIB, env={}).n_gpu_layers == -1  # fits
    plan = offload.plan_offload(40000 * MIB, env={})  # does not fit: no guessed split
    assert (plan.n_gpu_layers, plan.backend) == (0, "cpu")
    assert "cannot be split" in plan.reason


def test_partial_offload_sums_free_memory_of_all_gpus(tools: Path, gpu_build: None) -> None:
    fake_tool(tools, "nvidia-smi", "GPU A, 16000, 10000\nGPU B, 16000, 10000\n")
    assert offload.plan_offload(18000 * MIB, n_layers=40, env={}).n_gpu_layers == -1
    assert offload.plan_offload(40000 * MIB, n_layers=40, env={}).n_gpu_layers == 19


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
    assert "--force-reinstall --no-deps --no-cache-dir" in message
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
    plan = offload.plan_offload(10 * 1024**3, env={})
    assert (plan.n_gpu_layers, plan.backend) == (-1, "metal")
    # Free is Metal's recommended working set: two thirds of 32 GiB.
    assert plan.devices == (
        GpuDevice("metal", "Apple M2 Pro GPU", 32 * 1024**3, 32 * 1024**3 * 2 // 3),
    )


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
    assert (plan.n_gpu_layers, plan.backend) == (22, "rocm")  # 48 * 95% of 20 GiB / 40 GiB


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
    assert (plan.n_gpu_layers, plan.backend) == (15, "vulkan")
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


@pytest.mark.skipif(
    os.name != "posix", reason="the fake GPU tools are shell scripts: needs a POSIX system"
)
def test_hanging_tool_is_abandoned(tools: Path) -> None:
    # the tool and a grandchild holding its stdout both sleep far past the timeout
    fake_tool(tools, "nvidia-smi", SMI_ONE, extra="sleep 30 &\nsleep 30")
    start = time.monotonic()
    assert _common.run_tool(["nvidia-smi"], timeout=0.5) is None
    assert time.monotonic() - start < 15  # not the 30 s: room for a loaded machine


@pytest.mark.skipif(
    os.name != "posix", reason="the fake GPU tools are shell scripts: needs a POSIX system"
)
def test_detect_devices_bounded_with_hanging_tools(tools: Path) -> None:
    names = ("nvidia-smi", "rocm-smi", "vulkaninfo")
    # Each tool marks that it started, and notes when it sees all three marks while it runs. Run
    # one after another, only the last could (each is killed at its timeout before the next).
    saw_all = " && ".join(f"[ -e '{tools}/{n}.started' ]" for n in names)
    for name in names:
        wait = f"while ! {{ {saw_all}; }}; do sleep 0.01; done; touch '{tools}/{name}.saw-all'"
        fake_tool(tools, name, "", extra=f"touch '{tools}/{name}.started'\n{wait}\nsleep 30")
    start = time.monotonic()
    assert offload.detect_devices(env={}) == ()
    # Bounded (each tool would sleep 30 s), with room for a loaded machine.
    assert time.monotonic() - start < _common.TOOL_TIMEOUT + 10
    saw = [n for n in names if (tools / f"{n}.saw-all").exists()]
    assert len(saw) >= 2, f"tools ran one at a time: only {saw} saw the others"


# --- recorded tool outputs the plan must not misread --------------------------------------------

H100_UUIDS = [f"GPU-{i}a1b2c3d-0000-1111-2222-33334444555{i}" for i in range(8)]
SMI_8X_H100 = "".join(
    f"{i}, {uuid}, NVIDIA H100 80GB HBM3, 81559, 81000\n" for i, uuid in enumerate(H100_UUIDS)
)
SMI_LIST_MIG = textwrap.dedent(
    """\
    GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-e91edf3b-b297-37c1-a2a7-7601c98f1ac3)
      MIG 3g.20gb     Device  0: (UUID: MIG-2d5b5bd3-3d5b-5a4f-9e84-5e8fd4bbd3e5)
      MIG 1g.5gb      Device  1: (UUID: MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f)
    """
)
SMI_A100 = "0, GPU-e91edf3b-b297-37c1-a2a7-7601c98f1ac3, NVIDIA A100-SXM4-40GB, 40960, 40000\n"


def fake_nvidia_smi(bin_dir: Path, query: str, listing: str = "") -> Path:
    """nvidia-smi answering the query and `-L` with recorded outputs, counting its runs."""
    (bin_dir / "query.out").write_text(query)
    (bin_dir / "list.out").write_text(listing)
    script = bin_dir / "nvidia-smi"
    script.write_text(
        f"#!/bin/sh\nPATH={SYSTEM_PATH}\necho run >> '{bin_dir}/nvidia-smi.runs'\n"
        f'if [ "$1" = "-L" ]; then cat \'{bin_dir}/list.out\'; '
        f"else cat '{bin_dir}/query.out'; fi\n"
    )
    script.chmod(0o755)
    return script


def test_cuda_visible_devices_by_gpu_uuid(tools: Path, gpu_build: None) -> None:
    fake_nvidia_smi(tools, SMI_8X_H100)
    env = {"CUDA_VISIBLE_DEVICES": H100_UUIDS[3]}
    devices = offload.detect_devices(env)
    assert [d.uuid for d in devices] == [H100_UUIDS[3]]
    plan = offload.plan_offload(150 * 10**9, n_layers=80, env=env)  # 150 GB on one 80 GB GPU
    assert plan.n_gpu_layers == 43 and "79.1 GiB free" in plan.reason  # 80 * 95% * 79.1 / 139.7
    # A unique prefix works as it does for the CUDA runtime; order and index mixes too.
    env = {"CUDA_VISIBLE_DEVICES": f"{H100_UUIDS[5][:12]},2"}
    assert [d.uuid for d in offload.detect_devices(env)] == [H100_UUIDS[5], H100_UUIDS[2]]


def test_mig_slice_counts_with_its_own_memory(tools: Path, gpu_build: None) -> None:
    fake_nvidia_smi(tools, SMI_A100, SMI_LIST_MIG)
    env = {"CUDA_VISIBLE_DEVICES": "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f"}
    (device,) = offload.detect_devices(env)
    assert (device.name, device.total_memory) == ("MIG 1g.5gb", 5 * 10**9)
    plan = offload.plan_offload(8 * 10**9, n_layers=32, env=env)
    assert plan.n_gpu_layers == 19  # 32 * 95% of 5 GB / 8 GB, not the whole A100's 40 GB
    assert offload.detect_devices({"CUDA_VISIBLE_DEVICES": "MIG-ffff"}) == ()


def test_nvidia_smi_placeholders_and_a_gpu_needing_reset(tools: Path) -> None:
    fake_nvidia_smi(
        tools,
        "0, GPU-aaaa, [N/A], 24564, 20000\n"
        "1, GPU-bbbb, NVIDIA A100, [GPU requires reset], [GPU requires reset]\n"
        "[GPU requires reset]\n"
        "3, GPU-dddd, NVIDIA L4, 23034, 22000\n",
    )
    devices = offload.detect_devices(env={})
    assert [(d.name, d.free_memory) for d in devices] == [
        ("NVIDIA GPU 0", 20000 * MIB),
        ("NVIDIA L4", 22000 * MIB),
    ]
    assert offload.detect_devices({"CUDA_VISIBLE_DEVICES": "1"}) == ()  # the broken one
    assert [d.name for d in offload.detect_devices({"CUDA_VISIBLE_DEVICES": "3"})] == ["NVIDIA L4"]


def test_rocm_smi_json_followed_by_trailing_text(tools: Path) -> None:
    data = {"card0": {"Card Series": "N/A", "Card SKU": "MI210", "VRAM Total Memory (B)": "100"}}
    text = "WARNING: x\n" + json.dumps(data) + "\n===== End of ROCm SMI Log =====\n"
    fake_tool(tools, "rocm-smi", text)
    assert offload.detect_devices(env={}) == (GpuDevice("rocm", "MI210", 100, None),)


def test_metal_plans_partial_offload_above_the_working_set(
    tools: Path, apple_silicon: None, gpu_build: None
) -> None:
    fake_tool(tools, "sysctl", "Apple M2\n17179869184\n")  # 16 GiB: 10.7 GiB working set
    plan = offload.plan_offload(14 * 1024**3, n_layers=40, env={})
    assert (plan.n_gpu_layers, plan.backend) == (28, "metal")  # 40 * 95% * 10.7 / 14
    assert "recommended working set" in plan.reason
    fake_tool(tools, "sysctl", "Apple M2\n17179869184\n14336\n")  # iogpu.wired_limit_mb set
    assert offload.plan_offload(12 * 1024**3, n_layers=40, env={}).n_gpu_layers == -1
    assert metal.working_set(128 * 1024**3) == 96 * 1024**3


def test_plan_for_model_reads_the_header_and_counts_the_kv_cache(
    tools: Path, gpu_build: None, gemma: Path
) -> None:
    from llmlb_node.gguf import read_header

    estimate = offload.estimate_memory(read_header(gemma), 2048)
    assert estimate is not None and estimate.n_layers == 18
    # llama.cpp 0.3.36 logs for n_ctx=2048: KV 36.00 MiB (f16), compute buffer 514.50 MiB.
    assert estimate.kv_cache_bytes == 36 * MIB
    assert abs(estimate.compute_bytes - 514.5 * MIB) < 0.01 * 514.5 * MIB
    assert offload.estimate_memory(read_header(gemma), 8192).kv_cache_bytes == 144 * MIB
    q8 = offload.estimate_memory(read_header(gemma), 2048, type_k=8, type_v=8)
    assert q8 is not None and q8.kv_cache_bytes == 36 * MIB * 34 // 64

    free = estimate.gpu_bytes(9) + 1  # room for exactly 9 layers at 95%
    fake_nvidia_smi(tools, f"0, GPU-x, Small GPU, 4096, {int(free / 0.95 / MIB) + 1}\n")
    plan = offload.plan_for_model(gemma, n_ctx=2048, env={})
    assert plan.n_gpu_layers == 9 and plan.estimate == estimate
    assert "9 of 18 layers" in plan.reason
    bigger = offload.plan_for_model(gemma, n_ctx=32768, env={})  # the KV cache grows
    assert bigger.n_gpu_layers < 9


def test_plan_without_a_readable_header_goes_by_bytes(
    tools: Path, gpu_build: None, tmp_path: Path
) -> None:
    fake_tool(tools, "nvidia-smi", "0, GPU-x, GPU, 4096, 1000\n")
    junk = tmp_path / "x.gguf"
    junk.write_bytes(b"not a gguf" * 1000)
    plan = offload.plan_for_model(junk, required_memory_bytes=2000 * MIB, env={})
    assert (plan.n_gpu_layers, plan.estimate) == (0, None)
    assert offload.plan_for_model(junk, env={}).n_gpu_layers == -1  # 10 KB fits


def test_cpu_only_plan_never_reads_the_header(tmp_path: Path, cpu_build: None, tools: Path) -> None:
    missing = tmp_path / "never-opened.gguf"
    plan = offload.plan_for_model(missing, n_ctx=512, env={})
    assert (plan.n_gpu_layers, plan.estimate) == (0, None)
