"""Rebuild llama-cpp-python for a GPU backend, using the presets in CMakePresets.json.

The presets file is the single source of truth for build flags; one preset becomes pip's CMAKE_ARGS.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PRESETS_PATH = Path(__file__).with_name("CMakePresets.json")
PACKAGE = "llama-cpp-python"


@dataclass(frozen=True)
class Preset:
    """One configure preset, with inherited cache variables already merged in."""

    name: str
    display_name: str
    description: str
    cache_variables: dict[str, str] = field(default_factory=dict)


def load_presets(path: str | os.PathLike[str] | None = None) -> dict[str, Preset]:
    """Read the visible configure presets of a CMakePresets.json (default: the packaged one).

    Raises `ValueError` when the file is not a valid presets file (version 3+).
    """
    source = Path(path) if path is not None else PRESETS_PATH
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read CMake presets {source}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("version"), int):
        raise ValueError(f"{source}: not a CMake presets file (no integer 'version')")
    if data["version"] < 3:
        raise ValueError(f"{source}: presets version {data['version']} < 3 is not supported")
    raw_list = data.get("configurePresets")
    if not isinstance(raw_list, list):
        raise ValueError(f"{source}: 'configurePresets' must be a list")
    raw: dict[str, dict[str, Any]] = {}
    for item in raw_list:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"{source}: every configure preset needs a string 'name'")
        if item["name"] in raw:
            raise ValueError(f"{source}: duplicate configure preset {item['name']!r}")
        raw[item["name"]] = item

    resolved: dict[str, dict[str, Any]] = {}
    for name in raw:
        _resolve(name, raw, resolved, (), source)
    return {
        name: Preset(
            name=name,
            display_name=str(info["displayName"] or name),
            description=str(info["description"] or ""),
            cache_variables={k: v for k, v in info["cacheVariables"].items() if v is not None},
        )
        for name, info in resolved.items()
        if not raw[name].get("hidden", False)
    }


def get_preset(name: str, path: str | os.PathLike[str] | None = None) -> Preset:
    """The preset called `name`; a `ValueError` listing the known ones otherwise."""
    presets = load_presets(path)
    try:
        return presets[name]
    except KeyError:
        known = ", ".join(presets)
        raise ValueError(f"unknown backend preset {name!r}; known presets: {known}") from None


def cmake_args(preset: Preset | str) -> str:
    """The preset as CMAKE_ARGS, own flags first: ``-DGGML_CUDA=ON -DCMAKE_BUILD_TYPE=Release``."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    return " ".join(f"-D{key}={value}" for key, value in preset.cache_variables.items())


def installed_version() -> str | None:
    """The installed llama-cpp-python version, from its metadata (no import), or None."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def install_command(
    preset_name: str, version: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """The pip command that rebuilds llama-cpp-python for a preset, and the env it needs.

    The version defaults to the installed one, so a rebuild never upgrades by surprise, and
    ``--no-deps`` keeps pip from reinstalling (or upgrading) numpy and the other dependencies.
    The returned env holds only the additions (CMAKE_ARGS, FORCE_CMAKE): merge it over os.environ.
    """
    preset = get_preset(preset_name)
    version = version or installed_version()
    requirement = f"{PACKAGE}=={version}" if version else PACKAGE
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--force-reinstall",
        "--no-deps",  # rebuild llama-cpp-python alone: numpy and the rest stay as they are
        "--no-cache-dir",
        "--no-binary",
        PACKAGE,
        requirement,
    ]
    return command, {"CMAKE_ARGS": cmake_args(preset), "FORCE_CMAKE": "1"}


def shell_command(preset_name: str, version: str | None = None) -> str:
    """`install_command` as one line to paste into a shell (POSIX; PowerShell on Windows)."""
    command, env = install_command(preset_name, version)
    if os.name == "nt":
        sets = "; ".join(f'$env:{k}="{v}"' for k, v in env.items())
        return f"{sets}; {subprocess.list2cmdline(command)}"
    sets = " ".join(f'{k}="{v}"' if " " in v else f"{k}={shlex.quote(v)}" for k, v in env.items())
    return f"{sets} {shlex.join(command)}"


def rebuild_hint(preset_name: str) -> str:
    """Both ways to rebuild for a preset: the llmlb-node CLI and the raw pip command."""
    try:
        raw = shell_command(preset_name)
    except ValueError as exc:  # presets file broken: still give the CLI form
        logger.debug("no raw rebuild command for %s: %s", preset_name, exc)
        return f"`llmlb-node backend install --preset {preset_name}`"
    return f"`llmlb-node backend install --preset {preset_name}` (or: `{raw}`)"


def install_backend(preset_name: str, dry_run: bool = False) -> int:
    """Rebuild llama-cpp-python for `preset_name`; pip's output streams to this process's.

    Returns pip's exit code (0 without running anything when `dry_run`).
    """
    command, extra_env = install_command(preset_name)
    logger.info("rebuilding %s for preset %s: %s", PACKAGE, preset_name, shell_command(preset_name))
    if dry_run:
        logger.info("dry run: not running the command")
        return 0
    try:
        result = subprocess.run(command, env={**os.environ, **extra_env}, check=False)
    except OSError as exc:
        logger.error("cannot run pip: %s", exc)
        return 127
    if result.returncode != 0:
        logger.error(
            "rebuild for preset %s failed with exit code %d", preset_name, result.returncode
        )
    return result.returncode


def _resolve(
    name: str,
    raw: Mapping[str, dict[str, Any]],
    done: dict[str, dict[str, Any]],
    chain: tuple[str, ...],
    source: Path,
) -> dict[str, Any]:
    """Merge a preset with what it inherits (earlier parents win, as in CMake)."""
    if name in done:
        return done[name]
    if name in chain:
        raise ValueError(f"{source}: preset inheritance cycle {' -> '.join((*chain, name))}")
    if name not in raw:
        raise ValueError(f"{source}: preset {chain[-1]!r} inherits unknown preset {name!r}")
    item = raw[name]
    own = item.get("cacheVariables", {})
    if not isinstance(own, dict):
        raise ValueError(f"{source}: preset {name!r}: 'cacheVariables' must be an object")
    merged: dict[str, str | None] = {k: _cache_value(v, name, k, source) for k, v in own.items()}
    display, description = item.get("displayName"), item.get("description")
    parents = item.get("inherits", [])
    for parent in [parents] if isinstance(parents, str) else parents:
        info = _resolve(parent, raw, done, (*chain, name), source)
        for key, value in info["cacheVariables"].items():
            merged.setdefault(key, value)
        display = display or info["displayName"]
        description = description or info["description"]
    done[name] = {"cacheVariables": merged, "displayName": display, "description": description}
    return done[name]


def _cache_value(value: Any, preset: str, key: str, source: Path) -> str | None:
    """A cacheVariables value as CMAKE_ARGS text: strings, booleans, {type, value} or null."""
    if isinstance(value, dict):
        value = value.get("value")
    if value is None:
        return None
    if isinstance(value, bool):
        return "ON" if value else "OFF"
    text = str(value)
    if not text or any(c.isspace() for c in text):
        raise ValueError(
            f"{source}: preset {preset!r}: {key}={text!r} must be non-empty without spaces"
            " (CMAKE_ARGS is split on spaces)"
        )
    return text
