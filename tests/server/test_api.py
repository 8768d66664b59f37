"""`llmlb-node serve` as a real subprocess, its API checked with the official openai client.

The `tiny` model of the test world is a GGUF header with filler: it downloads and verifies like
any model but llama.cpp cannot load it. Generation with a real model is in tests/e2e/test_serve.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from node import running_node
from world import MODEL_ID, World

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}


def _client(node, **kwargs) -> openai.OpenAI:  # noqa: ANN001 - tests/node.py's Node
    return openai.OpenAI(base_url=node.base_url, api_key=kwargs.pop("api_key", "none"), **kwargs)


def test_unknown_model_is_model_not_found_with_close_ids_and_no_network(world: World) -> None:
    with running_node() as node:
        client = _client(node, max_retries=0)
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(
                model="tinyy", messages=[{"role": "user", "content": "x"}]
            )
        status, _, body = node.get("/v1/models/tinyy")
        stream_status, _, _ = node.post(
            "/v1/chat/completions", {**CHAT, "model": "../x", "stream": True}
        )

    assert caught.value.code == "model_not_found"
    assert caught.value.body["param"] == "model"
    assert "Did you mean: tiny?" in caught.value.message
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert stream_status == 404
    assert world.requests() == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": MODEL_ID}, "messages"),
        ({"model": MODEL_ID, "messages": "hello"}, "messages"),
        ({"model": MODEL_ID, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "temperature": 3}, "temperature"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": True}, "max_tokens"),
        ({**CHAT, "stop": [1]}, "stop"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "n": 65}, "n"),
        ({**CHAT, "response_format": {"type": "xml"}}, "response_format"),
        ({**CHAT, "keep_alive": "soon"}, "keep_alive"),
        ({**CHAT, "model": 7}, "model"),
        ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),  # no stream
        ({**CHAT, "stream": True, "stream_options": {"include_usage": 1}}, "stream_options"),
        ({**CHAT, "stream": True, "stream_options": []}, "stream_options"),
    ],
)
def test_bad_chat_requests_are_400_naming_the_parameter(
    node_for_world, body: object, param: str | None
) -> None:
    status, _, answer = node_for_world.post("/v1/chat/completions", body)

    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param
    if param:
        assert param.split("[")[0] in answer["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": MODEL_ID}, "prompt"),
        ("/v1/completions", {"model": MODEL_ID, "prompt": {"a": 1}}, "prompt"),
        ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "echo": 1}, "echo"),
        (
            "/v1/completions",
            {
                "model": MODEL_ID,
                "prompt": "x",
                "stream": True,
                "stream_options": {"include_usage": "y"},
            },
            "stream_options",
        ),
        (
            "/v1/completions",
            {"model": MODEL_ID, "prompt": "x", "stream_options": {}},
            "stream_options",
        ),
        ("/v1/embeddings", {"model": MODEL_ID}, "input"),
        ("/v1/embeddings", {"model": MODEL_ID, "input": [1.5]}, "input"),
        (
            "/v1/embeddings",
            {"model": MODEL_ID, "input": "x", "encoding_format": "hex"},
            "encoding_format",
        ),
    ],
)
def test_bad_completion_and_embedding_requests_are_400(
    node_for_world, path: str, body: dict, param: str
) -> None:
    status, _, answer = node_for_world.post(path, body)

    assert status == 400, answer
    assert answer["error"]["param"] == param


def test_openai_client_gets_bad_request_error(node_for_world) -> None:
    client = _client(node_for_world, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_ID, messages=[], max_tokens=4)
    assert caught.value.body["param"] == "messages"


def test_unknown_route_and_method_answer_in_openai_shape(node_for_world) -> None:
    status, _, body = node_for_world.get("/v1/nothing")
    method_status, _, _ = node_for_world.get("/v1/chat/completions")

    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    assert method_status == 405


def test_models_lists_what_is_installed_and_supported_models_the_catalog(world: World) -> None:
    world.add_model("other", {"other.gguf": b"GGUF" + bytes(100)})
    world.add_model("onnx-one", {"m.onnx": b"x" * 10}, format="onnx", engine="onnxruntime")
    with running_node() as node:
        client = _client(node)
        empty = client.models.list()
        one = client.models.retrieve(MODEL_ID)  # a catalog model is known before it is installed
        supported_status, _, supported = node.get("/v0/supported-models")
        status_code, _, status = node.get(f"/v0/models/{MODEL_ID}/status")
        missing_code, _, missing = node.get("/v0/models/nope/status")
        pulled, _, _ = node.post("/api/models/pull", {"model": MODEL_ID, "stream": False})
        _, _, listed = node.get("/v1/models")
        _, _, done = node.get(f"/v0/models/{MODEL_ID}/status")

    assert empty.data == []  # nothing on disk: nothing a load balancer should route here
    assert one.id == MODEL_ID and one.object == "model" and one.owned_by == "llmlb-node"
    assert supported_status == 200
    rows = {r["id"]: r for r in supported["models"]}
    assert set(rows) == {MODEL_ID, "other", "onnx-one"}
    assert rows[MODEL_ID]["source"] == "hf_gguf"
    assert rows[MODEL_ID]["repo_id"] == "test-org/tiny-GGUF"
    assert rows[MODEL_ID]["is_local"] is False and rows[MODEL_ID]["tags"] == ["test"]
    assert rows["onnx-one"]["source"] == "hf_onnx" and rows["onnx-one"]["runnable"] is False
    assert status_code == 200
    assert status["model_id"] == MODEL_ID
    assert status["status"] == "error" and status["stage"] == "missing"  # the contract's four
    assert status["error_message"] == "not on this node; a request for it downloads it"
    assert status["progress"] == 0.0 and status["downloaded_bytes"] == 0
    assert status["total_bytes"] == len(world.content)
    assert "local_path" in status
    assert missing_code == 404 and missing["error"]["code"] == "model_not_found"
    assert pulled == 200
    assert [m["id"] for m in listed["data"]] == [MODEL_ID]
    assert listed["data"][0]["status"] == "completed" and listed["data"][0]["loaded"] is False
    assert isinstance(listed["data"][0]["created"], int)
    assert done["status"] == "completed" and done["stage"] == "completed"
    assert done["downloaded_bytes"] == done["total_bytes"] == len(world.content)


def test_advertise_catalog_lists_every_runnable_catalog_model(world: World) -> None:
    world.add_model("other", {"other.gguf": b"GGUF" + bytes(100)})
    world.add_model("onnx-one", {"m.onnx": b"x" * 10}, format="onnx", engine="onnxruntime")
    with running_node(ADVERTISE="catalog") as node:
        listed = _client(node).models.list()
        _, _, raw = node.get("/v1/models")

    assert [m.id for m in listed.data] == [MODEL_ID, "other"]  # onnx-one: not runnable here
    assert raw["data"][0]["status"] == "error" and raw["data"][0]["loaded"] is False
    assert world.requests() == 0


def test_download_failure_is_502_naming_each_source_then_retried_after_a_while(
    world: World,
) -> None:
    world.hub.refuse()
    world.proxy.refuse()
    with running_node() as node:
        first, headers, body = node.post("/v1/chat/completions", CHAT)
        again, _, _ = node.post("/v1/chat/completions", CHAT)
        _, _, status = node.get(f"/v0/models/{MODEL_ID}/status")

    assert first == 502, body
    assert body["error"]["code"] == "download_failed"
    assert body["error"]["type"] == "server_error"
    assert "huggingface:test-org/tiny-GGUF: [refused]" in body["error"]["message"]
    assert "llmlb-proxy: [refused]" in body["error"]["message"]
    assert "test-key" not in body["error"]["message"]
    assert again == 502
    assert status["status"] == "error" and status["error_message"]


def test_a_failed_download_is_answered_from_memory_briefly_then_retried(world: World) -> None:
    world.hub.refuse()
    world.proxy.refuse()
    # The window leaves a loaded machine time for the second request to fall inside it.
    with running_node(RETRY_FAILED_AFTER="6") as node:
        assert node.post("/v1/chat/completions", CHAT)[0] == 502
        failed_by = time.monotonic()
        world.hub.restore()
        world.proxy.restore()
        cached, _, _ = node.post("/v1/chat/completions", CHAT)  # within 6 s: no new attempt
        requests_meanwhile = world.requests()
        time.sleep(max(0.0, failed_by + 6.2 - time.monotonic()))
        retried, _, body = node.post("/v1/chat/completions", CHAT)

    assert cached == 502
    assert requests_meanwhile == 0
    assert retried == 500, body  # downloaded this time; the fake GGUF cannot load
    assert world.installed_path().exists()


def test_a_model_llama_cpp_cannot_load_is_500_model_load_failed(world: World) -> None:
    with running_node() as node:
        client = _client(node, max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(model=MODEL_ID, prompt="x", max_tokens=2)

    assert caught.value.code == "model_load_failed"
    assert MODEL_ID in caught.value.message


def test_api_key_is_required_on_every_route_when_set(world: World) -> None:
    with running_node(api_key="s3cret", ADVERTISE="catalog") as node:
        no_key = node.get("/v1/models", headers={"Authorization": ""})
        wrong = node.get("/v0/supported-models", headers={"Authorization": "Bearer nope"})
        right = node.get("/v1/models")
        listed = _client(node, api_key="s3cret").models.list()
        with pytest.raises(openai.AuthenticationError) as caught:
            _client(node, api_key="wrong", max_retries=0).models.list()

    assert no_key[0] == 401 and no_key[2]["error"]["code"] == "invalid_api_key"
    assert wrong[0] == 401
    assert right[0] == 200
    assert [m.id for m in listed.data] == [MODEL_ID]
    assert caught.value.status_code == 401


def test_one_access_log_line_per_request(world: World) -> None:
    with running_node() as node:
        node.get("/v1/models")
        node.post("/v1/chat/completions", {**CHAT, "model": "absent"})
        # The line is written once the response is sent, so it may follow the client's read.
        node.wait_for(lambda: node.log.count("llmlb_node.server.access") >= 2, 30, "2 lines")
        log = node.log

    lines = [line for line in log.splitlines() if "llmlb_node.server.access" in line]
    assert len(lines) == 2
    assert "GET /v1/models model=- status=200 latency=" in lines[0]
    assert "POST /v1/chat/completions model=absent status=404 latency=" in lines[1]
    assert "tokens=" in lines[1]


_NO_STARLETTE = """
import sys
sys.modules["starlette"] = None  # as if the server extra were not installed
import llmlb_node
from llmlb_node.cli import main
sys.exit(main(["serve"]))
"""


def test_serve_without_the_server_extra_exits_2_with_the_pip_command(world: World) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _NO_STARLETTE],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )

    assert done.returncode == 2
    assert "pip install 'llmlb-node[server]'" in done.stderr


@pytest.fixture
def node_for_world(world: World):  # noqa: ANN201
    with running_node() as node:
        yield node


def test_a_waiting_stream_gets_progress_comments_then_model_loading_past_the_wait(
    world: World,
) -> None:
    world.hub.cdn.rate_limit(len(world.content) / 12)  # the download takes about 12 s
    with running_node(LOAD_WAIT="5") as node:
        started = time.monotonic()
        with httpx.stream(
            "POST", node.url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60
        ) as response:
            lines = [(time.monotonic() - started, line) for line in response.iter_lines()]
        plain, headers, body = node.post("/v1/chat/completions", CHAT)
        world.hub.cdn.rate_limit(None)
        node.wait_for(lambda: world.installed_path().exists(), what="the download to go on")

    assert response.status_code == 200, lines
    comments = [(t, line) for t, line in lines if line.startswith(": ")]
    assert comments, lines
    assert all("downloading" in line and "%" in line for _, line in comments)
    gaps = [b - a for (a, _), (b, _) in zip([(0.0, "")] + comments, comments, strict=False)]
    assert max(gaps) <= 4.0 + 3.0, lines  # one per 4 s heartbeat, with room for a loaded machine
    events = [line for _, line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert error["code"] == "model_loading" and "downloading" in error["message"]
    assert plain == 503 and body["error"]["code"] == "model_loading"
    assert int(headers["retry-after"]) >= 1


def test_max_completion_tokens_is_passed_as_max_tokens() -> None:
    from llmlb_node.server.openai import parse_chat

    messages = [{"role": "user", "content": "Hi"}]
    newer = parse_chat({"model": "m", "messages": messages, "max_completion_tokens": 7})
    both = parse_chat(
        {"model": "m", "messages": messages, "max_tokens": 3, "max_completion_tokens": 7}
    )

    assert newer.kwargs["max_tokens"] == 7 and "max_completion_tokens" not in newer.kwargs
    assert both.kwargs["max_tokens"] == 3  # the older field wins when both are given
