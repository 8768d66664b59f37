"""The failures only the node has (bad requests, a full queue, a model still loading), and the
table that turns the whole tree, the library's and these, into OpenAI error answers.

They join the library's tree under `LlmlbError`; `app.py`'s one handler answers with `ERRORS`.
"""

from __future__ import annotations

from ..errors import (
    CatalogError,
    InsufficientDiskSpaceError,
    IntegrityError,
    LlmlbError,
    ModelDownloadError,
    ModelLoadError,
    UnsupportedArchitectureError,
    UnsupportedModelError,
)
from ..errors import ModelBusyError as ModelBusyError  # the library's, raised here too


class InvalidRequestError(LlmlbError, ValueError):
    """The request body is malformed or a parameter has the wrong type or value."""

    def __init__(self, message: str, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


class ContextLengthExceededError(InvalidRequestError):
    """The prompt alone needs more tokens than the model's context holds."""


class RequestTooLargeError(InvalidRequestError):
    """The request body is larger than MAX_BODY_BYTES."""


class UnauthorizedError(LlmlbError):
    """LLMLB_NODE_API_KEY is set and the request's bearer token is missing or different."""


class ServerBusyError(LlmlbError):
    """LLMLB_MAX_QUEUE requests already wait for this model."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class ModelLoadingError(LlmlbError):
    """The model is still downloading or loading after LLMLB_LOAD_WAIT; retry later."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class GenerationCancelledError(LlmlbError):
    """The client went away; its generation stopped before the next token."""


class ShuttingDownError(LlmlbError):
    """The node is shutting down: new requests are refused, unfinished ones end with this."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class DownloadInterrupted(BaseException):  # noqa: N818 - a stop signal, like KeyboardInterrupt
    """Raised in a download's progress callback to stop it at shutdown, partial kept.

    Not an `Exception`, so that nothing on the way catches it as a failure: the resolver
    records the download as interrupted, as it does for Ctrl-C.
    """


class InsufficientMemoryError(LlmlbError):
    """The model cannot fit in LLMLB_MEMORY_BUDGET even with every other model unloaded."""

    def __init__(self, message: str, needed: int, budget: int) -> None:
        self.needed = needed
        self.budget = budget
        super().__init__(message)


# Our exception tree -> (HTTP status, OpenAI error type, code). The most specific class wins.
ERRORS: dict[type[BaseException], tuple[int, str, str | None]] = {
    UnsupportedModelError: (404, "invalid_request_error", "model_not_found"),
    UnsupportedArchitectureError: (400, "invalid_request_error", "unsupported_architecture"),
    ContextLengthExceededError: (400, "invalid_request_error", "context_length_exceeded"),
    RequestTooLargeError: (413, "invalid_request_error", "request_too_large"),
    InvalidRequestError: (400, "invalid_request_error", None),
    UnauthorizedError: (401, "invalid_request_error", "invalid_api_key"),
    ServerBusyError: (429, "server_error", "server_busy"),
    ModelBusyError: (409, "invalid_request_error", "model_in_use"),
    ShuttingDownError: (503, "server_error", "shutting_down"),
    ModelDownloadError: (502, "server_error", "download_failed"),
    IntegrityError: (502, "server_error", "download_failed"),
    InsufficientDiskSpaceError: (507, "server_error", "insufficient_storage"),
    InsufficientMemoryError: (507, "server_error", "insufficient_memory"),
    ModelLoadError: (500, "server_error", "model_load_failed"),
    ModelLoadingError: (503, "server_error", "model_loading"),
    GenerationCancelledError: (499, "server_error", "client_closed_request"),
    CatalogError: (500, "server_error", "catalog_error"),
    LlmlbError: (500, "server_error", "internal_error"),
}


def classify(exc: BaseException) -> tuple[int, str, str | None]:
    """(HTTP status, OpenAI error type, code) for `exc`: its most specific class in `ERRORS`."""
    found = (ERRORS[c] for c in type(exc).__mro__ if c in ERRORS)
    return next(found, (500, "server_error", None))
