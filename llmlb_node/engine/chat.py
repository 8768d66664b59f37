"""Chat messages to a prompt for the engine: the model's chat format (the catalog's, or the GGUF's
own Jinja template, as llama-cpp-python chose it at load) renders them, with its stop strings.

llama-cpp-python keeps no public "render only" call: its formatter handlers render, tokenize and
then call ``create_completion``. We call the handler on a stand-in whose ``create_completion``
captures the prompt and the stop strings instead of generating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: its tokens and the chat format's own stop strings."""

    tokens: list[int]
    stop: list[str]


def render(
    llama: Any, messages: list[dict[str, Any]], tools: list[Any] | None = None
) -> ChatPrompt:
    """The prompt `llama`'s chat format makes of `messages`; `NotImplementedError` when that format
    is a handler with a generation loop of its own (function-calling formats, vision handlers):
    such requests cannot go through the engine."""
    handler = _handler(llama)
    if not _renders_only(handler):
        raise NotImplementedError(f"chat format {llama.chat_format!r} runs its own generation")
    try:
        handler(llama=_Capture(llama), messages=messages, tools=tools, stop=[])
    except _Captured as captured:
        stop = captured.kwargs.get("stop") or []
        stops = [stop] if isinstance(stop, str) else list(stop)
        return ChatPrompt(list(captured.kwargs["prompt"]), stops)
    raise RuntimeError("the chat handler returned without asking for a completion")


def available(llama: Any) -> bool:
    """True when `llama`'s chat requests can go through the engine."""
    return _renders_only(_handler(llama))


def _handler(llama: Any) -> Any:
    """The handler ``Llama.create_chat_completion`` would use (the same lookup, in its order)."""
    from llama_cpp import llama_chat_format

    return (
        llama.chat_handler
        or llama._chat_handlers.get(llama.chat_format)
        or llama_chat_format.get_chat_completion_handler(llama.chat_format)
    )


def _renders_only(handler: Any) -> bool:
    # Formatters (named formats and Jinja templates alike) become handlers through this one
    # function; anything else (functionary, llava, ...) drives the model itself.
    return getattr(handler, "__qualname__", "").startswith(
        "chat_formatter_to_chat_completion_handler."
    )


class _Captured(Exception):  # noqa: N818 - a signal carrying the call, not an error
    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs


class _Capture:
    """The loaded Llama, except that asking it for a completion hands the arguments back."""

    verbose = False

    def __init__(self, llama: Any) -> None:
        self._llama = llama

    def create_completion(self, **kwargs: Any) -> Any:
        raise _Captured(kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llama, name)
