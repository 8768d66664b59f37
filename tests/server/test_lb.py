"""The load balancer's contract: `/api/health` and `/api/system`, polled by our LB stand-in.

The node is a real `llmlb-node serve` subprocess; the LB stand-in (tests/lb.py) polls it with its
API key as llmlb does and checks every answer's shape. Busy (a full queue on a loaded model) needs
a model llama.cpp can load: see tests/e2e/test_lb.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from lb import LoadBalancer
from node import running_node
from starlette.testclient import TestClient
from world import FILENAME, MODEL_ID, SIZE, World

from llmlb_node import __version__, backend
from llmlb_node.server.app import create_app
from llmlb_node.server.pool import ModelPool
from llmlb_node.server.settings import ServerSettings

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}
KEY = "lb-key"


def _meminfo_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def test_lb_registers_the_node_and_polls_it_with_its_api_key(world: World) -> None:
    lb = LoadBalancer()
    with running_node(api_key=KEY) as node:
        endpoint = lb.register("node-1", node.url, KEY)
        health = lb.poll("node-1")
        system = lb.system("node-1")
        lb.register("intruder", node.url, "wrong-key")
        refused = [lb.poll("intruder"), lb.poll("intruder")]

    assert health is not None and endpoint.status == "online"
    assert endpoint.polled_with == ["/api/health"] and endpoint.models == [MODEL_ID]
    assert health["gpu"]["device_count"] == 0 and health["gpu"]["devices"] == []
    assert health["memory"]["ram_total_bytes"] == _meminfo_total()
    assert 0 < health["memory"]["ram_used_bytes"] < health["memory"]["ram_total_bytes"]
    assert health["memory"]["vram_total_bytes"] == 0
    assert health["load"] == {"active_requests": 0, "max_concurrent_requests": 2 * (1 + 32)}
    assert health["sync_state"] == "idle" and health["sync_progress"] is None
    assert health["loaded_models"] == [] and health["version"] == __version__
    assert system["device"] == {"device_type": "cpu", "gpu_devices": []}
    assert system["version"] == __version__
    assert system["llama_cpp"] == {"version": backend.installed_version(), "gpu_offload": False}
    assert refused == [None, None] and lb.endpoints["intruder"].status == "offline"
    assert world.requests() == 0  # polling never touches a model source


def test_health_reports_a_download_while_it_runs_then_its_success(world: World) -> None:
    world.hub.cdn.rate_limit(SIZE / 3)  # about three seconds
    lb = LoadBalancer()
    with running_node(api_key=KEY, MAX_LOADED_MODELS="3", MAX_QUEUE="4") as node:
        lb.register("node-1", node.url, KEY)
        chat = threading.Thread(target=node.post, args=("/v1/chat/completions", CHAT))
        chat.start()
        seen = []
        node.wait_for(
            lambda: seen.append(lb.poll("node-1")) or _downloading(seen[-1]),
            what="sync_state running with bytes",
        )
        chat.join()  # the tiny model downloads, then fails to load (500): not a sync failure
        after = lb.poll("node-1")

    running = seen[-1]
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


def _downloading(health: dict | None) -> bool:
    progress = (health or {}).get("sync_progress") or {}
    return health["sync_state"] == "running" and 0 < progress.get("downloaded_bytes", 0) < SIZE


def test_health_reports_a_failed_download_as_failed(world: World) -> None:
    world.hub.refuse()
    world.proxy.refuse()
    lb = LoadBalancer()
    with running_node() as node:
        lb.register("node-1", node.url)
        status, _, _ = node.post("/v1/chat/completions", CHAT)
        health = lb.poll("node-1")

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

    assert before.status_code == 200 and before.json()["status"] == "online"
    assert during.status_code == 503 and during.json()["status"] == "offline"


@pytest.mark.parametrize("path", ["/api/health", "/api/system"])
def test_lb_routes_require_the_api_key(world: World, path: str) -> None:
    with running_node(api_key=KEY) as node:
        status, _, body = node.get(path, headers={"Authorization": "Bearer nope"})

    assert status == 401 and body["error"]["code"] == "invalid_api_key"
