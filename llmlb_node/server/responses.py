"""OpenAI's Responses API (``POST /v1/responses``) over the chat completion the node already runs.

A request becomes a chat request (`instructions` the system turn, `input` the turns), generated
through the same seam as ``/v1/chat/completions``; its answer and stream events take the
Responses shape the official openai client parses. Nothing is stored.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import openai
from .errors import InvalidRequestError

# Parameters OpenAI defines that this node accepts only at the value that asks for nothing it
# lacks (no storage, no tools, no reasoning): name -> (accepted values, why another is refused).
_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "store": ((False,), "this node keeps no responses: send store false"),
    "background": ((False,), "this node runs no background responses"),
    "previous_response_id": ((), "this node keeps no responses: send the whole conversation"),
    "conversation": ((), "this node keeps no conversations: send the whole conversation"),
    "prompt": ((), "this node has no stored prompts"),
    "reasoning": (({},), "this node's models do not reason"),
    "include": (([],), "this node has no extra output to include"),
    "tools": (([],), "tools are not served on /v1/responses: use /v1/chat/completions"),
    "tool_choice": (("none", "auto"), "this node serves no tools on /v1/responses"),
    "truncation": (("disabled",), "the input is never truncated: a prompt too long is a 400"),
    "top_logprobs": ((0,), "log probabilities are not served on /v1/responses"),
}
# Parameters that change nothing here but are reported back in the Response object.
_ECHOED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "true or false"),
    "user": (lambda v: isinstance(v, str), "a string"),
    "metadata": (
        lambda v: (
            isinstance(v, dict)
            and len(v) <= 16
            and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())
        ),
        "an object of at most 16 string values",
    ),
}
_OWN = ("model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream")
_KNOWN = frozenset({*_ONLY, *_ECHOED, *_OWN, "text", "keep_alive"})
# A chat parameter's error, told in this API's names.
_CHAT_NAMES = {"max_tokens": "max_output_tokens", "response_format": "text", "messages": "input"}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text")


@dataclass
class ResponseRequest:
    """A validated ``/v1/responses`` request: the chat request it runs as, and how it answers."""

    chat: openai.ParsedRequest
    echo: dict[str, Any]
    """The Response object's fields taken from the request (instructions, temperature, ...)."""
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))

    def whole(self, result: dict[str, Any]) -> dict[str, Any]:
        """The Response object of a chat completion."""
        choice = result["choices"][0]
        text = choice["message"].get("content") or ""
        return self.response(choice.get("finish_reason"), text, result.get("usage"))

    def events(self, items: AsyncIterator[Any]) -> AsyncIterator[str]:
        """The stream's events, OpenAI's sequence (see `_Events`)."""
        return _Events(self).run(items)

    def response(
        self, finish: str | None, text: str | None, usage: Mapping[str, int] | None
    ) -> dict[str, Any]:
        """The Response object: in progress (`text` None), completed, or incomplete when the
        answer hit max_output_tokens."""
        status = "in_progress" if text is None else _status(finish)
        output = [] if text is None else [self.message(text, status)]
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": None if text is None else int(time.time()),
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "model": self.chat.model,
            "output": output,
            "usage": None if usage is None else _usage(usage),
            **self.echo,
        }

    def message(self, text: str, status: str) -> dict[str, Any]:
        content = [_text_part(text)] if status != "in_progress" else []
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }


class _Events:
    """response.created, response.in_progress, response.output_item.added,
    response.content_part.added, response.output_text.delta ..., response.output_text.done,
    response.content_part.done, response.output_item.done, then response.completed (or
    response.incomplete at max_output_tokens); a failure: error, then response.failed."""

    def __init__(self, asked: ResponseRequest) -> None:
        self.asked = asked
        self.numbers: Iterator[int] = itertools.count()
        self.text: list[str] = []
        self.started = False
        self.finish: str | None = None
        self.usage: dict[str, int] | None = None

    def event(self, type_: str, **fields: Any) -> str:
        body = {"type": type_, "sequence_number": next(self.numbers), **fields}
        return openai.sse(body, event=type_)

    async def run(self, items: AsyncIterator[Any]) -> AsyncIterator[str]:
        begun = self.asked.response(None, None, None)
        yield self.event("response.created", response=begun)
        yield self.event("response.in_progress", response=begun)
        async for item in items:
            if isinstance(item, str):
                yield openai.sse_comment(item)
            elif isinstance(item, openai.StreamError):
                for event in self.failed(item.body["error"]):
                    yield event
                return
            else:
                for event in self.chunk(item):
                    yield event
        for event in self.done():
            yield event

    def chunk(self, chunk: dict[str, Any]) -> Iterator[str]:
        if openai.is_usage_chunk(chunk):
            self.usage = chunk["usage"]
            return
        yield from self.start()
        choice = chunk["choices"][0]
        self.finish = choice.get("finish_reason") or self.finish
        delta = (choice.get("delta") or {}).get("content")
        if delta:
            self.text.append(delta)
            yield self.event("response.output_text.delta", **self.where(), delta=delta, logprobs=[])

    def start(self) -> Iterator[str]:
        if self.started:
            return
        self.started = True
        item = self.asked.message("", "in_progress")
        yield self.event("response.output_item.added", output_index=0, item=item)
        yield self.event("response.content_part.added", **self.where(), part=_text_part(""))

    def done(self) -> Iterator[str]:
        yield from self.start()
        text = "".join(self.text)
        final = self.asked.response(self.finish, text, self.usage)
        yield self.event("response.output_text.done", **self.where(), text=text, logprobs=[])
        yield self.event("response.content_part.done", **self.where(), part=_text_part(text))
        yield self.event("response.output_item.done", output_index=0, item=final["output"][0])
        name = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        yield self.event(name, response=final)

    def failed(self, error: Mapping[str, Any]) -> Iterator[str]:
        code, message = error.get("code") or error.get("type"), error["message"]
        yield self.event("error", code=code, message=message, param=error.get("param"))
        response = self.asked.response(None, None, None)
        response.update(status="failed", error={"code": code, "message": message})
        yield self.event("response.failed", response=response)

    def where(self) -> dict[str, Any]:
        return {"item_id": self.asked.message_id, "output_index": 0, "content_index": 0}


def parse(body: Mapping[str, Any]) -> ResponseRequest:
    """Validate a ``POST /v1/responses`` body (400 naming the parameter) into a chat request."""
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise InvalidRequestError(f"unknown parameter: '{unknown[0]}'", unknown[0])
    for name, (accepted, why) in _ONLY.items():
        value = body.get(name)
        if value is not None and not any(type(value) is type(a) and value == a for a in accepted):
            raise InvalidRequestError(f"'{name}' {value!r} is not supported: {why}", name)
    for name, (check, expected) in _ECHOED.items():
        if body.get(name) is not None and not check(body[name]):
            raise InvalidRequestError(f"'{name}' must be {expected}", name)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequestError("'instructions' must be a string", "instructions")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + (
        _messages(body.get("input"))
    )
    chat = _as_chat(body, messages)
    return ResponseRequest(chat, _echo(body, chat))


def _as_chat(body: Mapping[str, Any], messages: list[dict[str, Any]]) -> openai.ParsedRequest:
    """The chat request, checked by the chat route's own validation. OpenAI's defaults
    (temperature 1, top_p 1) are sent, as the Response object reports them."""
    chat_body = {
        "model": body.get("model"),
        "messages": messages,
        "stream": body.get("stream"),
        "max_tokens": body.get("max_output_tokens"),
        "temperature": 1.0 if body.get("temperature") is None else body["temperature"],
        "top_p": 1.0 if body.get("top_p") is None else body["top_p"],
        "response_format": _response_format(body.get("text")),
        "keep_alive": body.get("keep_alive"),
    }
    try:
        return openai.parse_chat(chat_body)
    except InvalidRequestError as exc:
        param = _CHAT_NAMES.get(exc.param or "", exc.param)
        message = str(exc).replace(f"'{exc.param}'", f"'{param}'")
        raise InvalidRequestError(message, param) from None


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise InvalidRequestError("missing required parameter: 'input'", "input")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(
            "'input' must be a string or a non-empty list of message items", "input"
        )
    return [_message(item, f"input[{i}]") for i, item in enumerate(value)]


def _message(item: Any, where: str) -> dict[str, Any]:
    """One input item: ``{role, content}`` with a string or input_text/output_text parts."""
    if not isinstance(item, dict):
        raise InvalidRequestError(f"'{where}' must be a message item {{role, content}}", where)
    if item.get("type", "message") != "message":
        raise InvalidRequestError(
            f"'{where}.type' {item['type']!r} is not served: input items are messages",
            f"{where}.type",
        )
    role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise InvalidRequestError(
            f"'{where}.role' must be one of {', '.join(sorted(_ROLES))}", f"{where}.role"
        )
    return {"role": role, "content": _content(item.get("content"), f"{where}.content")}


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"'{where}' must be a string or a list of text parts", where)
    for j, part in enumerate(content):
        ok = isinstance(part, dict) and part.get("type") in _TEXT_PARTS
        if not (ok and isinstance(part.get("text"), str)):
            raise InvalidRequestError(
                f"'{where}[{j}]' must be {{type: input_text, text: string}}: this node serves "
                "text models",
                f"{where}[{j}]",
            )
    return "\n".join(part["text"] for part in content)


def _response_format(text: Any) -> dict[str, Any] | None:
    """``text.format`` as the chat route's ``response_format``."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) and set(text) <= {"format"} else None
    if not isinstance(fmt, dict):
        raise InvalidRequestError("'text' must be {format: {type: text|json_object|...}}", "text")
    if fmt.get("type") != "json_schema":
        return {"type": fmt.get("type")}
    if not isinstance(fmt.get("schema"), dict):
        where = "text.format.schema"
        raise InvalidRequestError(f"'{where}' must be a JSON schema (an object)", where)
    # llama-cpp-python builds a grammar from a json_object's schema (it ignores json_schema's).
    return {"type": "json_object", "schema": fmt["schema"]}


def _echo(body: Mapping[str, Any], chat: openai.ParsedRequest) -> dict[str, Any]:
    def given(name: str, default: Any) -> Any:
        return default if body.get(name) is None else body[name]

    return {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": chat.kwargs["temperature"],
        "top_p": chat.kwargs["top_p"],
        "text": given("text", {"format": {"type": "text"}}),
        "tool_choice": given("tool_choice", "auto"),
        "tools": [],
        "parallel_tool_calls": given("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "background": False,
        "truncation": "disabled",
        "user": body.get("user"),
        "metadata": given("metadata", {}),
    }


def _status(finish: str | None) -> str:
    return "incomplete" if finish == "length" else "completed"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(usage: Mapping[str, int]) -> dict[str, Any]:
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }
