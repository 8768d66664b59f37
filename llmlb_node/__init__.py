"""llmlb-node: resolve llama.cpp models by id (local store, Hub, llmlb proxy) and load them.

Importing this package is cheap: each name below is imported on first use (PEP 562), so
``import llmlb_node`` loads no submodule, and ``from llmlb_node import LazyLlama`` loads only what
LazyLlama's constructor needs (never llama_cpp, httpx or huggingface_hub).
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `from typing import ...`: typing alone costs more than this package

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Catalog": "catalog",
    "ModelEntry": "catalog",
    "ModelFile": "catalog",
    "load_catalog": "catalog",
    "CatalogError": "errors",
    "ConfigurationError": "errors",
    "DownloadStalledError": "errors",
    "InsufficientDiskSpaceError": "errors",
    "IntegrityError": "errors",
    "InvalidModelIdError": "errors",
    "LlamaCppNotInstalledError": "errors",
    "LlmlbError": "errors",
    "ModelBusyError": "errors",
    "ModelDownloadError": "errors",
    "ModelLoadError": "errors",
    "ModelNotInstalledError": "errors",
    "SourceFailure": "errors",
    "UnrunnableModelError": "errors",
    "UnsupportedModelError": "errors",
    "LazyLlama": "lazy",
    "ProgressEvent": "progress",
    "ModelInfo": "resolver",
    "ModelResolver": "resolver",
    "ModelStatus": "status",
    "ResolvedModel": "resolver",
    "Settings": "settings",
}

__all__ = [  # noqa: PLE0604 - the names are provided by __getattr__
    "Catalog",
    "CatalogError",
    "ConfigurationError",
    "DownloadStalledError",
    "InsufficientDiskSpaceError",
    "IntegrityError",
    "InvalidModelIdError",
    "LazyLlama",
    "LlamaCppNotInstalledError",
    "LlmlbError",
    "ModelBusyError",
    "ModelDownloadError",
    "ModelEntry",
    "ModelFile",
    "ModelInfo",
    "ModelLoadError",
    "ModelNotInstalledError",
    "ModelResolver",
    "ModelStatus",
    "ProgressEvent",
    "ResolvedModel",
    "Settings",
    "SourceFailure",
    "UnrunnableModelError",
    "UnsupportedModelError",
    "__version__",
    "load_catalog",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmlb_node' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain global
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from .catalog import Catalog, ModelEntry, ModelFile, load_catalog
    from .errors import (
        CatalogError,
        ConfigurationError,
        DownloadStalledError,
        InsufficientDiskSpaceError,
        IntegrityError,
        InvalidModelIdError,
        LlamaCppNotInstalledError,
        LlmlbError,
        ModelBusyError,
        ModelDownloadError,
        ModelLoadError,
        ModelNotInstalledError,
        SourceFailure,
        UnrunnableModelError,
        UnsupportedModelError,
    )
    from .lazy import LazyLlama
    from .progress import ProgressEvent
    from .resolver import ModelInfo, ModelResolver, ResolvedModel
    from .settings import Settings
    from .status import ModelStatus
