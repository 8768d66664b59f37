"""The failures only the node has: bad requests, a full queue, a model still loading.

They join the library's tree under `LlmlbError`; `app.py` maps the whole tree to HTTP answers.
"""

from __future__ import annotations

from ..errors import LlmlbError
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
