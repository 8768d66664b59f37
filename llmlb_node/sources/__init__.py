"""Where bytes come from: one module per source behind the one-method `Source` interface.

`build_sources(entry, settings)` turns a catalog entry's ``sources`` into `Source` objects.
"""

from __future__ import annotations

from ..catalog import ModelEntry
from ..settings import Settings
from .base import Remote, Source, check_origin, origin_allowed
from .huggingface import HuggingFaceSource
from .package import PythonPackageSource
from .proxy import ProxySource
from .url import UrlSource

__all__ = [
    "HuggingFaceSource",
    "ProxySource",
    "PythonPackageSource",
    "Remote",
    "Source",
    "UrlSource",
    "build_sources",
    "check_origin",
    "origin_allowed",
]


def build_sources(entry: ModelEntry, settings: Settings) -> list[Source]:
    """The entry's external sources in catalog order, then the llmlb proxy."""
    sources: list[Source] = []
    for spec in entry.sources:
        opts = spec.options
        if spec.type == "huggingface":
            sources.append(
                HuggingFaceSource(
                    settings, opts.get("repo") or entry.repo, opts.get("revision") or entry.revision
                )
            )
        elif spec.type == "url":
            sources.append(UrlSource(settings, url=opts.get("url"), urls=opts.get("urls")))
        elif spec.type == "python-package":
            sources.append(PythonPackageSource(opts["files"]))
    sources.append(ProxySource(settings))
    return sources
