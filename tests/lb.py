"""A stand-in for the llmlb load balancer, encoding what its code does (akiojin/llmlb v5.7.1).

Every rule cites the Rust file and line it comes from (paths under the repository's `llmlb/`).
The LB tolerates missing fields (its parsers take `Option`s), so the stand-in records what it
read, as the LB would store it, and the tests assert that our node left nothing out.

Registration (`POST /api/endpoints`) detects the endpoint's type, first match wins; the health
check polls `/api/health` only for an xLLM endpoint, `/v1/models` for the others; the model sync
reads `/v1/models` (and `/api/models/{id}/info` on xLLM); forwarding posts the client's body to
`base_url + path` with `model` rewritten, `stream_options.include_usage` injected into streams and
one timeout over the whole response.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

DETECTION_TIMEOUT = 5.0  # src/detection/mod.rs:27
HEALTH_TIMEOUT = 5.0  # src/health/endpoint_checker.rs:40
CHECK_INTERVAL = 30.0  # src/health/endpoint_checker.rs:43
OFFLINE_AFTER = 2  # src/health/endpoint_checker.rs:46 (consecutive failures)
AUTO_SYNC_INTERVAL = 900.0  # src/config.rs:120-127 (LLMLB_AUTO_SYNC_MODELS_INTERVAL_SECS)
INFERENCE_TIMEOUT = 120.0  # src/types/endpoint.rs:389 (inference_timeout_secs)
MODEL_INFO_TIMEOUT = 10.0  # src/metadata/xllm.rs:66
POOL_IDLE = 60.0  # src/bootstrap.rs:95-100: the shared client keeps idle connections 60 s
POOL_MAX_IDLE = 32  # src/bootstrap.rs:96

XLLM, LM_STUDIO, OLLAMA, VLLM, LLAMACPP, OPENAI = (
    "xllm", "lm_studio", "ollama", "vllm", "llamacpp", "openai_compatible",
)  # fmt: skip


class RegistrationError(AssertionError):
    """`POST /api/endpoints` refused: unreachable (502) or unsupported type (400)."""


@dataclass
class GpuInfo:
    """What a health check read from `/api/health` (src/health/endpoint_checker.rs:19-31)."""

    device_count: int | None = None
    total_memory_bytes: int | None = None
    used_memory_bytes: int | None = None
    capability_score: float | None = None
    active_requests: int | None = None


@dataclass
class Endpoint:
    """A registered endpoint, as the LB's registry keeps it (src/types/endpoint.rs)."""

    name: str
    base_url: str
    api_key: str | None
    type: str
    reason: str
    status: str = "pending"
    error_count: int = 0
    last_error: str | None = None
    models: dict[str, int | None] = field(default_factory=dict)
    """Model id -> max_tokens (xLLM's `/api/models/{id}/info` context_length), as synced."""
    gpu: GpuInfo | None = None
    last_sync: float | None = None
    auto_synced: float | None = None
    """When a health check last started a model sync (registration's does not count)."""
    asked: list[str] = field(default_factory=list)
    """Every path the health checks asked, in order (`/api/health`, `/v1/models`)."""


@dataclass
class Forwarded:
    """One client request through the LB: what it sent the node and what the client got."""

    status: int
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    body: Any = None
    """A whole (non-stream) answer's JSON, as the client got it (None for a stream)."""
    events: list[Any] = field(default_factory=list)
    """A stream's `data:` payloads in order, parsed (`[DONE]` excluded)."""
    done: bool = False
    """The stream ended with `data: [DONE]`."""
    sent: dict[str, Any] = field(default_factory=dict)
    """The body the LB posted to the node."""
    endpoint: str | None = None
    usage: dict[str, int | None] | None = None
    """Tokens the LB counted from the answer's `usage` (None: it would estimate with tiktoken)."""
    cut_short: bool = False
    """The whole-response timeout ended a stream that had started."""


class LoadBalancer:
    """Endpoints registered by an admin; one health check round at a time (`check`)."""

    def __init__(self, inference_timeout: float = INFERENCE_TIMEOUT) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self.inference_timeout = inference_timeout
        self.clock: Callable[[], float] = time.monotonic
        self._round_robin = itertools.count()
        # src/bootstrap.rs:95-100: one pooled client for detection, sync and forwarding;
        # src/health/endpoint_checker.rs:70-74: the health checker's own, with a 5 s timeout.
        limits = httpx.Limits(max_keepalive_connections=POOL_MAX_IDLE, keepalive_expiry=POOL_IDLE)
        self.http = httpx.Client(timeout=None, limits=limits, trust_env=False)
        self.health_http = httpx.Client(timeout=HEALTH_TIMEOUT, trust_env=False)

    def close(self) -> None:
        self.http.close()
        self.health_http.close()

    def __enter__(self) -> LoadBalancer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str, base_url: str, api_key: str | None = None) -> Endpoint:
        """`POST /api/endpoints {name, base_url, api_key}` (src/api/endpoints.rs:565-689)."""
        kind, reason = self.detect(base_url, api_key)  # :566-582, failure refuses registration
        endpoint = Endpoint(name, base_url.rstrip("/"), api_key, kind, reason)
        self.endpoints[name] = endpoint
        # :634-686: right after: a connection test (GET /v1/models), then a model sync.
        if self._get(endpoint, "/v1/models", self.inference_timeout)[0] // 100 == 2:
            self._set_status(endpoint, "online")  # src/api/endpoints.rs:427-456
            self.sync_models(name)
        return endpoint

    def detect(self, base_url: str, api_key: str | None = None) -> tuple[str, str]:
        """The endpoint's type and why (src/detection/mod.rs:85-195), first match wins."""
        url = base_url.rstrip("/")
        probes = (
            (XLLM, lambda: xllm_reason(self._probe(url, "/api/system", api_key))),
            (LM_STUDIO, lambda: lm_studio_reason(self, url, api_key)),
            (OLLAMA, lambda: ollama_reason(self._probe(url, "/api/tags", None))),  # no key: :122
            (VLLM, lambda: vllm_reason(self._probe(url, "/v1/models", api_key))),
            (LLAMACPP, lambda: llamacpp_reason(self, url)),
        )
        for kind, probe in probes:
            reason = probe()
            if reason:
                return kind, reason
        answer = self._probe(url, "/v1/models", api_key)
        if answer is not None and answer.status_code // 100 == 2 and _has_data(answer):
            return OPENAI, "OpenAI-compatible: /v1/models responded 200"  # :207-238
        if answer is not None or self._probe(url, "/v1/models", None) is not None:
            raise RegistrationError(f"unsupported endpoint type: {url}")  # :168-185 (400)
        raise RegistrationError(f"endpoint unreachable: could not connect to {url}")  # :186-193

    def _probe(self, url: str, path: str, api_key: str | None) -> httpx.Response | None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            return self.http.get(url + path, headers=headers, timeout=DETECTION_TIMEOUT)
        except httpx.HTTPError:
            return None

    # -- health checks -------------------------------------------------------------------------
    def check(self, name: str) -> Endpoint:
        """One health check (src/health/endpoint_checker.rs:220-424)."""
        endpoint = self.endpoints[name]
        before = endpoint.status
        gpu, error = None, None
        if endpoint.type == XLLM:  # :225-269: /api/health first, /v1/models if it fails
            gpu, error = self._health(endpoint)
        if gpu is None:  # :270-299: every other type: /v1/models only
            error = self._models_ok(endpoint)
        if error is None:
            self._set_status(endpoint, "online")
            endpoint.gpu = gpu or endpoint.gpu  # :319-332: only an /api/health answer updates it
            if before in ("offline", "error"):  # :334-378: back: detect the type again
                self._redetect(endpoint)
            self._maybe_sync(endpoint)
        else:
            endpoint.last_error = error
            self._set_status(endpoint, _failure_status(endpoint, before))
        return endpoint

    def _redetect(self, endpoint: Endpoint) -> None:
        """src/health/endpoint_checker.rs:339-377: a failed detection keeps the old type."""
        with contextlib.suppress(RegistrationError):
            endpoint.type, endpoint.reason = self.detect(endpoint.base_url, endpoint.api_key)

    def _health(self, endpoint: Endpoint) -> tuple[GpuInfo | None, str | None]:
        """src/health/endpoint_checker.rs:515-557: any 2xx JSON counts; fields are optional."""
        endpoint.asked.append("/api/health")
        status, body = self._get(endpoint, "/api/health", HEALTH_TIMEOUT, self.health_http)
        if status // 100 != 2 or not isinstance(body, dict):
            return None, f"HTTP {status}"
        gpu, load = _obj(body.get("gpu")), _obj(body.get("load"))
        return GpuInfo(
            device_count=_u64(gpu.get("device_count")),
            total_memory_bytes=_u64(gpu.get("total_memory_bytes")),
            used_memory_bytes=_u64(gpu.get("used_memory_bytes")),
            capability_score=_f64(gpu.get("capability_score")),
            active_requests=_u64(load.get("active_requests")),
        ), None

    def _models_ok(self, endpoint: Endpoint) -> str | None:
        """src/health/endpoint_checker.rs:560-577: 2xx is healthy; the body is not read."""
        endpoint.asked.append("/v1/models")
        status, _ = self._get(endpoint, "/v1/models", HEALTH_TIMEOUT, self.health_http)
        return None if status // 100 == 2 else f"HTTP {status}"

    def _set_status(self, endpoint: Endpoint, status: str) -> None:
        """src/registry/endpoints.rs:282-312: error_count grows only while the status is error."""
        endpoint.status = status
        endpoint.error_count = endpoint.error_count + 1 if status == "error" else 0
        if status == "online":
            endpoint.last_error = None

    def _maybe_sync(self, endpoint: Endpoint) -> None:
        """src/health/endpoint_checker.rs:426-512: at most once per AUTO_SYNC_INTERVAL, the
        first healthy check included (the registration's sync does not set the throttle)."""
        now = self.clock()
        if endpoint.auto_synced is None or now - endpoint.auto_synced >= AUTO_SYNC_INTERVAL:
            endpoint.auto_synced = now
            if not self.sync_models(endpoint.name):
                endpoint.auto_synced = None  # :490-509: a failed sync is retried next time

    # -- model sync ----------------------------------------------------------------------------
    def sync_models(self, name: str) -> bool:
        """src/sync/mod.rs:101-260: `/v1/models` with the inference timeout; False on non-2xx."""
        endpoint = self.endpoints[name]
        status, body = self._get(endpoint, "/v1/models", self.inference_timeout)
        if status // 100 != 2 or body is None:  # :133-145: non-2xx, or not JSON
            return False
        endpoint.last_sync = self.clock()
        endpoint.models = {model_id: None for model_id in _model_ids(_obj(body))}
        if endpoint.type in (XLLM, OLLAMA, LM_STUDIO):  # :217-221, max_tokens per model
            for model_id in endpoint.models:
                endpoint.models[model_id] = self._max_tokens(endpoint, model_id)
        return True

    def _max_tokens(self, endpoint: Endpoint, model_id: str) -> int | None:
        """xLLM: `GET /api/models/{id}/info` (src/metadata/xllm.rs:48-103); other types' own
        metadata routes are not modelled (this node is detected as xLLM)."""
        if endpoint.type != XLLM:
            return None
        encoded = model_id.replace(" ", "%20").replace("/", "%2F").replace(":", "%3A")  # :55-58
        status, body = self._get(endpoint, f"/api/models/{encoded}/info", MODEL_INFO_TIMEOUT)
        if status // 100 != 2 or not _model_info_parses(body):
            return None  # :75-91: a non-2xx or a body that does not parse is an error (logged)
        return body.get("context_length", body.get("n_ctx"))

    # -- forwarding ----------------------------------------------------------------------------
    def forward(self, name: str | None, path: str, body: dict[str, Any]) -> Forwarded:
        """A client's `POST path` on the LB, to endpoint `name` (None: the one the LB picks).

        Chat, completions, embeddings: src/api/openai.rs:761-1338 (proxy_openai_post);
        `/v1/responses`: src/api/responses.rs:143-420, the body and the answer passed through.
        """
        model, stream = body["model"], body.get("stream") is True  # :592-615
        endpoint = self.endpoints[name] if name else self._select(model)
        if endpoint is None:  # :806-818: no online endpoint has it
            error = {"error": {"message": f"The model '{model}' does not exist"}}
            return Forwarded(404, body=error, sent=body)
        sent = json.loads(json.dumps(body))  # :966-979: `model` becomes the endpoint's own id
        if stream and path != "/v1/responses":  # :981-992: unless the client set it
            options = sent.setdefault("stream_options", {})
            if isinstance(options, dict):  # a null stream_options is left alone, as in Rust
                options.setdefault("include_usage", True)
        return self._send(endpoint, path, sent, stream)

    def _select(self, model: str) -> Endpoint | None:
        """Online endpoints that synced `model` (src/registry/endpoints.rs:209-231), in turn:
        the LB ranks them by measured TPS, ties by round robin (src/balancer/mod.rs:1922-1985);
        the stand-in keeps the round robin."""
        ready = [e for e in self.endpoints.values() if e.status == "online" and model in e.models]
        return ready[next(self._round_robin) % len(ready)] if ready else None

    def _send(self, endpoint: Endpoint, path: str, sent: dict[str, Any], stream: bool) -> Forwarded:
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        deadline = time.monotonic() + self.inference_timeout  # :995-999, reqwest: whole response
        request = self.http.build_request(
            "POST", endpoint.base_url + path, json=sent, headers=headers,
            timeout=httpx.Timeout(self.inference_timeout),
        )  # fmt: skip
        try:
            response = self.http.send(request, stream=True)
        except httpx.TimeoutException:  # src/api/openai_util.rs:105-114
            seconds = f"{self.inference_timeout:g} seconds"
            error = _error(f"Upstream endpoint request timed out after {seconds}", "timeout")
            return Forwarded(504, body=error, sent=sent, endpoint=endpoint.name)
        except httpx.HTTPError:  # src/api/openai_util.rs:117-133
            error = _error("Failed to connect to upstream endpoint", "connection_error")
            return Forwarded(502, body=error, sent=sent, endpoint=endpoint.name)
        answer = Forwarded(
            response.status_code, response.headers, sent=sent, endpoint=endpoint.name
        )
        try:
            if stream:  # :1083-1160: any status passes through, the body streamed as it comes
                return self._stream(answer, response, deadline)
            return self._whole(answer, response, path == "/v1/responses")
        finally:
            response.close()

    def _stream(self, answer: Forwarded, response: httpx.Response, deadline: float) -> Forwarded:
        try:
            for data in _sse_data(response, deadline):
                if data == "[DONE]":
                    answer.done = True
                    continue
                answer.events.append(data)
                usage = _usage_of(data)  # src/token/mod.rs:95-99: the last usage seen wins
                if usage is not None and response.status_code // 100 == 2:
                    answer.usage = usage
        except (TimeoutError, httpx.TimeoutException):
            answer.cut_short = True
        return answer

    def _whole(self, answer: Forwarded, response: httpx.Response, verbatim: bool) -> Forwarded:
        raw = response.read()
        answer.body = _loads(raw)
        if verbatim:  # src/api/responses.rs:253-259, :405-420: status and body as they came
            return answer
        if response.status_code // 100 != 2:  # :1162-1220: 502, never retried elsewhere
            message = raw.decode(errors="replace").strip() or str(response.status_code)
            answer.status, answer.usage = 502, None
            answer.body = {
                "error": {"message": message, "type": "endpoint_upstream_error", "code": 502}
            }
        elif not isinstance(answer.body, dict):  # :1290-1336: LbError::Http, a 502
            answer.status, answer.body = 502, {"error": "Backend service unavailable"}
        else:
            answer.body["model"] = answer.sent["model"]  # :1226-1229: the client's name back
            answer.usage = _usage_of(answer.body)
        return answer

    # -- HTTP ------------------------------------------------------------------------------------
    def _get(
        self, endpoint: Endpoint, path: str, timeout: float, client: httpx.Client | None = None
    ) -> tuple[int, Any]:
        """(status, JSON body or None); status 0 when no answer came (refused, timed out)."""
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        try:
            response = (client or self.http).get(
                endpoint.base_url + path, headers=headers, timeout=timeout
            )
        except httpx.HTTPError:
            return 0, None
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None


# -- detection probes (each returns its reason, or None) -------------------------------------
def xllm_reason(answer: httpx.Response | None) -> str | None:
    """src/detection/xllm.rs:27-66: a 2xx JSON object whose `xllm_version` is a string."""
    body = _json(answer)
    fields_ok = isinstance(body, dict) and all(
        _serde_opt(body, key, str) for key in ("xllm_version", "server_name")
    )  # a wrong type in either fails the whole parse: no match
    if not fields_ok:
        return None
    version = body.get("xllm_version")
    return f"xLLM: /api/system xllm_version={version}" if version is not None else None


def lm_studio_reason(lb: LoadBalancer, url: str, api_key: str | None) -> str | None:
    """src/detection/lm_studio.rs:18-96: LM Studio fields on /api/v1/models, else an LM Studio
    marker in /v1/models' Server header or in a model's `owned_by`."""
    body = _json(lb._probe(url, "/api/v1/models", api_key))
    if isinstance(body, dict) and _has_lm_studio_fields(body):
        return "LM Studio: /api/v1/models returned LM Studio format"
    answer = lb._probe(url, "/v1/models", api_key)
    if answer is None:
        return None
    if _lm_studio_marker(answer.headers.get("server", "")):  # :61-75
        return "LM Studio: Server header contains lm-studio"
    data = _json(answer)
    owners = [m.get("owned_by") for m in _list(_obj(data).get("data")) if isinstance(m, dict)]
    if any(isinstance(o, str) and _lm_studio_marker(o) for o in owners):  # :77-87, :167-178
        return "LM Studio: owned_by field contains LM Studio marker"
    return None


def _has_lm_studio_fields(body: dict[str, Any]) -> bool:
    """src/detection/lm_studio.rs:103-130."""
    for key in ("data", "models"):
        for model in _list(body.get(key)):
            if not isinstance(model, dict):
                continue
            publisher = isinstance(model.get("publisher"), str)
            arch = isinstance(model.get("arch"), str) or isinstance(model.get("architecture"), str)
            state = "state" in model or isinstance(model.get("loaded_instances"), list)
            shape = isinstance(model.get("key"), str) or isinstance(model.get("display_name"), str)
            shape = shape or "format" in model or "compatibility_type" in model
            if publisher and arch and (state or shape):
                return True
    return False


def _lm_studio_marker(value: str) -> bool:
    """src/detection/lm_studio.rs:137-160: `lmstudio`, or `lm` then `studio`, as tokens."""
    tokens = [t.lower() for t in re.split(r"[^A-Za-z0-9]+", value) if t]
    pairs = zip(tokens, tokens[1:], strict=False)
    return "lmstudio" in tokens or any(a == "lm" and b == "studio" for a, b in pairs)


def ollama_reason(answer: httpx.Response | None) -> str | None:
    """src/detection/ollama.rs:13-80, asked WITHOUT the API key: a 2xx JSON object with a
    `models` list of `{name: string, size?: integer}` and no non-null `error`."""
    body = _json(answer)
    if not isinstance(body, dict) or body.get("error") is not None:
        return None
    models = body.get("models")
    if not isinstance(models, list):
        return None  # absent or null: None (:53-60); another type: a parse error (:62-65)
    for model in models:  # :24-32: serde fails the whole body on one bad entry
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            return None
        if not _serde_opt(model, "size", int):
            return None
    return "Ollama: /api/tags returned models"


def vllm_reason(answer: httpx.Response | None) -> str | None:
    """src/detection/vllm.rs:15-75: `vllm` in /v1/models' Server header or a model's owned_by."""
    if answer is None:
        return None
    if "vllm" in answer.headers.get("server", "").lower():
        return "vLLM: Server header contains vllm"
    data = _obj(_json(answer)).get("data")
    owners = [m.get("owned_by") for m in _list(data) if isinstance(m, dict)]
    if any(isinstance(o, str) and "vllm" in o.lower() for o in owners):
        return "vLLM: owned_by field contains vllm"
    return None


def llamacpp_reason(lb: LoadBalancer, url: str) -> str | None:
    """src/detection/llama_cpp.rs:29-96, without the API key: `llama.cpp` in /v1/models'
    Server header, else `GET /v1/version` answering `{"server": "...llama.cpp..."}`."""
    answer = lb._probe(url, "/v1/models", None)
    if answer is not None and "llama.cpp" in answer.headers.get("server", ""):
        return "llama.cpp: Server header contains llama.cpp"
    server = _obj(_json(lb._probe(url, "/v1/version", None))).get("server")
    return "llama.cpp: /v1/version" if isinstance(server, str) and "llama.cpp" in server else None


def _model_info_parses(body: Any) -> bool:
    """src/metadata/xllm.rs:11-34: `model` a string; every other field absent, null or of its
    type (one alias per field: context_length|n_ctx, size_bytes|size|file_size, ...)."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return False
    context = body.get("context_length", body.get("n_ctx"))
    size = body.get("size_bytes", body.get("size", body.get("file_size")))
    texts = ("quantization", "quant", "quantization_type", "family", "parameter_size", "params")
    return (
        (context is None or _u32(context))
        and (size is None or _u64(size) is not None)
        and all(_serde_opt(body, key, str) for key in (*texts, "num_params"))
    )


def _has_data(answer: httpx.Response) -> bool:
    """src/detection/mod.rs:221-229: the JSON has a `data` or an `object` key."""
    body = _json(answer)
    return isinstance(body, dict) and ("data" in body or "object" in body)


# -- small readers -----------------------------------------------------------------------------
def _failure_status(endpoint: Endpoint, before: str) -> str:
    """src/health/endpoint_checker.rs:580-607: pending fails straight to offline; online and
    error go offline at the second consecutive failure, error before that."""
    if before in ("pending", "offline"):
        return "offline"
    return "offline" if endpoint.error_count + 1 >= OFFLINE_AFTER else "error"


def _model_ids(body: dict[str, Any]) -> list[str]:
    """src/sync/parser.rs:78-111: `data[].id` (OpenAI), else `models[].name|model` (Ollama)."""
    if isinstance(body.get("data"), list):
        rows = [m for m in body["data"] if isinstance(m, dict)]
        return [m["id"] for m in rows if isinstance(m.get("id"), str)]
    rows = [m for m in _list(body.get("models")) if isinstance(m, dict)]
    names = [m.get("name") if isinstance(m.get("name"), str) else m.get("model") for m in rows]
    return [n for n in names if isinstance(n, str) and n]


def _usage_of(chunk: Any) -> dict[str, int | None] | None:
    """`extract_usage_from_response` (src/token/mod.rs:182-206): chat's and Responses' names,
    `usage` at the top or in `response`; a null usage is a usage of unknowns."""
    if not isinstance(chunk, dict):
        return None
    holder = chunk if "usage" in chunk else chunk.get("response")
    if not isinstance(holder, dict) or "usage" not in holder:
        return None
    usage = _obj(holder["usage"])

    def count(*names: str) -> int | None:
        name = next((n for n in names if n in usage), None)
        return _u64(usage.get(name)) if name else None

    return {
        "input_tokens": count("prompt_tokens", "input_tokens"),
        "output_tokens": count("completion_tokens", "output_tokens"),
        "total_tokens": count("total_tokens"),
    }


def _sse_data(response: httpx.Response, deadline: float) -> Iterator[Any]:
    """The `data:` payloads of an SSE body (src/token/mod.rs:72-92), until the deadline."""
    for line in response.iter_lines():
        if time.monotonic() > deadline:
            raise TimeoutError
        line = line.strip()
        if not line.startswith("data:"):
            continue  # comments (`: ...`) and blank lines are skipped
        data = line[5:].strip()
        yield data if data == "[DONE]" else _loads(data)


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


def _json(answer: httpx.Response | None) -> Any:
    if answer is None or answer.status_code // 100 != 2:
        return None
    return _loads(answer.content)


def _loads(raw: str | bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _serde_opt(body: dict[str, Any], key: str, kind: type) -> bool:
    """serde's `Option<T>`: absent or null is fine; any other value must be a `kind`."""
    value = body.get(key)
    return value is None or (isinstance(value, kind) and not isinstance(value, bool))


def _u64(value: Any) -> int | None:
    """serde_json's `as_u64`: a non-negative integer (never a bool or a float)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if ok else None


def _u32(value: Any) -> bool:
    return _u64(value) is not None and value < 2**32


def _f64(value: Any) -> float | None:
    """serde_json's `as_f64`: any number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok else None
