"""OpenAI's wire format: request validation (400 naming the parameter) and response shapes.

Validators turn a JSON body into the keyword arguments of llama-cpp-python's calls; nothing here
touches a model.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.requests import ClientDisconnect, Request

from . import embedding
from .errors import GenerationCancelledError, InvalidRequestError, RequestTooLargeError
from .settings import parse_duration

Check = Callable[[Any], bool]


def _number(low: float, high: float) -> Check:
    def check(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high

    return check


def _integer(low: int, high: int = 2**31 - 1) -> Check:
    def check(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    return check


def _is(*types: type) -> Check:
    def check(v: Any) -> bool:
        return isinstance(v, types) and not (isinstance(v, bool) and bool not in types)

    return check


def _stop(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))


def _response_format(v: Any) -> bool:
    if not isinstance(v, dict) or v.get("type") not in ("text", "json_object", "json_schema"):
        return False
    # llama.cpp compiles a json_object's schema into a grammar; json_schema's is OpenAI's shape.
    schema_ok = isinstance(v.get("schema", {}), dict)
    if v["type"] == "json_schema":
        inner = v.get("json_schema")
        schema_ok = isinstance(inner, dict) and isinstance(inner.get("schema", {}), dict)
    return schema_ok


def _logit_bias(v: Any) -> bool:
    # Keys index llama.cpp's logits: a negative one would wrap around, a huge one overflow.
    return isinstance(v, dict) and all(_token_id(k) and _number(-100, 100)(b) for k, b in v.items())


def _token_id(key: str) -> bool:
    return key.isascii() and key.isdigit() and int(key) < 2**31


def _exactly_one(v: Any) -> bool:
    return type(v) is int and v == 1


def _stream_options(v: Any) -> bool:
    return isinstance(v, dict) and _is(bool)(v.get("include_usage", False))


def _tools(v: Any) -> bool:
    return isinstance(v, list) and all(_tool(t) for t in v)


def _tool(t: Any) -> bool:
    function = t.get("function") if isinstance(t, dict) else None
    return (
        isinstance(function, dict)
        and t.get("type") == "function"
        and _name(function.get("name"))
        and isinstance(function.get("parameters", {}), dict)
        and isinstance(function.get("description", ""), str)
    )


def _name(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def _tool_choice(v: Any) -> bool:
    if isinstance(v, str):
        return v in ("none", "auto", "required")
    function = v.get("function") if isinstance(v, dict) else None
    return isinstance(function, dict) and _name(function.get("name"))


# name -> (check, what the value must be). Values of None mean "not given", as in OpenAI's API.
SAMPLING: dict[str, tuple[Check, str]] = {
    "temperature": (_number(0, 2), "a number between 0 and 2"),
    "top_p": (_number(0, 1), "a number between 0 and 1"),
    "top_k": (_integer(0), "a whole number >= 0"),
    "min_p": (_number(0, 1), "a number between 0 and 1"),
    "typical_p": (_number(0, 1), "a number between 0 and 1"),
    "repeat_penalty": (_number(0, 10), "a number between 0 and 10"),
    "presence_penalty": (_number(-2, 2), "a number between -2 and 2"),
    "frequency_penalty": (_number(-2, 2), "a number between -2 and 2"),
    "max_tokens": (_integer(1), "a whole number >= 1"),
    "stop": (_stop, "a string or a list of strings"),
    "seed": (_integer(-(2**63), 2**63 - 1), "a whole number that fits in 64 bits"),
    "logit_bias": (_logit_bias, "an object mapping token ids to numbers between -100 and 100"),
    "stream": (_is(bool), "true or false"),
    "n": (_integer(1, 64), "a whole number between 1 and 64 (at most LLMLB_PARALLEL)"),
    "user": (_is(str), "a string"),
}
CHAT: dict[str, tuple[Check, str]] = {
    **SAMPLING,
    "max_completion_tokens": (_integer(1), "a whole number >= 1"),
    "response_format": (
        _response_format,
        "an object with type text, json_object or json_schema (any schema an object)",
    ),
    "tools": (
        _tools,
        "a list of {type: function, function: {name, parameters: object, description}}",
    ),
    "tool_choice": (
        _tool_choice,
        "none, auto, required or {type: function, function: {name}}",
    ),
    "logprobs": (_is(bool), "true or false"),
    "top_logprobs": (_integer(0, 20), "a whole number between 0 and 20"),
    "stream_options": (_stream_options, "an object whose include_usage is true or false"),
}
COMPLETION: dict[str, tuple[Check, str]] = {
    **SAMPLING,
    "suffix": (_is(str), "a string"),
    "echo": (_is(bool), "true or false"),
    "logprobs": (_integer(0, 20), "a whole number between 0 and 20"),
    "best_of": (_exactly_one, "1 (this node makes one choice)"),
    "stream_options": (_stream_options, "an object whose include_usage is true or false"),
}
# Parameters we accept but do not pass to llama.cpp.
_NOT_PASSED = {"stream", "user", "stream_options", "max_completion_tokens", "best_of"}
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request: which model, how to wait for it, and what to pass to llama.cpp."""

    model: str
    stream: bool = False
    keep_alive: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    encoding_format: str = "float"
    include_usage: bool = False
    """``stream_options.include_usage``: the stream ends with a usage chunk."""


MAX_BODY_BYTES = 16 << 20
"""The largest request body read (a 128k-token prompt is well under 1 MiB): 413 past it."""


async def read_json(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object: read at most MAX_BODY_BYTES of it (413 past them),
    499 if the client leaves before it is whole, 400 if it is not a JSON object."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _too_large()
            chunks.append(chunk)
    except ClientDisconnect:
        raise GenerationCancelledError("client closed the connection before the body") from None
    return parse_json(b"".join(chunks))


def _too_large() -> RequestTooLargeError:
    return RequestTooLargeError(f"the request body is larger than {MAX_BODY_BYTES} bytes")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # [[[[...]]]] deeper than Python's parser goes
        raise InvalidRequestError("the request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return body


def parse_chat(body: Mapping[str, Any]) -> ParsedRequest:
    """Validate a chat completion request (``POST /v1/chat/completions``)."""
    messages = _required(body, "messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty list of messages", "messages")
    for i, message in enumerate(messages):
        _check_message(message, f"messages[{i}]")
    kwargs = _sampling(body, CHAT)
    choice = kwargs.get("tool_choice")
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if not any(t["function"]["name"] == name for t in kwargs.get("tools") or []):
            raise InvalidRequestError(
                f"'tool_choice' names {name!r}, which is not in 'tools'", "tool_choice"
            )
    if "max_tokens" not in kwargs and body.get("max_completion_tokens") is not None:
        kwargs["max_tokens"] = body["max_completion_tokens"]
    return _parsed(body, {"messages": messages, **kwargs})


def parse_completion(body: Mapping[str, Any]) -> ParsedRequest:
    """Validate a text completion request (``POST /v1/completions``)."""
    prompt = _required(body, "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    tokens = isinstance(prompt, list) and prompt and all(_integer(0)(t) for t in prompt)
    if not isinstance(prompt, str) and not tokens:
        raise InvalidRequestError(
            "'prompt' must be a string, a list of one string, or a list of token ids", "prompt"
        )
    return _parsed(body, {"prompt": prompt, **_sampling(body, COMPLETION)})


def parse_embedding(body: Mapping[str, Any]) -> ParsedRequest:
    """Validate an embeddings request (``POST /v1/embeddings``)."""
    inputs = embedding.inputs_of(_required(body, "input"))
    if inputs is None:
        raise InvalidRequestError(
            "'input' must be a string, a non-empty list of strings, a list of token ids or a "
            "list of non-empty lists of token ids",
            "input",
        )
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequestError(
            "'encoding_format' must be 'float' or 'base64'", "encoding_format"
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and not _integer(1)(dimensions):
        raise InvalidRequestError(
            f"'dimensions' must be a whole number >= 1, not {dimensions!r}", "dimensions"
        )
    parsed = _parsed(body, {"input": inputs, "dimensions": dimensions})
    return replace(parsed, stream=False, encoding_format=encoding)


def _parsed(body: Mapping[str, Any], kwargs: dict[str, Any]) -> ParsedRequest:
    model = _required(body, "model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' must be a non-empty string", "model")
    keep_alive = body.get("keep_alive")
    if keep_alive is not None:
        try:
            keep_alive = parse_duration(keep_alive)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), "keep_alive") from None
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    if options is not None and not stream:  # as OpenAI answers it
        raise InvalidRequestError(
            "'stream_options' is only allowed when 'stream' is true", "stream_options"
        )
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return ParsedRequest(model, stream, keep_alive, kwargs, include_usage=include_usage)


def _required(body: Mapping[str, Any], name: str) -> Any:
    if body.get(name) is None:
        raise InvalidRequestError(f"missing required parameter: '{name}'", name)
    return body[name]


def _sampling(body: Mapping[str, Any], table: Mapping[str, tuple[Check, str]]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for name, (check, expected) in table.items():
        value = body.get(name)
        if value is None:
            continue
        if not check(value):
            raise InvalidRequestError(f"'{name}' must be {expected}, not {value!r}", name)
        if name not in _NOT_PASSED:
            kwargs[name] = value
    if "logit_bias" in kwargs:
        kwargs["logit_bias"] = {int(k): float(v) for k, v in kwargs["logit_bias"].items()}
    return kwargs


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise InvalidRequestError(f"'{where}' must be an object with 'role' and 'content'", where)
    if message.get("role") not in _ROLES:
        raise InvalidRequestError(
            f"'{where}.role' must be one of {', '.join(sorted(_ROLES))}", f"{where}.role"
        )
    content = message.get("content")
    if content is None:
        # Only an assistant turn that calls tools may come without content.
        if message["role"] != "assistant" or not (
            message.get("tool_calls") or message.get("function_call")
        ):
            raise InvalidRequestError(f"'{where}.content' is required", f"{where}.content")
    elif isinstance(content, list):
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise InvalidRequestError(
                    f"'{where}.content[{j}]' must be a text part ({{type: text, text}}): this "
                    "node serves text models",
                    f"{where}.content[{j}]",
                )
            if not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"'{where}.content[{j}].text' must be a string", f"{where}.content[{j}].text"
                )
    elif not isinstance(content, str):
        raise InvalidRequestError(
            f"'{where}.content' must be a string or a list of text parts", f"{where}.content"
        )
    calls = message.get("tool_calls")
    if calls is not None and not (isinstance(calls, list) and all(_tool_call(c) for c in calls)):
        raise InvalidRequestError(
            f"'{where}.tool_calls' must be a list of {{id, type: function, function: "
            "{name, arguments: string}}",
            f"{where}.tool_calls",
        )


def _tool_call(call: Any) -> bool:
    function = call.get("function") if isinstance(call, dict) else None
    return (
        isinstance(function, dict)
        and _name(function.get("name"))
        and isinstance(function.get("arguments", ""), str)
    )


# -- responses ---------------------------------------------------------------------------------
def error_body(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape, which the openai client turns into the matching exception."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event carrying `data` as JSON (or ``[DONE]``), named `event` if given."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    name = f"event: {event}\n" if event else ""
    return f"{name}data: {payload}\n\n"


def usage_chunk(last: Mapping[str, Any], usage: dict[str, int]) -> dict[str, Any]:
    """OpenAI's final chunk under ``stream_options.include_usage``: the stream's ``id``,
    ``object``, ``created`` and ``model``, ``choices: []`` and the usage."""
    head = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
    return {**head, "choices": [], "usage": usage}


def is_usage_chunk(chunk: Mapping[str, Any]) -> bool:
    return chunk.get("choices") == [] and "usage" in chunk


@dataclass(frozen=True)
class StreamError:
    """A failure after a stream's status line was sent: its OpenAI error body."""

    body: dict[str, Any]


class ChunkStream:
    """Chat and text completions as OpenAI streams them: ``data:`` chunks, then ``[DONE]``."""

    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage

    def whole(self, result: dict[str, Any]) -> dict[str, Any]:
        return result

    async def events(self, items: AsyncIterator[Any]) -> AsyncIterator[str]:
        """SSE text of a generation's items (see `app._generated`)."""
        async for item in items:
            if isinstance(item, str):
                yield sse_comment(item)
            elif isinstance(item, StreamError):  # an error event, then the end
                yield sse(item.body)
            elif is_usage_chunk(item):
                if self.include_usage:
                    yield sse(item)
            else:
                if self.include_usage:  # OpenAI's shape: every other chunk says usage null
                    item["usage"] = None
                yield sse(item)
        yield sse("[DONE]")


def sse_comment(text: str) -> str:
    """A comment line: clients ignore it, proxies see a live connection."""
    return f": {text}\n\n"


def model_object(model_id: str, status: str, loaded: bool, created: int) -> dict[str, Any]:
    """OpenAI's ``Model`` plus this node's ``status`` and ``loaded``."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "llmlb-node",
        "status": status,
        "loaded": loaded,
    }


def embeddings_response(result: dict[str, Any], model_id: str, encoding: str) -> dict[str, Any]:
    """llama-cpp-python's embedding result, with vectors as base64 float32 when asked."""
    data = []
    for item in result["data"]:
        vector = item["embedding"]
        if encoding == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": item["index"], "embedding": vector})
    return {"object": "list", "data": data, "model": model_id, "usage": result.get("usage")}


def now() -> int:
    return int(time.time())
