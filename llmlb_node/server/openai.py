"""OpenAI's wire format: request validation (400 naming the parameter) and response shapes.

Validators turn a JSON body into the keyword arguments of llama-cpp-python's calls; nothing here
touches a model.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequestError
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
    return isinstance(v, dict) and v.get("type") in ("text", "json_object", "json_schema")


def _logit_bias(v: Any) -> bool:
    return isinstance(v, dict) and all(
        str(k).lstrip("-").isdigit() and _number(-100, 100)(b) for k, b in v.items()
    )


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
    "seed": (_integer(-(2**63), 2**64), "a whole number"),
    "logit_bias": (_logit_bias, "an object mapping token ids to numbers between -100 and 100"),
    "stream": (_is(bool), "true or false"),
    "n": (lambda v: v == 1 and not isinstance(v, bool), "1 (this node makes one choice)"),
    "user": (_is(str), "a string"),
}
CHAT: dict[str, tuple[Check, str]] = {
    **SAMPLING,
    "max_completion_tokens": (_integer(1), "a whole number >= 1"),
    "response_format": (_response_format, "an object with type text, json_object or json_schema"),
    "tools": (lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v), "a list"),
    "tool_choice": (_is(str, dict), "a string or an object"),
    "logprobs": (_is(bool), "true or false"),
    "top_logprobs": (_integer(0, 20), "a whole number between 0 and 20"),
    "stream_options": (_is(dict), "an object"),
}
COMPLETION: dict[str, tuple[Check, str]] = {
    **SAMPLING,
    "suffix": (_is(str), "a string"),
    "echo": (_is(bool), "true or false"),
    "logprobs": (_integer(0, 20), "a whole number between 0 and 20"),
    "best_of": (lambda v: v == 1 and not isinstance(v, bool), "1 (this node makes one choice)"),
}
# Parameters we accept but do not pass to llama.cpp.
_NOT_PASSED = {"stream", "n", "user", "stream_options", "max_completion_tokens", "best_of"}
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request: which model, how to wait for it, and what to pass to llama.cpp."""

    model: str
    stream: bool = False
    keep_alive: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    encoding_format: str = "float"


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
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
    value = _required(body, "input")
    texts = isinstance(value, list) and value and all(isinstance(s, str) for s in value)
    if not isinstance(value, str) and not texts:
        raise InvalidRequestError(
            "'input' must be a string or a non-empty list of strings", "input"
        )
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequestError(
            "'encoding_format' must be 'float' or 'base64'", "encoding_format"
        )
    parsed = _parsed(body, {"input": value})
    return ParsedRequest(parsed.model, False, parsed.keep_alive, parsed.kwargs, encoding)


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
    return ParsedRequest(model, bool(body.get("stream")), keep_alive, kwargs)


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
    if content is not None and not isinstance(content, (str, list)):
        raise InvalidRequestError(
            f"'{where}.content' must be a string or a list of parts", f"{where}.content"
        )


# -- responses ---------------------------------------------------------------------------------
def error_body(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape, which the openai client turns into the matching exception."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse(data: Any) -> str:
    """One server-sent event carrying `data` as JSON (or ``[DONE]``)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


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
