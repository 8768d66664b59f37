"""llmlb-node: resolve llama.cpp models by id (local store, Hub, llmlb proxy) and load them.

Importing this package is cheap: it does not import llama_cpp, httpx or huggingface_hub.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .catalog import Catalog, ModelEntry, ModelFile, load_catalog  # noqa: E402
from .errors import (  # noqa: E402
    CatalogError,
    DownloadStalledError,
    InsufficientDiskSpaceError,
    IntegrityError,
    InvalidModelIdError,
    LlmlbError,
    ModelBusyError,
    ModelDownloadError,
    ModelLoadError,
    ModelNotInstalledError,
    SourceFailure,
    UnrunnableModelError,
    UnsupportedModelError,
)
from .lazy import LazyLlama  # noqa: E402
from .progress import ProgressEvent  # noqa: E402
from .resolver import ModelResolver, ModelStatus, ResolvedModel  # noqa: E402
from .settings import Settings  # noqa: E402

__all__ = [
    "Catalog",
    "CatalogError",
    "DownloadStalledError",
    "InsufficientDiskSpaceError",
    "IntegrityError",
    "InvalidModelIdError",
    "LazyLlama",
    "LlmlbError",
    "ModelBusyError",
    "ModelDownloadError",
    "ModelEntry",
    "ModelFile",
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
