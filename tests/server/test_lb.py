"""The llmlb load balancer's view of a node: detection, health checks, model sync, forwarding.

The node is a real `llmlb-node serve` subprocess; tests/lb.py is a stand-in for the LB that
encodes what its Rust code does (with citations). Busy (a full queue on a loaded model) and
forwarding to a model that answers need llama.cpp with a real model: see tests/e2e/test_lb.py.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from lb import XLLM, LoadBalancer, RegistrationError, ollama_reason
from node import running_node
from starlette.testclient import TestClient
from world import FILENAME, MODEL_ID, SIZE, World

from llmlb_node import __version__, backend
from llmlb_node.offload import GpuDevice
from llmlb_node.server import KEEP_ALIVE_TIMEOUT
from llmlb_node.server.app import create_app
from llmlb_node.server.lb import HardwareSnapshot, capability_score
from llmlb_node.server.pool import ModelPool
from llmlb_node.server.settings import ServerSettings

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}
KEY = "lb-key"


def _meminfo_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def _pull(node, model_id: str = MODEL_ID) -> None:  # noqa: ANN001 - tests/node.py's Node
    status, _, body = node.post("/api/models/pull", {"model": model_id, "stream": False})
    assert status == 200, body


@pytest.mark.parametrize("api_key", [None, KEY])
def test_an_empty_node_is_detected_as_llmlbs_own_node_and_polled_on_api_health(
    world: World, api_key: str | None
) -> None:
    with running_node(api_key=api_key) as node, LoadBalancer() as lb:
        endpoint = lb.register("node-1", node.url, api_key)
        lb.check("node-1")
        unauthenticated_tags = httpx.get(node.url + "/api/tags")

    assert endpoint.type == XLLM
    assert endpoint.reason == f"xLLM: /api/system xllm_version={__version__}"
    assert endpoint.status == "online" and endpoint.error_count == 0
    assert endpoint.models == {}  # an empty store advertises nothing
    assert endpoint.asked == ["/api/health"]  # xLLM: never the /v1/models fallback
    gpu = endpoint.gpu
    assert gpu is not None  # every field the LB reads is there, with the LB's types
    assert (gpu.device_count, gpu.total_memory_bytes, gpu.used_memory_bytes) == (0, 0, 0)
    assert gpu.capability_score == 0.0 and gpu.active_requests == 0
    if api_key:  # Ollama's probe goes without the key: refused, so it could never match
        assert unauthenticated_tags.status_code == 401
    else:  # it would match an empty list: xLLM's probe, first, must (and does) win
        assert ollama_reason(unauthenticated_tags) is not None
    assert world.requests() == 0  # detection and polling never touch a model source


@pytest.mark.parametrize("api_key", [None, KEY])
def test_installed_models_are_synced_with_the_context_the_node_runs_them_at(
    world: World, api_key: str | None
) -> None:
    world.add_model("other", {"other.gguf": b"GGUF" + bytes(100)})
    with running_node(api_key=api_key, N_CTX="512") as node, LoadBalancer() as lb:
        _pull(node)
        endpoint = lb.register("node-1", node.url, api_key)
        status, _, info = node.get(f"/api/models/{MODEL_ID}/info")
        unknown, _, _ = node.get("/api/models/nope/info")
        auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        tags = httpx.get(node.url + "/api/tags", headers=auth)

    assert endpoint.type == XLLM
    assert endpoint.models == {MODEL_ID: 512}  # `other` is in the catalog, not on disk
    assert status == 200 and info["model"] == MODEL_ID and info["context_length"] == 512
    assert info["size_bytes"] == SIZE
    assert unknown == 404
    assert ollama_reason(tags) is None  # installed rows are not Ollama's {name, size}


def test_a_model_installed_later_is_synced_at_the_next_sync_window(world: World) -> None:
    with running_node(api_key=KEY) as node, LoadBalancer() as lb:
        lb.register("node-1", node.url, KEY)
        first = dict(lb.check("node-1").models)  # the first healthy check syncs too
        _pull(node)
        within = dict(lb.check("node-1").models)  # less than 15 min later: not asked again
        start = time.monotonic()
        lb.clock = lambda: start + 900  # src/config.rs:120-127, 15 min
        later = dict(lb.check("node-1").models)

    assert first == {} and within == {}
    assert later == {MODEL_ID: 4096}  # LLMLB_N_CTX's default, from /api/models/{id}/info


def test_a_node_that_stops_answering_is_error_then_offline_and_back_online(world: World) -> None:
    with LoadBalancer() as lb:
        with running_node(api_key=KEY) as node:
            lb.register("node-1", node.url, KEY)
        seen = [lb.check("node-1").status, lb.check("node-1").status]
        with running_node(api_key=KEY) as again:
            lb.endpoints["node-1"].base_url = again.url
            back = lb.check("node-1")

    assert seen == ["error", "offline"]  # src/health/endpoint_checker.rs:580-607
    assert back.status == "online" and back.type == XLLM and back.error_count == 0


def test_registration_with_a_wrong_key_is_refused(world: World) -> None:
    with running_node(api_key=KEY) as node, LoadBalancer() as lb:
        with pytest.raises(RegistrationError, match="unsupported endpoint type"):
            lb.register("intruder", node.url, "wrong-key")
        status, _, body = node.get("/api/system", headers={"Authorization": "Bearer nope"})

    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_system_and_health_carry_what_the_lb_and_its_mocks_read(world: World) -> None:
    with running_node(api_key=KEY) as node:
        detected = lambda: node.get("/api/system")[2]["llama_cpp"]["version"] is not None  # noqa: E731
        node.wait_for(detected, what="the first hardware detection")
        _, _, system = node.get("/api/system")
        _, _, health = node.get("/api/health")

    assert system["xllm_version"] == __version__ and system["server_name"] == "llmlb-node"
    assert system["gpu"] == {"device_count": 0}
    assert system["device"] == {"device_type": "cpu", "gpu_devices": []}
    assert system["version"] == __version__
    assert system["llama_cpp"] == {"version": backend.installed_version(), "gpu_offload": False}
    assert health["status"] == "online"
    assert health["gpu"] == {
        "device_count": 0,
        "total_memory_bytes": 0,
        "used_memory_bytes": 0,
        "free_memory_bytes": 0,
        "devices": [],
        "capability_score": 0.0,
    }
    assert health["memory"]["ram_total_bytes"] == _meminfo_total()
    assert 0 < health["memory"]["ram_used_bytes"] < health["memory"]["ram_total_bytes"]
    assert health["memory"]["vram_total_bytes"] == 0
    assert health["load"] == {"active_requests": 0, "max_concurrent_requests": 2 * (1 + 32)}
    assert health["sync_state"] == "idle" and health["sync_progress"] is None
    assert health["loaded_models"] == [] and health["version"] == __version__


def test_capability_score_is_the_gpu_memory_llama_cpp_can_offload_to() -> None:
    """No GPU exists here: the snapshots are what the detectors report on machines with one."""
    gib = 1024**3
    cards = (GpuDevice("cuda", "RTX 4090", 24 * gib, 20 * gib), GpuDevice("cuda", "A2", 16 * gib))

    assert capability_score(HardwareSnapshot(cards, "0.3.36", gpu_offload=True)) == 40.0
    assert capability_score(HardwareSnapshot(cards, "0.3.36", gpu_offload=False)) == 0.0
    assert capability_score(HardwareSnapshot((), "0.3.36", gpu_offload=True)) == 0.0


def test_the_lb_reads_active_requests_while_a_download_runs(world: World) -> None:
    world.hub.cdn.rate_limit(SIZE / 3)  # about three seconds
    with running_node(api_key=KEY, MAX_LOADED_MODELS="3", MAX_QUEUE="4") as node:
        lb = LoadBalancer()
        lb.register("node-1", node.url, KEY)
        chat = threading.Thread(target=node.post, args=("/v1/chat/completions", CHAT))
        chat.start()
        seen = []
        node.wait_for(
            lambda: seen.append(node.get("/api/health")[2]) or _downloading(seen[-1]),
            what="sync_state running with bytes",
        )
        active = lb.check("node-1").gpu
        chat.join()  # the tiny model downloads, then fails to load (500): not a sync failure
        after = node.get("/api/health")[2]
        lb.close()

    running = seen[-1]
    assert active is not None and active.active_requests == 1
    assert running["sync_progress"]["model_id"] == MODEL_ID
    assert running["sync_progress"]["file"] == FILENAME
    assert running["sync_progress"]["total_bytes"] == SIZE
    assert running["load"] == {"active_requests": 1, "max_concurrent_requests": 3 * 5}
    assert after["sync_state"] == "success"
    assert after["sync_progress"] == {
        "model_id": MODEL_ID,
        "file": FILENAME,
        "downloaded_bytes": SIZE,
        "total_bytes": SIZE,
    }
    assert after["load"]["active_requests"] == 0 and after["loaded_models"] == []


def _downloading(health: dict) -> bool:
    progress = health.get("sync_progress") or {}
    return health["sync_state"] == "running" and 0 < progress.get("downloaded_bytes", 0) < SIZE


def test_health_reports_a_failed_download_as_failed(world: World) -> None:
    world.hub.refuse()
    world.proxy.refuse()
    with running_node() as node:
        status, _, _ = node.post("/v1/chat/completions", CHAT)
        _, _, health = node.get("/api/health")

    assert status == 502
    assert health["status"] == "online"  # the node still serves; only that sync failed
    assert health["sync_state"] == "failed"
    assert health["sync_progress"]["model_id"] == MODEL_ID


def test_health_is_offline_with_503_while_the_node_shuts_down(world: World) -> None:
    settings = ServerSettings.from_env()
    pool = ModelPool(settings)
    with TestClient(create_app(settings, pool=pool)) as client:
        before = client.get("/api/health")
        pool.shutting_down = True
        during = client.get("/api/health")
        system = client.get("/api/system")

    assert before.status_code == 200 and before.json()["status"] == "online"
    assert during.status_code == 503 and during.json()["status"] == "offline"
    assert system.status_code == 200  # still llmlb's node: a re-detection stays xLLM


@pytest.mark.parametrize("path", ["/api/health", "/api/system", f"/api/models/{MODEL_ID}/info"])
def test_lb_routes_require_the_api_key(world: World, path: str) -> None:
    with running_node(api_key=KEY) as node:
        status, _, body = node.get(path, headers={"Authorization": "Bearer nope"})

    assert status == 401 and body["error"]["code"] == "invalid_api_key"


# -- forwarding ------------------------------------------------------------------------------
ACCESS = "access: POST /v1/chat/completions"


def test_a_failed_request_through_the_lb_is_502_and_asked_once(world: World) -> None:
    with running_node(api_key=KEY) as node, LoadBalancer() as lb:
        _pull(node)  # installed, so advertised; llama.cpp cannot load the tiny model
        lb.register("node-1", node.url, KEY)
        plain = lb.forward(None, "/v1/chat/completions", CHAT)
        stream = lb.forward(None, "/v1/chat/completions", {**CHAT, "stream": True})
        # The access line is written as the answer ends, which may be just after the LB read
        # it: wait for both lines (a hang guard, not a timing), then count them.
        deadline = time.monotonic() + 30
        while node.log.count(ACCESS) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        log = node.log

    assert plain.status == 502  # src/api/openai.rs:1162-1220: any non-2xx
    assert plain.body["error"]["type"] == "endpoint_upstream_error"
    assert '"code":"model_load_failed"' in plain.body["error"]["message"].replace(" ", "")
    assert stream.status == 500  # a stream's status passes through
    assert stream.sent["stream_options"] == {"include_usage": True}
    assert log.count(ACCESS) == 2  # once each: never retried


def test_a_request_past_the_load_wait_is_503_model_loading_with_retry_after(world: World) -> None:
    world.hub.cdn.rate_limit(SIZE / 20)  # the download takes about 20 s
    with running_node(api_key=KEY, LOAD_WAIT="1", ADVERTISE="catalog") as node:
        lb = LoadBalancer()
        lb.register("node-1", node.url, KEY)
        stream = lb.forward(None, "/v1/chat/completions", {**CHAT, "stream": True})
        plain = lb.forward(None, "/v1/chat/completions", CHAT)
        lb.close()

    assert stream.status == 503 and int(stream.headers["retry-after"]) >= 1
    assert stream.events == [] or stream.events[0]["error"]["code"] == "model_loading"
    assert plain.status == 502 and "model_loading" in plain.body["error"]["message"]


# -- connections -----------------------------------------------------------------------------
def test_an_idle_connection_outlives_the_lbs_pool(world: World) -> None:
    """The LB keeps an idle connection 60 s (src/bootstrap.rs:97) and may reuse it until then:
    the node must not close it first. Real time: one minute idle on a real socket."""
    request = b"GET /api/health HTTP/1.1\r\nHost: node\r\n\r\n"
    with running_node() as node, socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(request)
        first = _read_response(sock)
        time.sleep(61)
        sock.sendall(request)
        second = _read_response(sock)

    assert KEEP_ALIVE_TIMEOUT > 60
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200")


def _read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body (b"" if the node closed the connection)."""
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))  # fmt: skip
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body
