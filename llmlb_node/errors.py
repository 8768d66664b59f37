"""The exception tree: one small class per failure a caller can act on.

Everything the library raises on purpose derives from `LlmlbError`, so one `except` catches it all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .redact import redact
from .units import human_bytes

if TYPE_CHECKING:
    from pathlib import Path


class LlmlbError(Exception):
    """Base class of every error llmlb-node raises on purpose."""

    def __str__(self) -> str:
        return redact(super().__str__())  # a message may quote what a server sent back


class CatalogError(LlmlbError):
    """The supported-models catalog is unreadable or invalid (names file, entry and field)."""


class ConfigurationError(LlmlbError, ValueError):
    """An environment variable (``LLMLB_*``, ``HF_ENDPOINT``) has a value that cannot work; the
    message names the variable and what it expects. Raised when settings are read."""


class UnsupportedModelError(LlmlbError, LookupError):
    """The model id is not in the catalog (and not installed by hand)."""

    def __init__(self, model_id: str, catalog_path: str, suggestions: Sequence[str] = ()) -> None:
        self.model_id = model_id
        self.catalog_path = catalog_path
        self.suggestions = tuple(suggestions)
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        super().__init__(
            f"model {model_id!r} is not supported: it is not defined in {catalog_path}.{hint}"
            " Run `llmlb-node models` to list supported ids."
        )


class UnrunnableModelError(UnsupportedModelError):
    """The catalog defines the model, but not as a GGUF for llama.cpp (e.g. safetensors for
    another engine): this node cannot run it, so nothing is downloaded."""

    def __init__(self, model_id: str, catalog_path: str, model_format: str, engine: str) -> None:
        self.model_id = model_id
        self.catalog_path = catalog_path
        self.suggestions = ()
        self.format = model_format
        self.engine = engine
        LlmlbError.__init__(
            self,
            f"model {model_id!r} cannot run on this node: {catalog_path} lists it as format "
            f"{model_format!r} for engine {engine!r}, and this node runs GGUF models with "
            "llama.cpp (format 'gguf', engine 'llama_cpp'). Nothing was downloaded.",
        )


class InvalidModelIdError(UnsupportedModelError, ValueError):
    """The model id is not a valid id at all (path separators, '..', empty)."""

    def __init__(self, model_id: str, catalog_path: str = "") -> None:
        self.model_id = model_id
        self.catalog_path = catalog_path
        self.suggestions = ()
        LlmlbError.__init__(
            self,
            f"invalid model id {model_id!r}: ids match [A-Za-z0-9][A-Za-z0-9._-]* "
            "(at most 128 characters)",
        )


class ModelNotInstalledError(LlmlbError, LookupError):
    """The model is not in the local store (raised where the network may not be used)."""


class ModelBusyError(LlmlbError):
    """The model is in use and cannot be removed now: another process or thread downloads it
    (`rm`), or the node has requests in flight on it or is loading it."""


class InsufficientDiskSpaceError(LlmlbError, OSError):
    """The store's filesystem has less free space than the download still needs."""

    def __init__(self, path: Path | str, needed: int, free: int) -> None:
        self.path = str(path)
        self.needed = needed
        self.free = free
        LlmlbError.__init__(
            self,
            f"not enough disk space in {self.path}: need {human_bytes(needed)}, "
            f"{human_bytes(free)} free. Free some space or point LLMLB_MODELS_DIR elsewhere.",
        )


class IntegrityError(LlmlbError):
    """Downloaded bytes failed verification (size, sha256 or GGUF magic); nothing was installed."""


class DownloadStalledError(LlmlbError, TimeoutError):
    """No byte arrived for LLMLB_STALL_TIMEOUT seconds, too many times in a row."""

    def __init__(self, source: str, url: str, offset: int, stalls: int, window: float) -> None:
        self.source = source
        self.offset = offset
        super().__init__(
            f"{source}: download stalled {stalls} times at byte {offset} "
            f"(no data for {window:g}s each time) from {url}"
        )


NOT_TRIED = frozenset({"skipped", "offline", "blocked", "missing"})
"""Failure kinds of a source that was not asked for any byte."""


@dataclass(frozen=True)
class SourceFailure:
    """Why one source could not deliver a model: what was tried and what went wrong."""

    source: str
    """The source's label, e.g. ``huggingface:org/repo`` or ``llmlb-proxy``."""
    kind: str
    """One of: skipped, offline, blocked, refused, dns, timeout, stalled, unauthorized,
    forbidden, not_found, http, network, integrity, disk, missing."""
    message: str
    """A one-line human explanation, with the advice when there is one."""
    url: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", redact(self.message))
        if self.url is not None:
            object.__setattr__(self, "url", redact(self.url))

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


class SourceError(LlmlbError):
    """One source failed to deliver; carries a `SourceFailure`. The resolver moves on."""

    def __init__(self, failure: SourceFailure) -> None:
        self.failure = failure
        super().__init__(str(failure))


class ModelDownloadError(LlmlbError):
    """Every source failed or was skipped; `.failures` says why, source by source."""

    def __init__(self, model_id: str, failures: Sequence[SourceFailure]) -> None:
        self.model_id = model_id
        self.failures = tuple(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures) or "  - no source is configured"
        super().__init__(f"could not download model {model_id!r}; every source failed:\n{lines}")

    @property
    def integrity(self) -> bool:
        """True when every source that was tried sent bytes that failed verification (sources
        not tried at all, such as a proxy that is not configured, do not count). The CLI exits
        5 then, as for `IntegrityError`; otherwise 4."""
        tried = [f for f in self.failures if f.kind not in NOT_TRIED]
        return bool(tried) and all(f.kind == "integrity" for f in tried)


class ModelLoadError(LlmlbError):
    """llama.cpp could not load the resolved file with the chosen offload plan."""


class LlamaCppNotInstalledError(ModelLoadError, ImportError):
    """llama-cpp-python cannot be imported; the message gives the command that installs it."""


class HubReferenceError(UnsupportedModelError):
    """A Hub reference (``hf:ORG/REPO[:QUANT|/FILE.gguf][@REVISION]``) that names no model this
    node can install: references are off (``LLMLB_ALLOW_HF``), the repository does not exist, it
    holds no GGUF, or no file of the asked quantization. Nothing was downloaded."""

    def __init__(self, reference: str, message: str) -> None:
        self.model_id = reference
        self.reference = reference
        self.catalog_path = ""
        self.suggestions = ()
        LlmlbError.__init__(self, message)


class HubReferencesDisabledError(HubReferenceError):
    """A Hub reference was given but ``LLMLB_ALLOW_HF`` is not set: only catalog ids resolve."""


class HubRepoNotFoundError(HubReferenceError):
    """The Hub has no repository (or revision) of that name that this token can see."""


class NoGGUFError(HubReferenceError):
    """The repository holds no GGUF file (``files`` lists what it holds)."""

    def __init__(self, reference: str, message: str, files: Sequence[str]) -> None:
        super().__init__(reference, message)
        self.files = tuple(files)


class QuantNotFoundError(HubReferenceError):
    """The repository holds GGUFs, but none of the asked quantization (``quants`` lists those
    it has)."""

    def __init__(self, reference: str, message: str, quants: Sequence[str]) -> None:
        super().__init__(reference, message)
        self.quants = tuple(quants)


class HubAccessError(ModelDownloadError):
    """The Hub refused to list a referenced repository: gated (accept its terms and set
    ``HF_TOKEN``) or the token is not valid. Its one failure says which."""


class UnsupportedArchitectureError(UnsupportedModelError):
    """The GGUF's ``general.architecture`` is one the installed llama.cpp does not know: refused
    from the file's header, before its weights are downloaded."""

    def __init__(self, model_id: str, architecture: str, llama_cpp_version: str) -> None:
        self.model_id = model_id
        self.catalog_path = ""
        self.suggestions = ()
        self.architecture = architecture
        self.llama_cpp_version = llama_cpp_version
        LlmlbError.__init__(
            self,
            f"model {model_id!r} cannot run on this node: its architecture {architecture!r} is "
            f"not one that llama-cpp-python {llama_cpp_version} knows; nothing but its header "
            "was downloaded. A newer llama-cpp-python may support it.",
        )


class PromptTooLongError(LlmlbError, ValueError):
    """The prompt needs more tokens than one sequence of the engine's context holds."""

    def __init__(self, message: str, prompt_tokens: int, n_ctx: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx
        super().__init__(message)


class GenerationError(LlmlbError):
    """llama.cpp failed to evaluate a batch: the sequences in it ended without their answer."""
