"""The blocking calls into llama.cpp that the pool runs in worker threads.

They translate llama-cpp-python's `ValueError`s about the request into our 400s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..lazy import LazyLlama
from .errors import ContextLengthExceededError, InvalidRequestError


def call(llm: LazyLlama, method: str, kwargs: dict[str, Any], model_id: str) -> Any:
    """``llm.<method>(**kwargs)`` for a whole answer (chat or text completion)."""
    check_token_ids(llm, kwargs)
    try:
        return getattr(llm, method)(model=model_id, **kwargs)
    except ValueError as exc:
        raise _request_error(exc, kwargs) from exc


def stream(llm: LazyLlama, method: str, kwargs: dict[str, Any], model_id: str) -> Iterator[Any]:
    """``llm.<method>(stream=True, **kwargs)``, chunk by chunk."""
    check_token_ids(llm, kwargs)
    try:
        yield from getattr(llm, method)(model=model_id, stream=True, **kwargs)
    except ValueError as exc:
        raise _request_error(exc, kwargs) from exc


def embed(llm: LazyLlama, kwargs: dict[str, Any], model_id: str) -> dict[str, Any]:
    """Embedding vectors (mean-pooled) for a string or a list of strings."""
    try:
        return llm.create_embedding(kwargs["input"], model=model_id)  # type: ignore[no-any-return]
    except ValueError as exc:
        raise _request_error(exc, kwargs) from exc


def check_token_ids(llm: LazyLlama, kwargs: dict[str, Any]) -> None:
    """Token ids (a prompt's, logit_bias's keys) must be in the loaded model's vocabulary: past
    it llama_decode fails (a 500) and a logit bias raises inside a sampler callback."""
    vocab = int(llm.n_vocab())
    prompt = kwargs.get("prompt")
    if isinstance(prompt, list) and any(t >= vocab for t in prompt):
        raise InvalidRequestError(
            f"'prompt' has a token id past the model's vocabulary (ids 0 to {vocab - 1})",
            "prompt",
        )
    if any(t >= vocab for t in kwargs.get("logit_bias") or {}):
        raise InvalidRequestError(
            f"'logit_bias' has a token id past the model's vocabulary (ids 0 to {vocab - 1})",
            "logit_bias",
        )


def _request_error(exc: ValueError, kwargs: dict[str, Any]) -> InvalidRequestError:
    param = next((p for p in ("messages", "prompt", "input") if p in kwargs), None)
    # llama-cpp-python has no exception class for this: its message is the only signal.
    if "context window" in str(exc):
        return ContextLengthExceededError(
            f"the prompt is longer than the model's context: {exc}. Shorten it, or start the "
            "node with a larger LLMLB_N_CTX.",
            param,
        )
    return InvalidRequestError(f"llama.cpp rejected the request: {exc}", param)
