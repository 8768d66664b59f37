"""Tests for .ci/floors.py: the lowest allowed versions that CI installs and tests against.

The script runs as CI runs it, in a subprocess, on real pyproject files.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = REPO / ".ci" / "floors.py"


def floors(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(FLOORS), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_pyproject(tmp_path: Path, dependencies: str, extras: str = "") -> Path:
    path = tmp_path / "pyproject.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [project]
            name = "x"
            version = "1"
            dependencies = [{dependencies}]

            [project.optional-dependencies]
            {extras}
            """
        )
    )
    return path


def test_every_declared_dependency_of_the_project_has_a_floor() -> None:
    done = floors("constraints")

    assert done.returncode == 0, done.stderr
    pins = dict(line.split("==") for line in done.stdout.splitlines())
    for name in ("llama-cpp-python", "huggingface-hub", "httpx", "tqdm", "filelock", "pytest"):
        assert name in pins, name


def test_constraints_pin_each_requirement_at_its_floor_with_all_extras(tmp_path: Path) -> None:
    pyproject = write_pyproject(
        tmp_path,
        '"Foo_Bar>=1.2", "baz[socks]>=0.27,<1", "qux~=2.1", "plain==3.0.1; python_version>\'3\'"',
        'dev = ["pytest>=8.0.0"]\ndemo = ["blob==1.0.0"]',
    )

    done = floors("constraints", "--pyproject", pyproject)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "baz==0.27",
        "blob==1.0.0",
        "foo-bar==1.2",
        "plain==3.0.1",
        "pytest==8.0.0",
        "qux==2.1",
    ]
    assert floors("extras", "--pyproject", pyproject).stdout.strip() == "demo,dev"


def test_keep_replaces_one_pin_and_only_a_declared_one(tmp_path: Path) -> None:
    pyproject = write_pyproject(tmp_path, '"llama-cpp-python>=0.3.8", "httpx>=0.27"')

    kept = floors("constraints", "--pyproject", pyproject, "--keep", "llama_cpp_python==0.3.36")
    unknown = floors("constraints", "--pyproject", pyproject, "--keep", "numpy==2.0")

    assert kept.stdout.split() == ["httpx==0.27", "llama-cpp-python==0.3.36"]
    assert unknown.returncode == 2
    assert "numpy==2.0" in unknown.stderr and not unknown.stdout


def test_a_requirement_without_a_floor_is_an_error(tmp_path: Path) -> None:
    pyproject = write_pyproject(tmp_path, '"httpx>=0.27"', 'server = ["starlette", "uvicorn<1"]')

    done = floors("constraints", "--pyproject", pyproject)

    assert done.returncode == 2 and not done.stdout
    assert "'starlette' has no lower bound" in done.stderr


def test_check_compares_the_running_environment_with_the_floors(tmp_path: Path) -> None:
    installed = pytest.__version__
    pyproject = write_pyproject(
        tmp_path, f'"pytest>={installed}"', 'dev = ["not-a-real-package-llmlb>=1"]'
    )

    done = floors("check", "--pyproject", pyproject)
    other = floors("check", "--pyproject", pyproject, "--keep", "pytest==0.1")

    assert done.returncode == 1  # the missing package
    lines = done.stdout.splitlines()
    assert any(line.startswith("ok ") and "pytest" in line for line in lines)
    assert any(line.startswith("MISMATCH") and "not installed" in line for line in lines)
    assert any(
        line.startswith("MISMATCH") and "pytest" in line for line in other.stdout.splitlines()
    )
