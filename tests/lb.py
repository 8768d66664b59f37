"""A stand-in for the llmlb load balancer: it registers nodes and polls them as the LB does.

The LB's admin registers a node (`POST /api/endpoints {name, base_url, api_key}`); the LB then
polls `GET /api/health` with `Authorization: Bearer <api_key>`, falls back to `GET /v1/models`
when a node has no health route, and re-reads `/v1/models` for the model list. Every answer is
checked against the shapes the LB reads: a wrong type or a missing key fails the test.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))

HEALTH: dict[str, Any] = {
    "status": str,
    "gpu": {
        "device_count": int,
        "total_memory_bytes": int,
        "used_memory_bytes": int,
        "free_memory_bytes": int,
        "devices": [{"name": str, "total_memory_bytes": int, "used_memory_bytes": int}],
    },
    "load": {"active_requests": int, "max_concurrent_requests": int},
    "memory": {
        "ram_total_bytes": int,
        "ram_used_bytes": int,
        "vram_total_bytes": int,
        "vram_used_bytes": int,
    },
    "sync_state": str,
    "sync_progress": (
        type(None),
        {"model_id": str, "file": _OPT_STR, "downloaded_bytes": int, "total_bytes": _OPT_INT},
    ),
    "loaded_models": [str],
    "version": str,
}
SYSTEM: dict[str, Any] = {
    "device": {"device_type": str, "gpu_devices": [{"name": str}]},
    "version": str,
    "llama_cpp": {"version": _OPT_STR, "gpu_offload": bool},
}
MODELS: dict[str, Any] = {
    "object": str,
    "data": [{"id": str, "object": str, "created": int, "owned_by": str}],
}


def check_shape(value: Any, shape: Any, where: str = "$") -> None:
    """Assert `value` has `shape`: a dict of keys (extra keys allowed, as the LB ignores them),
    a one-item list (every element), a type, or a tuple of alternatives."""
    if isinstance(shape, tuple):
        errors = []
        for option in shape:
            try:
                check_shape(value, option, where)
                return
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(" or ".join(errors))
    if isinstance(shape, dict):
        assert isinstance(value, dict), f"{where}: expected an object, got {value!r}"
        for key, sub in shape.items():
            assert key in value, f"{where}: missing {key!r} in {sorted(value)}"
            check_shape(value[key], sub, f"{where}.{key}")
    elif isinstance(shape, list):
        assert isinstance(value, list), f"{where}: expected a list, got {value!r}"
        for i, item in enumerate(value):
            check_shape(item, shape[0], f"{where}[{i}]")
    else:
        ok = isinstance(value, shape) and not (shape is int and isinstance(value, bool))
        assert ok, f"{where}: expected {shape.__name__}, got {value!r}"


@dataclass
class Endpoint:
    """A node as the LB's admin registered it."""

    name: str
    base_url: str
    api_key: str | None
    status: str = "pending"
    models: list[str] = field(default_factory=list)
    failures: int = 0
    polled_with: list[str] = field(default_factory=list)
    """The route each poll got its answer from: /api/health or /v1/models."""


class LoadBalancer:
    """Endpoints registered by an admin, polled one round at a time (`poll`)."""

    OFFLINE_AFTER = 2

    def __init__(self) -> None:
        self.endpoints: dict[str, Endpoint] = {}

    def register(self, name: str, base_url: str, api_key: str | None = None) -> Endpoint:
        """What `POST /api/endpoints {name, base_url, api_key}` does on the LB."""
        endpoint = Endpoint(name, base_url.rstrip("/"), api_key)
        self.endpoints[name] = endpoint
        return endpoint

    def poll(self, name: str) -> dict[str, Any] | None:
        """One health round for `name`: its health body (checked), or None after a fallback."""
        endpoint = self.endpoints[name]
        status, body = self._get(endpoint, "/api/health")
        if status in (200, 503):
            check_shape(body, HEALTH)
            assert body["status"] in ("online", "busy", "offline"), body["status"]
            assert body["sync_state"] in ("idle", "running", "success", "failed")
            assert (status == 503) == (body["status"] == "offline"), (status, body["status"])
            endpoint.status, endpoint.failures = body["status"], 0
            endpoint.polled_with.append("/api/health")
            self.sync_models(name)
            return body
        # An older node, without the route: its model list is its health.
        if status in (404, 405) and self.sync_models(name):
            endpoint.status, endpoint.failures = "online", 0
            endpoint.polled_with.append("/v1/models")
            return None
        endpoint.failures += 1
        if endpoint.failures >= self.OFFLINE_AFTER:
            endpoint.status = "offline"
        return None

    def sync_models(self, name: str) -> bool:
        """Re-read the node's `/v1/models` (checked); False when it did not answer 200."""
        endpoint = self.endpoints[name]
        status, body = self._get(endpoint, "/v1/models")
        if status != 200:
            return False
        check_shape(body, MODELS)
        endpoint.models = [m["id"] for m in body["data"]]
        return True

    def system(self, name: str) -> dict[str, Any]:
        """The node's `/api/system`, checked."""
        status, body = self._get(self.endpoints[name], "/api/system")
        assert status == 200, (status, body)
        check_shape(body, SYSTEM)
        assert body["device"]["device_type"] in ("cpu", "gpu")
        return body

    def forward(self, name: str, path: str, body: dict[str, Any]) -> Forwarded:
        """What the LB does with a client's ``POST path`` routed to `name`.

        A stream of chat or completions gets ``stream_options.include_usage: true`` unless the
        client set it (llmlb/src/api/openai.rs:981-992, `proxy_openai_post`); ``/v1/responses``
        is passed through as it is (llmlb/src/api/responses.rs:218-259). The stream's lines are
        read by the LB's token accumulator (llmlb/src/api/proxy.rs:104-116,
        llmlb/src/token/mod.rs:72-133): the last ``usage`` it sees wins, ``null`` included.
        """
        endpoint = self.endpoints[name]
        payload = json.loads(json.dumps(body))
        if payload.get("stream") is True and path != "/v1/responses":
            options = payload.setdefault("stream_options", {})
            if isinstance(options, dict):  # a null stream_options is left alone, as in Rust
                options.setdefault("include_usage", True)
        headers = {"Content-Type": "application/json"}
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        data = json.dumps(payload).encode()
        request = urllib.request.Request(endpoint.base_url + path, data, headers, method="POST")
        try:  # the LB's inference timeout covers the whole response, streams included
            with urllib.request.urlopen(request, timeout=120) as response:
                return _read_answer(response.status, response, payload.get("stream") is True)
        except urllib.error.HTTPError as err:
            return _read_answer(err.code, err, False)

    @staticmethod
    def _get(endpoint: Endpoint, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        request = urllib.request.Request(endpoint.base_url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except ValueError:
                return err.code, raw
        except OSError:
            return 0, None


@dataclass
class Forwarded:
    """A forwarded request's answer, and the tokens the LB counted from it."""

    status: int
    body: Any = None
    """A whole (non-stream) answer's JSON."""
    events: list[Any] = field(default_factory=list)
    """A stream's ``data:`` objects in order (``[DONE]`` excluded)."""
    done: bool = False
    usage: dict[str, int | None] | None = None
    """The accumulator's usage (input, output, total tokens); None: it would estimate."""


def _read_answer(status: int, response: Any, stream: bool) -> Forwarded:
    if not stream:
        raw = response.read()
        try:
            return Forwarded(status, json.loads(raw))
        except ValueError:
            return Forwarded(status, raw)
    answer = Forwarded(status)
    for line in response:
        _accumulate(answer, line.decode("utf-8", "replace").strip())
    return answer


def _accumulate(answer: Forwarded, line: str) -> None:
    """`StreamingTokenAccumulator::process_chunk` (llmlb/src/token/mod.rs:72-112)."""
    if not line or line.startswith(":") or not line.startswith("data:"):
        return
    data = line[len("data:") :].strip()
    if data == "[DONE]":
        answer.done = True
        return
    try:
        chunk = json.loads(data)
    except ValueError:
        return
    answer.events.append(chunk)
    usage = _usage_of(chunk)
    if usage is not None:
        answer.usage = usage


def _usage_of(chunk: Any) -> dict[str, int | None] | None:
    """`extract_usage_from_response` (llmlb/src/token/mod.rs:182-206): chat's and Responses'
    names, ``usage`` at the top or in ``response``; a null usage is a usage of unknowns."""
    if not isinstance(chunk, dict):
        return None
    holder = chunk if "usage" in chunk else chunk.get("response")
    if not isinstance(holder, dict) or "usage" not in holder:
        return None
    usage = holder["usage"] if isinstance(holder["usage"], dict) else {}

    def count(*names: str) -> int | None:
        name = next((n for n in names if n in usage), None)
        value = usage.get(name) if name else None
        return value if isinstance(value, int) and value >= 0 else None

    return {
        "input_tokens": count("prompt_tokens", "input_tokens"),
        "output_tokens": count("completion_tokens", "output_tokens"),
        "total_tokens": count("total_tokens"),
    }
