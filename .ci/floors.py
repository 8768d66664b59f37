"""The lowest versions pyproject.toml allows: a pip constraints file, and a check of a venv.

CI installs the project with `-c` on this file into a second venv and runs the fast tests there,
so every floor we declare is a version the code was tested with (the same as uv's
`--resolution lowest-direct`: direct dependencies at their floor, the rest resolved as usual).

    python .ci/floors.py constraints [--keep NAME==VERSION ...]   pins, one a line, to stdout
    python .ci/floors.py extras                                   every extra, comma-separated
    python .ci/floors.py check [--keep NAME==VERSION ...]         the running venv has the pins

A requirement without a lower bound (`>=`, `==`, `~=`) is an error: a floor nobody declared is a
floor nobody tested. `--keep` replaces one pin. Needs Python 3.11+ (tomllib).
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")
_FLOOR = re.compile(r"(==|>=|~=)\s*([0-9][A-Za-z0-9.+!-]*)")


def normalize(name: str) -> str:
    """PEP 503 name: `Foo_Bar` and `foo-bar` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def floor_of(requirement: str) -> tuple[str, str]:
    """(normalized name, lowest allowed version) of one PEP 508 requirement string."""
    match = _REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    name, _extras, specifier, _marker = match.groups()
    bounds = _FLOOR.findall(specifier)
    if not bounds:
        raise ValueError(
            f"{requirement!r} has no lower bound: declare the oldest version that works (>=X)"
        )
    exact = [version for op, version in bounds if op == "=="]
    return normalize(name), exact[0] if exact else bounds[0][1]


def requirements(pyproject: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The project's dependencies and its optional dependencies by extra."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return list(project.get("dependencies", [])), dict(project.get("optional-dependencies", {}))


def pins(pyproject: Path, keep: list[str]) -> dict[str, str]:
    """Every direct dependency (all extras included) at its floor, `keep` overriding."""
    base, extras = requirements(pyproject)
    result: dict[str, str] = {}
    for requirement in [*base, *(r for group in extras.values() for r in group)]:
        name, version = floor_of(requirement)
        if result.setdefault(name, version) != version:
            raise ValueError(f"{name} has two floors: {result[name]} and {version}")
    for item in keep:
        name, _, version = item.partition("==")
        if normalize(name) not in result or not version:
            raise ValueError(f"--keep {item!r}: expected NAME==VERSION of a declared dependency")
        result[normalize(name)] = version
    return result


def _release(version: str) -> tuple[str, ...]:
    """`0.3` and `0.3.0` are one version (PEP 440 pads the release with zeros)."""
    parts = version.split(".")
    while len(parts) > 1 and parts[-1] == "0":
        parts.pop()
    return tuple(parts)


def check(expected: dict[str, str]) -> list[str]:
    """One line per dependency; lines starting with 'MISMATCH' where the venv differs."""
    lines = []
    for name, version in sorted(expected.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        flag = "ok" if _release(installed) == _release(version) else "MISMATCH"
        lines.append(f"{flag:8} {name:32} floor {version:12} installed {installed}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("constraints", "extras", "check"))
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    parser.add_argument("--keep", action="append", default=[], metavar="NAME==VERSION")
    args = parser.parse_args(argv)
    try:
        if args.command == "extras":
            print(",".join(sorted(requirements(args.pyproject)[1])))
            return 0
        expected = pins(args.pyproject, args.keep)
    except (ValueError, KeyError, OSError, tomllib.TOMLDecodeError) as exc:
        print(f"floors: {exc}", file=sys.stderr)
        return 2
    if args.command == "constraints":
        print("\n".join(f"{name}=={version}" for name, version in sorted(expected.items())))
        return 0
    lines = check(expected)
    print("\n".join(lines))
    return 1 if any(line.startswith("MISMATCH") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
