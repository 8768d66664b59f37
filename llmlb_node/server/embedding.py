"""Embeddings on a loaded model: strings or token ids in, unit-length mean-pooled vectors out.

An input longer than the model's context is a 400 (llama-cpp-python would cut it silently), and
so is a `dimensions` the model's vectors do not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..lazy import LazyLlama
from .errors import ContextLengthExceededError, InvalidRequestError

Input = str | list[int]


def inputs_of(value: Any) -> list[Input] | None:
    """The request's ``input`` as a list of strings or of token-id lists (a string, a list of
    strings, ``[int]`` or ``[[int]]``, as the openai client and langchain send); None if it is
    none of these."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(s, str) for s in value):
        return list(value)
    if _token_ids(value):
        return [list(value)]
    if all(isinstance(ids, list) and ids and _token_ids(ids) for ids in value):
        return [list(ids) for ids in value]
    return None


def _token_ids(values: list[Any]) -> bool:
    return all(type(v) is int and 0 <= v < 2**31 for v in values)


def embed(llm: LazyLlama, inputs: Sequence[Input], dimensions: int | None) -> dict[str, Any]:
    """OpenAI's embedding ``data`` and ``usage`` for `inputs` (blocking: a worker thread)."""
    llama = llm.llama
    _check_dimensions(llama, dimensions)
    tokens = [_tokens(llama, item, f"input[{i}]") for i, item in enumerate(inputs)]
    vectors = _embed_tokens(llm, llama, tokens)
    count = sum(len(t) for t in tokens)
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    return {"data": data, "usage": {"prompt_tokens": count, "total_tokens": count}}


def _check_dimensions(llama: Any, dimensions: int | None) -> None:
    size = int(llama.n_embd())
    if dimensions is not None and dimensions != size:
        raise InvalidRequestError(
            f"'dimensions' must be {size}, the size of this model's vectors (it cannot shorten "
            "them), or left out",
            "dimensions",
        )


def _tokens(llama: Any, item: Input, where: str) -> list[int]:
    """`item`'s token ids: a string tokenized as llama-cpp-python does, ids checked against
    the vocabulary; more than the context holds is `ContextLengthExceededError`."""
    if isinstance(item, str):
        tokens = list(llama.tokenize(item.encode("utf-8")))
    else:
        tokens, vocab = item, int(llama.n_vocab())
        if any(t >= vocab for t in tokens):
            raise InvalidRequestError(
                f"'{where}' has a token id past the model's vocabulary (ids 0 to {vocab - 1})",
                "input",
            )
    limit = min(int(llama.n_ctx()), int(llama.n_batch))
    if len(tokens) > limit:
        raise ContextLengthExceededError(
            f"'{where}' is {len(tokens)} tokens, more than the {limit} the model's embedding "
            "context holds; shorten it or split it, or start the node with a larger LLMLB_N_CTX",
            "input",
        )
    return tokens


def _embed_tokens(llm: LazyLlama, llama: Any, tokens: list[list[int]]) -> list[list[float]]:
    """``Llama.embed`` over token ids: it takes only strings, and tokenizes each input in turn
    through ``self.tokenize``, which is pointed at the ids for the call (one call at a time runs
    on this context: the pool gives it one request at a time)."""
    pending = iter(tokens)
    llama.tokenize = lambda *_args, **_kwargs: next(pending)
    try:
        return llm.embed([""] * len(tokens), normalize=True, truncate=False)  # type: ignore[no-any-return]
    finally:
        del llama.tokenize
