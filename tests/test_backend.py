"""Tests for llmlb_node.backend: the CMake presets and the llama-cpp-python rebuild command.

Nothing is rebuilt here (that takes minutes): only the pip call itself is faked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmlb_node import backend
from llmlb_node.backend import Preset, cmake_args, install_command, load_presets

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {"cpu", "openblas", "cuda", "metal", "vulkan", "rocm", "sycl"}


def write_presets(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "CMakePresets.json"
    path.write_text(json.dumps(data))
    return path


def test_packaged_presets_parse() -> None:
    presets = load_presets()
    assert set(presets) == EXPECTED
    assert "release" not in presets  # hidden base preset
    for preset in presets.values():
        assert isinstance(preset, Preset)
        assert preset.display_name and preset.display_name != preset.name
        assert preset.description
        assert any(key.startswith("GGML_") for key in preset.cache_variables), preset.name
        assert preset.cache_variables["CMAKE_BUILD_TYPE"] == "Release"
        assert all(" " not in value for value in preset.cache_variables.values())


def test_presets_file_is_valid_cmake_presets() -> None:
    data = json.loads(backend.PRESETS_PATH.read_text())
    assert data["version"] >= 3
    for item in data["configurePresets"]:
        assert {"name", "displayName", "description"} <= set(item)
        assert "cacheVariables" in item


def test_top_level_symlink_points_at_packaged_file() -> None:
    top = REPO / "CMakePresets.json"
    assert top.is_symlink()
    assert top.resolve() == backend.PRESETS_PATH.resolve()


@pytest.mark.skipif(
    shutil.which("cmake") is None, reason="needs cmake, which checks the presets itself"
)
def test_cmake_accepts_the_presets(tmp_path: Path) -> None:
    shutil.copy(backend.PRESETS_PATH, tmp_path / "CMakePresets.json")
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.21)\nproject(x NONE)\n"
    )
    version = subprocess.run(["cmake", "--version"], capture_output=True, text=True, check=True)
    major, minor = (int(x) for x in version.stdout.split()[2].split(".")[:2])
    if (major, minor) < (3, 21):
        pytest.skip("needs cmake 3.21 or later, the first to read presets version 3")
    listed = subprocess.run(
        ["cmake", "--list-presets"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    for name in EXPECTED:
        assert f'"{name}"' in listed.stdout


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cuda", "-DGGML_CUDA=ON -DCMAKE_BUILD_TYPE=Release"),
        ("metal", "-DGGML_METAL=ON -DCMAKE_BUILD_TYPE=Release"),
        ("vulkan", "-DGGML_VULKAN=ON -DCMAKE_BUILD_TYPE=Release"),
        ("rocm", "-DGGML_HIP=ON -DCMAKE_BUILD_TYPE=Release"),
        ("openblas", "-DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS -DCMAKE_BUILD_TYPE=Release"),
        ("cpu", "-DGGML_NATIVE=ON -DGGML_METAL=OFF -DCMAKE_BUILD_TYPE=Release"),
    ],
)
def test_cmake_args(name: str, expected: str) -> None:
    assert cmake_args(name) == expected
    assert cmake_args(load_presets()[name]) == expected


def test_sycl_uses_intel_compilers() -> None:
    args = cmake_args("sycl").split()
    assert "-DGGML_SYCL=ON" in args
    assert "-DCMAKE_C_COMPILER=icx" in args
    assert "-DCMAKE_CXX_COMPILER=icpx" in args


def test_install_command_pins_installed_version() -> None:
    command, env = install_command("cuda")
    version = backend.installed_version()
    requirement = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    assert command == [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--force-reinstall",
        "--no-deps",
        "--no-cache-dir",
        "--no-binary",
        "llama-cpp-python",
        requirement,
    ]
    assert env == {"CMAKE_ARGS": "-DGGML_CUDA=ON -DCMAKE_BUILD_TYPE=Release", "FORCE_CMAKE": "1"}


def test_install_command_given_version() -> None:
    command, env = install_command("rocm", version="0.3.16")
    assert command[-1] == "llama-cpp-python==0.3.16"
    assert env["CMAKE_ARGS"] == "-DGGML_HIP=ON -DCMAKE_BUILD_TYPE=Release"


def test_install_command_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "installed_version", lambda: None)
    command, _ = install_command("cpu")
    assert command[-1] == "llama-cpp-python"


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown backend preset 'tpu'") as info:
        install_command("tpu")
    for name in EXPECTED:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="known presets"):
        cmake_args("release")  # hidden presets are not installable
    with pytest.raises(ValueError, match="known presets"):
        backend.install_backend("tpu", dry_run=True)


def test_shell_command_and_hint() -> None:
    line = backend.shell_command("vulkan", version="0.3.16")
    assert line.startswith(
        'CMAKE_ARGS="-DGGML_VULKAN=ON -DCMAKE_BUILD_TYPE=Release" FORCE_CMAKE=1 '
    )
    assert line.endswith(
        "-m pip install --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python "
        "llama-cpp-python==0.3.16"
    )
    hint = backend.rebuild_hint("metal")
    assert "`llmlb-node backend install --preset metal`" in hint
    assert "-DGGML_METAL=ON" in hint


def test_dry_run_runs_nothing(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("dry run must not run pip")

    monkeypatch.setattr(backend.subprocess, "run", forbidden)
    caplog.set_level("INFO", logger="llmlb_node.backend")
    assert backend.install_backend("cuda", dry_run=True) == 0
    assert "-DGGML_CUDA=ON" in caplog.text
    assert "dry run" in caplog.text


def test_install_runs_pip_with_cmake_args(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], dict[str, str]]] = []

    def fake_run(command: list[str], env: dict[str, str], check: bool) -> object:
        calls.append((command, env))
        return subprocess.CompletedProcess(command, 3)

    monkeypatch.setenv("SOME_USER_VAR", "kept")
    monkeypatch.setattr(backend.subprocess, "run", fake_run)
    assert backend.install_backend("vulkan") == 3
    command, env = calls[0]
    assert command == install_command("vulkan")[0]
    assert env["CMAKE_ARGS"] == "-DGGML_VULKAN=ON -DCMAKE_BUILD_TYPE=Release"
    assert env["FORCE_CMAKE"] == "1"
    assert env["SOME_USER_VAR"] == "kept"


# --- load_presets on other files ------------------------------------------------------------------


def test_inheritance_and_value_forms(tmp_path: Path) -> None:
    path = write_presets(
        tmp_path,
        {
            "version": 6,
            "configurePresets": [
                {"name": "a", "hidden": True, "cacheVariables": {"X": "1", "Y": "2", "Z": "3"}},
                {"name": "b", "hidden": True, "cacheVariables": {"X": "b", "W": True}},
                {
                    "name": "c",
                    "inherits": ["b", "a"],
                    "displayName": "C",
                    "cacheVariables": {
                        "GGML_FOO": {"type": "BOOL", "value": "ON"},
                        "GGML_OFF": False,
                        "Z": None,
                    },
                },
                {"name": "d", "inherits": "c", "cacheVariables": {}},
            ],
        },
    )
    presets = load_presets(path)
    assert set(presets) == {"c", "d"}
    assert presets["c"].cache_variables == {
        "GGML_FOO": "ON",
        "GGML_OFF": "OFF",
        "X": "b",  # earlier parent wins
        "W": "ON",
        "Y": "2",
    }
    assert presets["d"].display_name == "C"
    assert presets["d"].cache_variables == presets["c"].cache_variables


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"configurePresets": []}, "not a CMake presets file"),
        ({"version": 2, "configurePresets": []}, "version 2"),
        ({"version": 3}, "must be a list"),
        ({"version": 3, "configurePresets": [{"name": "a", "inherits": "a"}]}, "cycle"),
        ({"version": 3, "configurePresets": [{"name": "a", "inherits": "zz"}]}, "unknown preset"),
        ({"version": 3, "configurePresets": [{"name": "a"}, {"name": "a"}]}, "duplicate"),
        (
            {"version": 3, "configurePresets": [{"name": "a", "cacheVariables": {"X": "a b"}}]},
            "without spaces",
        ),
    ],
)
def test_invalid_presets(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_presets(write_presets(tmp_path, data))


def test_unreadable_presets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read CMake presets"):
        load_presets(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="cannot read CMake presets"):
        load_presets(bad)
