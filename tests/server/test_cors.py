"""LLMLB_NODE_CORS_ORIGINS on a real node: browser preflights from a listed origin are answered
before the key is checked; other origins, and every origin by default, get no CORS headers."""

from __future__ import annotations

import httpx
import pytest
from node import Node, running_node
from world import World

KEY = "node-key-0123456789"  # the node masks its key in every answer: never a common word

APP = "http://app.example:3000"
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def _preflight(node: Node, origin: str, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.options(node.url + path, headers={"Origin": origin, **PREFLIGHT}, timeout=30)


def _get(node: Node, origin: str, key: str | None = None) -> httpx.Response:
    headers = {"Origin": origin, **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.get(node.url + "/v1/models", headers=headers, timeout=30)


@pytest.fixture
def cors_node(world: World) -> Node:  # type: ignore[misc]
    with running_node(api_key=KEY, NODE_CORS_ORIGINS=f"{APP}, https://other.example") as node:
        yield node


def test_a_listed_origins_preflight_is_answered_without_the_key(cors_node: Node) -> None:
    answers = [
        _preflight(cors_node, APP, path) for path in ("/v1/chat/completions", "/v1/responses")
    ]

    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.headers["access-control-allow-origin"] == APP
        assert "POST" in answer.headers["access-control-allow-methods"]
        allowed = answer.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed


def test_another_origins_preflight_is_refused(cors_node: Node) -> None:
    answer = _preflight(cors_node, "http://evil.example")

    assert answer.status_code == 400
    assert "access-control-allow-origin" not in answer.headers


def test_answers_tell_a_listed_origin_it_may_read_them_errors_included(cors_node: Node) -> None:
    ok = _get(cors_node, APP, key=KEY)
    refused_key = _get(cors_node, APP)
    other = _get(cors_node, "http://evil.example", key=KEY)

    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == APP
    assert refused_key.status_code == 401  # the key is still required for the request itself
    assert refused_key.headers["access-control-allow-origin"] == APP
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_by_default_no_origin_is_allowed(world: World) -> None:
    with running_node(api_key=KEY) as node:
        preflight = _preflight(node, APP)
        answer = _get(node, APP, key=KEY)

    assert preflight.status_code == 401  # no CORS: an OPTIONS request like any other
    assert "access-control-allow-origin" not in preflight.headers
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_any_origin_with_a_star(world: World) -> None:
    with running_node(NODE_CORS_ORIGINS="*") as node:
        answer = _preflight(node, "http://anywhere.example")

    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"
