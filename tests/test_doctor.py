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
