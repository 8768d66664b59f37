"""The blocking calls into llama.cpp that the pool runs in worker threads.

They translate llama-cpp-python's `ValueError`s about the request into our 400s. A stream ends
with OpenAI's usage chunk (``choices: []``, ``usage``), which the HTTP layer sends or drops.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..lazy import LazyLlama
from . import messages
from .errors import ContextLengthExceededError, InvalidRequestError
from .openai import usage_chunk


def call(llm: LazyLlama, method: str, kwargs: dict[str, Any], model_id: str) -> Any:
    """``llm.<method>(**kwargs)`` for a whole answer (chat or text completion)."""
    check_token_ids(llm, kwargs)
    kwargs = one_choice(renderable(llm, kwargs))
    try:
        return getattr(llm, method)(model=model_id, **kwargs)
    except ValueError as exc:
        raise _request_error(exc, kwargs) from exc


def stream(llm: LazyLlama, method: str, kwargs: dict[str, Any], model_id: str) -> Iterator[Any]:
    """``llm.<method>(stream=True, **kwargs)``, chunk by chunk, then the usage chunk: the
    chunk's ``id``, ``object``, ``created`` and ``model`` with ``choices: []`` and ``usage``."""
    check_token_ids(llm, kwargs)
    kwargs = one_choice(renderable(llm, kwargs))
    counts = count_tokens(llm.llama)
    last = None
    try:
        for last in getattr(llm, method)(model=model_id, stream=True, **kwargs):
            yield last
    except ValueError as exc:
        raise _request_error(exc, kwargs) from exc
    if last is not None:
        yield usage_chunk(last, counts.usage())


def one_choice(kwargs: dict[str, Any]) -> dict[str, Any]:
    """llama-cpp-python's calls make one choice: `n` > 1 needs the engine."""
    kwargs = dict(kwargs)
    if kwargs.pop("n", 1) != 1:
        raise InvalidRequestError(
            "'n' above 1 needs the engine, and this request takes the one-at-a-time path (its "
            "chat format runs its own generation, or it asks for suffix or echo)",
            "n",
        )
    return kwargs


@dataclass
class TokenCounts:
    """The tokens of one generation, counted as llama-cpp-python counts a whole answer's usage:
    the prompt's tokens, and every sampled token but the end-of-generation one."""

    prompt: int = 0
    completion: int = 0

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        }


def count_tokens(llama: Any) -> TokenCounts:
    """Counts of the next generation on `llama` (calls on one model are serialized).

    llama-cpp-python's streams carry no usage, but every completion, chat included, runs
    ``Llama.generate(prompt_tokens)`` and iterates the tokens it samples: wrapped once per model,
    it counts them."""
    counts = TokenCounts()
    if "_llmlb_counts" not in vars(llama):
        _wrap_generate(llama)
    llama._llmlb_counts = counts
    return counts


def _wrap_generate(llama: Any) -> None:
    from llama_cpp import llama_vocab_is_eog

    generate = llama.generate
    vocab = llama._model.vocab

    def counting_generate(tokens: Any, *args: Any, **kwargs: Any) -> Iterator[int]:
        counts: TokenCounts = llama._llmlb_counts
        counts.prompt, counts.completion = len(tokens), 0
        inner = generate(tokens, *args, **kwargs)
        try:
            sent = None
            while True:
                token = inner.send(sent)
                if not llama_vocab_is_eog(vocab, token):
                    counts.completion += 1
                sent = yield token
        except StopIteration:
            return
        finally:
            inner.close()

    llama.generate = counting_generate


def renderable(llm: LazyLlama, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A chat's messages as the model's chat format renders them (`messages.for_format`)."""
    if "messages" not in kwargs:
        return kwargs
    fmt = messages.ChatFormat.of(llm.llama)
    return {**kwargs, "messages": messages.for_format(kwargs["messages"], fmt)}


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
