"""`llmlb-node serve` against clients that lie, break off or crowd in: a real node subprocess.

Every malformed request is a 400 naming its parameter before any model is touched (the `tiny`
model of the test world cannot load, so a request that got past validation would answer 500
model_load_failed); auth covers every route; the node keeps serving through all of it.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import time

import httpx
import pytest
from node import Node, running_node
from world import MODEL_ID, World

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}
USER = {"role": "user", "content": "x"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.fixture
def node(world: World):  # noqa: ANN201
    with running_node() as node:
        yield node


BAD_CHATS = [
    # keep_alive that no timer can hold (NaN would corrupt the event loop's timer order)
    (b'{"model":"tiny","messages":[{"role":"user","content":"x"}],"keep_alive":NaN}', "keep_alive"),
    (
        b'{"model":"tiny","messages":[{"role":"user","content":"x"}],"keep_alive":1e999}',
        "keep_alive",
    ),
    ({**CHAT, "keep_alive": 10**400}, "keep_alive"),
    ({**CHAT, "n": 1.0}, "n"),
    ({**CHAT, "n": -1}, "n"),
    ({**CHAT, "max_tokens": -5}, "max_tokens"),
    ({**CHAT, "max_tokens": 10**30}, "max_tokens"),
    ({**CHAT, "max_tokens": 2.5}, "max_tokens"),
    ({**CHAT, "temperature": "0.5"}, "temperature"),
    ({**CHAT, "seed": 2**64}, "seed"),
    ({**CHAT, "logit_bias": {"-5": 1}}, "logit_bias"),
    ({**CHAT, "logit_bias": {"99999999999999999999": 1}}, "logit_bias"),
    ({**CHAT, "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ({"model": MODEL_ID, "messages": [{"content": "x"}]}, "messages[0].role"),
    ({"model": MODEL_ID, "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": MODEL_ID, "messages": [{"role": "assistant"}]}, "messages[0].content"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": [1]}]}, "messages[0].content[0]"),
    (
        {"model": MODEL_ID, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content[0]",
    ),
    (
        {"model": MODEL_ID, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "messages[0].content[0].text",
    ),
    (
        {"model": MODEL_ID, "messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]},
        "messages[0].tool_calls",
    ),
    ({**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
    (
        {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": 5}}]},
        "tools",
    ),
    ({**CHAT, "tools": ["f"]}, "tools"),
    ({**CHAT, "tools": [TOOL], "tool_choice": "banana"}, "tool_choice"),
    ({**CHAT, "tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice"),
    (
        {**CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
        "tool_choice",
    ),
    ({**CHAT, "response_format": {"type": "json_object", "schema": 5}}, "response_format"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": 5}}, "response_format"),
    (b"[" * 100_000 + b"]" * 100_000, None),  # deeper than Python's parser: not a 500
    (b'{"model": "tiny", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", None),
]


def test_malformed_chat_requests_are_400_naming_the_parameter(node: Node) -> None:
    answers = [node.post("/v1/chat/completions", body) for body, _ in BAD_CHATS]

    for (body, param), (status, _, answer) in zip(BAD_CHATS, answers, strict=True):
        assert status == 400, (body if len(str(body)) < 300 else param, answer)
        assert answer["error"]["param"] == param, answer
        assert "Traceback" not in json.dumps(answer)
    assert node.get("/api/health")[0] == 200
    assert "Traceback" not in node.log


def test_well_formed_tool_and_part_requests_pass_validation(node: Node) -> None:
    """The shapes the openai client sends get past validation (to the model, which is `tiny`
    and cannot load: 500 model_load_failed, not 400)."""
    goods = [
        {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
        },
        {**CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
        {**CHAT, "tools": [TOOL], "tool_choice": "auto"},
        {
            "model": MODEL_ID,
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "1", "content": "42"},
            ],
        },
        {**CHAT, "logit_bias": {"15": -100}, "seed": -1, "n": 1, "keep_alive": "5m"},
        {**CHAT, "response_format": {"type": "json_object", "schema": {"type": "object"}}},
    ]
    answers = [node.post("/v1/chat/completions", body) for body in goods]

    assert [(s, a["error"]["code"]) for s, _, a in answers] == [(500, "model_load_failed")] * len(
        goods
    )


def test_a_body_past_the_limit_is_413_and_the_node_keeps_serving(node: Node) -> None:
    from llmlb_node.server.openai import MAX_BODY_BYTES

    huge = b'{"model": "tiny", "prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(  # refused on its Content-Length, before a byte of it is read
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n{" % len(huge)
        )
        declared = b""
        while b"}}" not in declared and (chunk := sock.recv(65536)):
            declared += chunk
    # Chunked: no Content-Length to refuse up front; the node stops reading at the limit.
    chunks = (huge[i : i + (1 << 20)] for i in range(0, len(huge), 1 << 20))
    try:
        streamed = httpx.post(node.url + "/v1/completions", content=chunks, timeout=30)
        streamed_status = streamed.status_code
    except httpx.HTTPError:  # the node may answer and close while we still send
        streamed_status = 413
    after = node.post("/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 1})

    assert declared.startswith(b"HTTP/1.1 413 ") and b'"request_too_large"' in declared
    assert streamed_status == 413
    assert after[0] == 500 and after[2]["error"]["code"] == "model_load_failed"


def _route_calls() -> list[tuple[str, str]]:
    """Every (method, path) of the app's route table but the operator page's public files, so
    that a new route cannot skip the sweep, plus a path no route matches."""
    from llmlb_node.server import ui
    from llmlb_node.server.app import routes

    calls = [
        (method, re.sub(r"{[^}]+}", MODEL_ID, route.path_format))
        for route in routes
        for method in sorted(route.methods or ())
    ]
    guarded = [(method, path) for method, path in calls if not ui.is_public(path)]
    return [*guarded, ("GET", "/no/such/route")]


ROUTES = _route_calls()


def test_the_sweep_covers_the_routes_a_client_uses_most() -> None:
    expected = {("POST", "/v1/chat/completions"), ("HEAD", f"/v0/models/blob/{MODEL_ID}")}
    assert expected <= set(ROUTES) and ("GET", "/") not in ROUTES


def test_every_route_requires_the_key_and_the_scheme_is_case_insensitive(world: World) -> None:
    wrong = ["", "Bearer", "Bearer ", "Bearer wrong", "Basic s3cret", "s3cret", "Bearer s3cret2"]
    with running_node(api_key="s3cret") as node:
        refused = {
            (method, path, given): node.request(
                method, path, b"{}", headers={"Authorization": given}
            )[0]
            for method, path in ROUTES
            for given in wrong
        }
        lower = node.get("/api/health", headers={"Authorization": "bearer s3cret"})
        upper = node.get("/api/health", headers={"Authorization": "BEARER s3cret"})
        state = node.get(f"/v0/models/{MODEL_ID}/status")[2]

    assert {k: v for k, v in refused.items() if v != 401} == {}
    assert lower[0] == 200 and upper[0] == 200
    assert state["state"] == "unloaded" or state["active_requests"] == 0
    assert world.requests() == 0  # nothing refused reached a download


def test_a_crowd_past_the_queue_gets_429_with_retry_after_and_leaves_nothing_held(
    world: World,
) -> None:
    world.hub.cdn.rate_limit(len(world.content) / 8)  # the download takes about 8 s
    with running_node(MAX_QUEUE="32", LOAD_WAIT="60") as node:
        body = {"model": MODEL_ID, "prompt": "x", "max_tokens": 1}

        def one(_: int) -> tuple[int, dict[str, str], object]:
            return node.post("/v1/completions", body, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(50) as crowd:
            futures = [crowd.submit(one, i) for i in range(50)]
            node.wait_for(lambda: sum(f.done() for f in futures) >= 18, timeout=20, what="the 429s")
            busy = [f.result() for f in futures if f.done()]
            world.hub.cdn.rate_limit(None)
            answers = [f.result() for f in futures]
        status = node.get(f"/v0/models/{MODEL_ID}/status")[2]
        after = one(0)

    assert len(busy) == 18
    assert all(s == 429 and int(h["retry-after"]) >= 1 for s, h, _ in busy), busy
    assert sorted(s for s, _, _ in answers) == [429] * 18 + [500] * 32  # tiny cannot load
    assert (status["active_requests"], status["queued"]) == (0, 0)
    assert after[0] == 500 and after[2]["error"]["code"] == "model_load_failed"


def _send(node: Node, path: str, body: dict) -> socket.socket:
    """A request on a raw socket, left unread (the caller closes it to leave)."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", node.port))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def _queued(node: Node) -> int:
    return node.get(f"/v0/models/{MODEL_ID}/status", timeout=10)[2]["queued"]


def test_clients_that_leave_while_queued_give_their_places_back_at_once(world: World) -> None:
    """They kept their LLMLB_MAX_QUEUE places until their turn (here: until the load)."""
    world.hub.cdn.rate_limit(len(world.content) / 120)  # the download would take two minutes
    with running_node(MAX_QUEUE="2", LOAD_WAIT="300") as node:
        one = {"model": MODEL_ID, "prompt": "x", "max_tokens": 1}
        socks = [
            _send(node, "/v1/completions", one),
            _send(node, "/v1/completions", {**one, "stream": True}),
        ]
        node.wait_for(lambda: _queued(node) == 2, what="both completions to queue")
        full = node.post("/v1/completions", one, timeout=10)
        socks.append(_send(node, "/v1/embeddings", {"model": MODEL_ID, "input": "x"}))
        node.wait_for(lambda: _queued(node) == 3, what="the embedding to queue")
        for sock in socks:
            sock.close()
        node.wait_for(lambda: _queued(node) == 0, timeout=20, what="the places to come back")
        world.hub.cdn.rate_limit(None)
        after = node.post("/v1/completions", one, timeout=60)
        log = node.log

    assert full[0] == 429
    assert after[0] == 500 and after[2]["error"]["code"] == "model_load_failed"  # tiny
    assert log.count("status=499") >= 2
    assert "never retrieved" not in log and "never awaited" not in log


def test_clients_that_never_send_their_body_do_not_stop_the_node(node: Node) -> None:
    """Slowloris: 100 connections send headers promising a body and never send it (or stop
    mid-headers); the node answers everyone else at once, and their leaving leaves no trace."""
    socks = []
    for i in range(100):
        sock = socket.create_connection(("127.0.0.1", node.port))
        if i % 2:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"mod'
            )
        else:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        socks.append(sock)
    started = time.monotonic()
    health = node.get("/api/health", timeout=10)
    bad = node.post("/v1/chat/completions", {"model": MODEL_ID}, timeout=10)
    elapsed = time.monotonic() - started
    for sock in socks:
        sock.close()
    node.wait_for(lambda: "status=499" in node.log, what="the abandoned bodies to be noted")
    after = node.get("/api/health")

    assert health[0] == 200 and bad[0] == 400
    assert elapsed < 5
    assert after[0] == 200 and after[2]["load"]["active_requests"] == 0
    assert "Traceback" not in node.log


def test_paths_and_ids_that_try_to_leave_the_store_are_404(node: Node, world: World) -> None:
    node.post("/api/models/pull", {"model": MODEL_ID, "stream": False})
    assert world.installed_path().exists()
    attempts = [
        "/v0/models/%2e%2e%2fetc/status",
        "/v0/models/blob/..%2f..",
        "/v0/models/blob/..%2f..%2fetc%2fpasswd",
        "/v0/models/blob/%2fetc%2fpasswd",
        f"/v0/models/blob/{MODEL_ID}?file=../../etc/passwd",
        f"/v0/models/blob/{MODEL_ID}?file=/etc/passwd",
        f"/v0/models/blob/{MODEL_ID}?file=..%2f..%2f..%2fcatalog.json",
        f"/v0/models/blob/{MODEL_ID}?file=%00",
        f"/v0/models/blob/{MODEL_ID}%00",
        "/v0/models/blob/%F0%9F%A6%99",
        "/v1/models/%00",
        "/v1/models/" + "a" * 5000,
    ]
    answers = {path: node.get(path) for path in attempts}
    deleted = node.request("DELETE", "/api/models/..%2f..")
    real = node.get(f"/v0/models/blob/{MODEL_ID}")

    assert {p: s for p, (s, _, _) in answers.items() if s != 404} == {}
    assert all("root:" not in json.dumps(a) for _, _, a in answers.values())
    assert deleted[0] == 404
    assert real[0] == 200 and world.installed_path().exists()


@pytest.mark.parametrize("keep_alive", [1e12, "99999999h"])
def test_a_keep_alive_past_any_clock_is_forever_and_api_ps_still_answers(
    node: Node, keep_alive: object
) -> None:
    """Accepted, then /api/ps answered 500 while the model stayed: its expiry overflowed a date."""
    body = {"model": MODEL_ID, "prompt": "x", "max_tokens": 1, "keep_alive": keep_alive}
    answer = node.post("/v1/completions", body)
    ps = node.get("/api/ps")

    assert answer[0] == 500 and answer[2]["error"]["code"] == "model_load_failed"  # tiny
    assert ps[0] == 200, ps
    assert [row["expires_at"] for row in ps[2]["models"]] == [None]  # kept forever


def test_a_keep_alive_timer_cancelled_by_the_next_request_leaves_no_warning(world: World) -> None:
    """Each timer held a coroutine made when it was set: cancelled, it was never awaited."""
    with running_node(KEEP_ALIVE="1s") as node:
        one = {"model": MODEL_ID, "prompt": "x", "max_tokens": 1}
        answers = [node.post("/v1/completions", one)[0] for _ in range(3)]  # each cancels one
        time.sleep(2.5)  # past every timer: the loop drops the cancelled ones
        log = node.log

    assert answers == [500, 500, 500]  # tiny cannot load; its keep-alive timer runs all the same
    assert "never awaited" not in log and "Traceback" not in log
