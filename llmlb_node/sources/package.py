"""A file assembled from chunks shipped as package data of installed Python distributions.

Serves sites whose only channel is an internal package index. The chunks are read as data through
`importlib.metadata` (the packages' code is never imported or run).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ..catalog import ModelEntry, ModelFile
from .base import Remote, Source, fail


class PythonPackageSource(Source):
    """``{"type": "python-package", "files": {filename: [{"distribution", "path"}, ...]}}``."""

    def __init__(self, files: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        self.files = files
        dists = sorted({p["distribution"] for parts in files.values() for p in parts})
        self.label = f"python-package:{dists[0]}" + ("+" if len(dists) > 1 else "")

    def locate(self, entry: ModelEntry, file: ModelFile) -> Remote:
        paths: list[Path] = []
        for part in self.files[file.filename]:
            name, rel = part["distribution"], part["path"]
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                raise fail(
                    self.label,
                    "missing",
                    f"distribution {name!r} is not installed (pip install {name})",
                ) from None
            path = Path(str(dist.locate_file(rel)))
            if not path.is_file():
                raise fail(
                    self.label, "missing", f"{rel} is not in the installed distribution {name!r}"
                )
            paths.append(path)
        size = sum(p.stat().st_size for p in paths)
        if file.size_bytes is not None and size != file.size_bytes:
            raise fail(
                self.label,
                "integrity",
                f"the parts of {file.filename} add up to {size} bytes, expected {file.size_bytes}",
            )
        return Remote(source=self.label, parts=tuple(paths), size=size, sha256=file.sha256)
