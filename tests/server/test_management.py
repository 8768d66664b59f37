"""The model management API (/api/models/pull, /api/tags, /api/ps, unload, delete) and /metrics,
against a real `llmlb-node serve` subprocess and the loopback Hub.

The `tiny` model downloads and verifies like any model but llama.cpp cannot load it; loaded
models (ps, unload, delete while in use) are in tests/e2e/test_operate.py with the real Gemma.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any

from node import Node, running_node
from prometheus_client.parser import text_string_to_metric_families
from world import FILENAME, MODEL_ID, World

from llmlb_node.server.metrics import NodeMetrics

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}


def pull_lines(node: Node, body: dict[str, Any]) -> tuple[int, list[tuple[float, Any]]]:
    """POST /api/models/pull and read its NDJSON lines as they arrive: (status, [(t, line)])."""
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    conn.request("POST", "/api/models/pull", json.dumps(body), {"Content-Type": "x"})
    response = conn.getresponse()
    lines = []
    while raw := response.readline():
        lines.append((time.monotonic(), json.loads(raw)))
    conn.close()
    return response.status, lines


def metric_samples(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, text = node.get("/metrics")
    content_type = {k.lower(): v for k, v in headers.items()}["content-type"]
    assert status == 200 and content_type.startswith("text/plain; version="), text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_pull_streams_a_line_per_10_percent_at_most_5_a_second_then_success(
    world: World,
) -> None:
    world.hub.cdn.rate_limit(100_000)  # 300 kB in about 3 s
    with running_node(DOWNLOAD_CONNECTIONS="1") as node:
        started = time.monotonic()
        status, lines = pull_lines(node, {"model": MODEL_ID, "stream": True})
        took = time.monotonic() - started
        _, _, tags = node.get("/api/tags")

    assert status == 200
    assert lines[-1][1] == {"status": "success"}
    progress = [line for _, line in lines[:-1]]
    assert all(set(line) == {"status", "completed", "total", "speed"} for line in progress)
    downloading = [line for line in progress if line["status"] == "downloading"]
    assert all(line["total"] == len(world.content) for line in downloading)
    deciles = {line["completed"] * 10 // line["total"] for line in downloading}
    assert set(range(1, 10)) <= deciles, deciles  # a line for every 10% step
    assert any(line["speed"] > 0 for line in downloading)
    assert len(lines) <= 5 * took + 1  # at most 5 lines a second
    assert [m["id"] for m in tags["models"]] == [MODEL_ID]


def test_pull_without_stream_waits_and_tags_lists_the_install_record(world: World) -> None:
    with running_node() as node:
        status, _, body = node.post("/api/models/pull", {"model": MODEL_ID, "stream": False})
        _, _, tags = node.get("/api/tags")
        again, _, _ = node.post("/api/models/pull", {"model": MODEL_ID, "stream": False})

    assert status == 200 and body == {"status": "success"}
    (row,) = tags["models"]
    size = len(world.content)
    assert row["id"] == MODEL_ID
    assert row["files"] == [{"filename": FILENAME, "size": size, "sha256": world.sha256}]
    assert row["size"] == size and row["sha256"] == world.sha256
    assert row["source"] == "huggingface:test-org/tiny-GGUF"
    assert row["installed_at"].endswith("+00:00")
    assert again == 200
    assert world.hub.cdn.bytes_sent == len(world.content)  # the second pull found it installed


def test_a_pull_and_an_inference_request_share_one_download(world: World) -> None:
    world.hub.cdn.rate_limit(150_000)
    with running_node(DOWNLOAD_CONNECTIONS="1") as node:
        answers: list[int] = []
        chat = threading.Thread(
            target=lambda: answers.append(node.post("/v1/chat/completions", CHAT)[0])
        )
        chat.start()
        node.wait_for(
            lambda: node.get(f"/v0/models/{MODEL_ID}/status")[2]["status"] == "downloading",
            what="the inference-triggered download",
        )
        status, lines = pull_lines(node, {"model": MODEL_ID})
        chat.join(60)

    assert status == 200 and lines[-1][1] == {"status": "success"}
    assert answers == [500]  # downloaded, then llama.cpp cannot load the fake GGUF
    assert world.hub.cdn.bytes_sent == len(world.content)  # one download for both


def test_pull_errors_are_openai_shaped(world: World) -> None:
    world.hub.refuse()
    world.proxy.refuse()
    with running_node() as node:
        unknown, _, unknown_body = node.post("/api/models/pull", {"model": "tinyy"})
        missing, _, missing_body = node.post("/api/models/pull", {"stream": True})
        waited, _, waited_body = node.post("/api/models/pull", {"model": MODEL_ID, "stream": False})
        status, lines = pull_lines(node, {"model": MODEL_ID})

    assert unknown == 404 and unknown_body["error"]["code"] == "model_not_found"
    assert missing == 400 and missing_body["error"]["param"] == "model"
    assert waited == 502 and waited_body["error"]["code"] == "download_failed"
    assert status == 200
    last = lines[-1][1]
    assert last["error"]["code"] == "download_failed"
    assert "llmlb-proxy: [refused]" in last["error"]["message"]


def test_tags_ps_unload_and_delete_without_a_loaded_model(world: World) -> None:
    with running_node() as node:
        node.post("/api/models/pull", {"model": MODEL_ID, "stream": False})
        _, _, ps = node.get("/api/ps")
        unload, _, unload_body = node.post("/api/models/unload", {"model": MODEL_ID})
        unknown_unload, _, _ = node.post("/api/models/unload", {"model": "nope"})
        deleted, _, deleted_body = node.request("DELETE", f"/api/models/{MODEL_ID}")
        again, _, again_body = node.request("DELETE", f"/api/models/{MODEL_ID}")
        _, _, tags = node.get("/api/tags")

    assert ps == {"models": []}
    assert unload == 200 and unload_body == {"model": MODEL_ID, "status": "not_loaded"}
    assert unknown_unload == 404
    assert deleted == 200 and deleted_body == {"model": MODEL_ID, "status": "deleted"}
    assert not world.installed_path().exists()
    assert again == 404 and again_body["error"]["code"] == "not_found"
    assert tags == {"models": []}


def test_metrics_count_requests_downloads_and_resolves(world: World) -> None:
    with running_node() as node:
        node.post("/v1/chat/completions", CHAT)  # downloads, then cannot load: 500
        node.post("/v1/chat/completions", {**CHAT, "model": "no-such-model"})
        node.get("/v1/models")
        node.get("/no/such/path")
        samples = metric_samples(node)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    chat = "/v1/chat/completions"
    assert value("llmlb_requests_total", model=MODEL_ID, route=chat, status="500") == 1
    assert value("llmlb_requests_total", model="-", route=chat, status="404") == 1
    assert value("llmlb_requests_total", model="-", route="/v1/models", status="200") == 1
    assert value("llmlb_requests_total", model="-", route="other", status="404") == 1
    assert value("llmlb_request_duration_seconds_count", model=MODEL_ID, route=chat) == 1
    source = "huggingface:test-org/tiny-GGUF"
    assert value("llmlb_downloaded_bytes_total", source=source) == len(world.content)
    assert value("llmlb_resolves_total", outcome="downloaded") == 1
    assert value("llmlb_loaded_models") == 0
    assert not any(name.startswith(("python_", "process_")) for name, _ in samples)  # own registry


def test_each_app_has_its_own_registry() -> None:
    one, two = NodeMetrics(), NodeMetrics()  # the global registry would refuse the second
    one.resolved("m", "local")

    assert one.resolves.labels("local")._value.get() == 1
    assert two.resolves.labels("local")._value.get() == 0


def test_embeddings_count_prompt_tokens_only() -> None:
    from llmlb_node.server.metrics import RequestRecord

    metrics = NodeMetrics()
    state = {"model": "m", "tokens": 7, "prompt_tokens": 7}
    metrics.observe(RequestRecord({"state": state}, "/v1/embeddings", 200, 0.01))
    metrics.observe(RequestRecord({"state": {**state, "tokens": 3}}, "/v1/completions", 200, 0.1))

    assert metrics.prompt_tokens.labels("m")._value.get() == 14
    assert metrics.completion_tokens.labels("m")._value.get() == 3
