"""Tests for llmlb_node.doctor: the report runs for real here, and without llama_cpp at all.

The GPU cases fake only the nvidia-smi tool; everything else is this machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llmlb_node import backend, offload
from llmlb_node.doctor import doctor_report, format_report
from llmlb_node.offload import cuda, rocm

MIB = 1024 * 1024


@pytest.fixture
def no_gpu_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Only fake tools on PATH; the real driver files hidden."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(cuda, "PROC_GPUS", tmp_path / "no-nvidia")
    monkeypatch.setattr(rocm, "KFD", tmp_path / "no-kfd")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(offload.ENV_VAR, raising=False)
    offload._reset_warnings()
    yield bin_dir
    offload._reset_warnings()


def check_lines(text: str) -> dict[str, str]:
    lines = text.splitlines()
    assert lines
    for line in lines:
        key, sep, value = line.partition(": ")
        assert sep and key and value, line
    return {line.partition(": ")[0]: line.partition(": ")[2] for line in lines}


def test_real_report(monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp  # a hard dependency of llmlb-node

    monkeypatch.delenv(offload.ENV_VAR, raising=False)
    report = doctor_report(required_memory_bytes=300 * MIB)
    json.dumps(report)  # JSON-ready
    assert set(report) >= {"platform", "cpu", "memory", "llama_cpp", "gpus", "plan"}
    assert report["platform"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report["cpu"]["model"]
    assert report["cpu"]["cores"] >= 1
    llama = report["llama_cpp"]
    assert llama["version"] == backend.installed_version()
    assert llama["version"] == llama_cpp.__version__
    assert llama["importable"] is True
    assert "CPU" in llama["system_info"]
    assert llama["supports_gpu_offload"] is False  # the PyPI source build is CPU-only
    assert report["gpus"] == []
    plan = report["plan"]
    assert plan["backend"] == "cpu"
    assert plan["n_gpu_layers"] == 0
    assert plan["summary"].startswith("cpu, no layers offloaded (0): ")
    assert plan["required_memory_bytes"] == 300 * MIB

    fields = check_lines(format_report(report))
    assert fields["llama-cpp-python"] == llama["version"]
    assert fields["gpu offload"] == "no"
    assert fields["gpus"] == "none detected"
    assert fields["plan"] == plan["summary"]
    assert fields["backend"] == "cpu"
    # The text and the JSON list the same backends (every build has the CPU one).
    assert llama["backends"] == ["cpu"]
    assert fields["llama.cpp backends"] == ", ".join(llama["backends"])


def test_report_without_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import now raises ImportError
    monkeypatch.delenv(offload.ENV_VAR, raising=False)
    report = doctor_report()
    llama = report["llama_cpp"]
    assert llama["importable"] is False
    assert "ModuleNotFoundError" in llama["error"]  # an ImportError subclass
    assert llama["system_info"] is None
    assert llama["supports_gpu_offload"] is False
    assert (report["plan"]["n_gpu_layers"], report["plan"]["backend"]) == (0, "cpu")
    fields = check_lines(format_report(report))
    assert fields["gpu offload"] == "no"
    if llama["version"] is not None:  # installed, just not importable
        assert fields["llama-cpp-python"].endswith("(not importable: " + llama["error"] + ")")


def test_report_gpu_visible_but_cpu_build(
    no_gpu_tools: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    smi = no_gpu_tools / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA L4, 23034, 22000'\n")
    smi.chmod(0o755)
    report = doctor_report(required_memory_bytes=4000 * MIB)
    assert report["gpus"] == [
        {
            "backend": "cuda",
            "name": "NVIDIA L4",
            "total_memory": 23034 * MIB,
            "free_memory": 22000 * MIB,
            "uuid": None,
        }
    ]
    assert report["plan"]["backend"] == "cpu"
    assert "--preset cuda" in report["plan"]["reason"]
    fields = check_lines(format_report(report))
    assert fields["gpu 0"].startswith("cuda: NVIDIA L4, 22.5 GiB total")
    assert "llmlb-node backend install --preset cuda" in fields["plan"]


def test_report_gpu_build_plans_offload(
    no_gpu_tools: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offload, "gpu_offload_supported", lambda: True)
    smi = no_gpu_tools / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA L4, 23034, 22000'\n")
    smi.chmod(0o755)
    report = doctor_report(required_memory_bytes=4000 * MIB)
    assert report["plan"]["n_gpu_layers"] == -1
    assert report["plan"]["backend"] == "cuda"
    assert report["plan"]["devices"] == ["NVIDIA L4"]


def test_report_for_catalog_model(
    tmp_path: Path, no_gpu_tools: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = tmp_path / "models.json"
    entry = {
        "id": "tiny-model",
        "name": "Tiny",
        "repo": "org/tiny",
        "recommended_filename": "tiny.gguf",
        "size_bytes": 100 * MIB,
        "required_memory_bytes": 150 * MIB,
    }
    catalog.write_text(json.dumps([entry]))
    monkeypatch.setenv("LLMLB_SUPPORTED_MODELS", str(catalog))
    report = doctor_report(model_id="tiny-model")
    assert report["model"]["required_memory_bytes"] == 150 * MIB
    assert report["plan"]["required_memory_bytes"] == 150 * MIB
    assert check_lines(format_report(report))["model"].startswith("tiny-model, needs 150.0 MiB")

    missing = doctor_report(model_id="no-such-model")
    assert "not supported" in missing["model"]["error"]
    assert check_lines(format_report(missing))["model"].startswith("no-such-model: ")


def test_bad_env_value_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(offload.ENV_VAR, "many")
    report = doctor_report()
    assert "LLMLB_N_GPU_LAYERS" in report["plan"]["error"]
    assert check_lines(format_report(report))["plan"].startswith("error: ")


def _counting_tool(bin_dir: Path, name: str, stdout: str) -> Path:
    """A fake GPU tool printing a recorded output and counting its runs."""
    (bin_dir / f"{name}.out").write_text(stdout)
    tool = bin_dir / name
    tool.write_text(
        f"#!/bin/sh\necho run >> '{bin_dir}/{name}.runs'\n/bin/cat '{bin_dir}/{name}.out'\n"
    )
    tool.chmod(0o755)
    return bin_dir / f"{name}.runs"


def test_doctor_runs_each_gpu_tool_once(
    no_gpu_tools: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offload, "gpu_offload_supported", lambda: True)
    runs = [
        _counting_tool(no_gpu_tools, "nvidia-smi", "0, GPU-a, NVIDIA L4, 23034, 22000\n"),
        _counting_tool(no_gpu_tools, "rocm-smi", "{}"),
        _counting_tool(no_gpu_tools, "vulkaninfo", ""),
    ]
    report = doctor_report(required_memory_bytes=4000 * MIB)
    assert report["plan"]["backend"] == "cuda"
    assert [r.read_text().count("run") for r in runs] == [1, 1, 1]


def test_doctor_and_lazyllama_make_the_same_plan(
    tmp_path: Path, no_gpu_tools: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmlb_node import LazyLlama, ModelResolver
    from llmlb_node.gguf import read_header

    monkeypatch.setenv("LLMLB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("LLMLB_MODELS_DIR", "LLMLB_SUPPORTED_MODELS"):
        monkeypatch.delenv(name, raising=False)
    with ModelResolver() as resolver:
        path = resolver.resolve("gemma-3-270m").path  # from the installed demo packages
    estimate = offload.estimate_memory(read_header(path), 1024)
    assert estimate is not None
    free_mib = int(estimate.gpu_bytes(12) / 0.95 / MIB) + 1  # room for 12 of the 18 layers
    _counting_tool(no_gpu_tools, "nvidia-smi", f"0, GPU-a, Small GPU, 8192, {free_mib}\n")
    monkeypatch.setattr(offload, "gpu_offload_supported", lambda: True)

    report = doctor_report(model_id="gemma-3-270m", n_ctx=1024)
    with LazyLlama("gemma-3-270m", n_ctx=1024, verbose=False) as llm:
        llm.load()  # this CPU build of llama.cpp ignores the layers it is given
        assert llm.offload is not None
        assert report["plan"]["n_gpu_layers"] == llm.offload.n_gpu_layers == 12
        assert report["plan"]["reason"] == llm.offload.reason
    assert report["plan"]["estimate"]["n_layers"] == 18
    assert report["plan"]["estimate"]["kv_cache_bytes"] == estimate.kv_cache_bytes
    assert "KV cache" in check_lines(format_report(report))["memory estimate"]


def test_doctor_shows_the_resident_estimate_serve_budgets_with(
    tmp_path: Path, no_gpu_tools: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmlb_node import ModelResolver
    from llmlb_node.gguf import read_header
    from llmlb_node.offload.memory import resident_bytes

    monkeypatch.setenv("LLMLB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("LLMLB_MODELS_DIR", "LLMLB_SUPPORTED_MODELS"):
        monkeypatch.delenv(name, raising=False)
    with ModelResolver() as resolver:
        path = resolver.resolve("gemma-3-270m").path  # from the installed demo packages

    report = doctor_report(model_id="gemma-3-270m", n_ctx=4096)

    assert report["plan"]["resident_bytes"] == resident_bytes(read_header(path), 4096)
    line = check_lines(format_report(report))["resident estimate"]
    assert "for n_ctx=4096" in line and "LLMLB_MEMORY_BUDGET" in line
