"""The load balancer's view of a node serving the real Gemma: loaded models, load, busy."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from lb import XLLM, LoadBalancer
from node import offline_env, running_node

from .conftest import GEMMA_ID, GEMMA_SIZE, GemmaWorld

pytestmark = pytest.mark.e2e

LONG = {
    "model": GEMMA_ID,
    "messages": [{"role": "user", "content": "Count from one to one hundred in words."}],
    "max_tokens": 200,
    "temperature": 0,
}
SHORT = {**LONG, "max_tokens": 4}
KEY = "lb-e2e-node-key"  # the node masks its key in answers: a key no answer contains


def _gemma_env(gemma_file: Path) -> dict[str, str]:
    return offline_env(gemma_file.parents[2])  # the store the session's Gemma was assembled into


def _health(node) -> dict:  # noqa: ANN001 - tests/node.py's Node
    return node.get("/api/health")[2]


def test_health_is_busy_while_every_loaded_models_queue_is_full(gemma_file: Path) -> None:
    lb = LoadBalancer()
    with running_node(
        _gemma_env(gemma_file), api_key=KEY, MAX_QUEUE="1", N_CTX="512", PARALLEL="1"
    ) as node:
        lb.register("node-1", node.url, KEY)
        assert node.post("/v1/chat/completions", SHORT)[0] == 200  # loads it
        idle = _health(node)
        first = threading.Thread(target=node.post, args=("/v1/chat/completions", LONG))
        first.start()
        node.wait_for(lambda: lb.check("node-1").gpu.active_requests == 1, what="running")
        second = threading.Thread(target=node.post, args=("/v1/chat/completions", SHORT))
        second.start()
        seen = []
        node.wait_for(lambda: seen.append(_health(node)) or seen[-1]["status"] == "busy")
        read = lb.check("node-1").gpu
        full, _, refused = node.post("/v1/chat/completions", SHORT)
        first.join()
        second.join()
        after = _health(node)
        lb.close()

    assert idle["status"] == "online" and idle["loaded_models"] == [GEMMA_ID]
    assert seen[-1]["load"]["active_requests"] == 2 and read.active_requests == 2
    assert seen[-1]["loaded_models"] == [GEMMA_ID]
    assert full == 429 and refused["error"]["code"] == "server_busy"
    assert after["status"] == "online" and after["load"]["active_requests"] == 0


@pytest.mark.parametrize("api_key", [None, KEY])
def test_the_lb_detects_syncs_and_forwards_to_a_node_with_gemma(
    gemma_file: Path, api_key: str | None
) -> None:
    with (
        running_node(_gemma_env(gemma_file), api_key=api_key, N_CTX="512") as node,
        LoadBalancer() as lb,
    ):
        endpoint = lb.register("node-1", node.url, api_key)
        plain = lb.forward(None, "/v1/chat/completions", SHORT)
        stream = lb.forward(None, "/v1/chat/completions", {**SHORT, "stream": True})
        idle = lambda: lb.check("node-1").gpu.active_requests == 0  # noqa: E731
        node.wait_for(idle, what="the stream's request to end on the node")  # just after [DONE]
        checked = lb.endpoints["node-1"]

    assert endpoint.type == XLLM and endpoint.models == {GEMMA_ID: 512}
    assert plain.status == 200 and plain.body["model"] == GEMMA_ID
    assert plain.body["choices"][0]["message"]["role"] == "assistant"
    assert plain.usage is not None and plain.usage["output_tokens"] > 0
    assert stream.status == 200 and stream.done and not stream.cut_short
    assert stream.usage == plain.usage  # counted from the include_usage chunk
    assert stream.sent["stream_options"] == {"include_usage": True}
    assert checked.status == "online" and set(checked.asked) == {"/api/health"}


def test_a_node_fed_by_another_answers_and_the_hub_serves_gemma_once(
    gemma_world: GemmaWorld, hub_only_catalog: Path, tmp_path: Path
) -> None:
    base = {k: v for k, v in gemma_world.env().items() if k != "LLMLB_URL"}
    seed_env = {**os.environ, **base, "LLMLB_HOME": str(tmp_path / "seed")}
    seed_env.pop("LLMLB_URL", None)
    chat = {**SHORT, "stream": False}
    answers: dict[str, int] = {}
    with running_node(seed_env, api_key="seed-key", N_CTX="512", N_THREADS="1") as seed:
        fed_env = {
            **seed_env,
            "LLMLB_HOME": str(tmp_path / "fed"),
            "LLMLB_URL": seed.url,
            "LLMLB_API_KEY": "seed-key",
            "LLMLB_ORIGIN_ALLOWLIST": "none.invalid",  # the Hub is not allowed
        }
        with running_node(fed_env, N_CTX="512", N_THREADS="1") as fed:
            asks = [
                threading.Thread(target=lambda n=n, k=k: answers.update({k: n.post(
                    "/v1/chat/completions", chat)[0]}))
                for k, n in (("seed", seed), ("fed", fed))
            ]  # fmt: skip
            for t in asks:
                t.start()
            for t in asks:
                t.join()
            _, _, fed_status = fed.get(f"/v0/models/{GEMMA_ID}/status")
            cdn = gemma_world.hub.cdn  # type: ignore[attr-defined]
            seed.wait_for(lambda: cdn.open_connections == 0, what="the CDN's counts to settle")

    assert answers == {"seed": 200, "fed": 200}
    assert fed_status["source"] == "llmlb-proxy"
    assert cdn.bytes_sent <= 1.05 * GEMMA_SIZE  # one copy (a range cut short counts a little)
    assert gemma_world.proxy.request_count == 0  # type: ignore[attr-defined]
