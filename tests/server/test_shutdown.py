"""Clean shutdown and restarts of a real `llmlb-node serve` process: SIGTERM mid-download and
mid-request, SIGKILL, and the next start on the same store.

Streams cut mid-generation need a model that generates: tests/e2e/test_operate.py (Gemma).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import threading
import time

from node import Node, running_node
from world import FILENAME, MODEL_ID, World

from llmlb_node.store import ModelStore

OVERLAP = 64 * 1024  # a resume may re-read this much to compare it with the partial
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}


def _status(node: Node) -> dict:
    return node.get(f"/v0/models/{MODEL_ID}/status")[2]


def _partial_bytes(world: World) -> int:
    return ModelStore(world.models_dir).partial_bytes(MODEL_ID, FILENAME)


def _sse_events(node: Node, body: dict, started: threading.Event | None = None) -> list[str]:
    """POST a streaming request and return every SSE line (comments included) until the end;
    `started` is set once the 200 arrived."""
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "x"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    if started is not None:
        started.set()
    lines = [raw.decode().strip() for raw in response]
    conn.close()
    return [line for line in lines if line]


def _pull_lines(node: Node) -> list[dict]:
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    conn.request("POST", "/api/models/pull", json.dumps({"model": MODEL_ID}))
    lines = [json.loads(raw) for raw in conn.getresponse() if raw.strip()]
    conn.close()
    return lines


def _downloading(node: Node, world: World, at_least: int = 20_000) -> None:
    node.wait_for(
        lambda: _status(node)["downloaded_bytes"] > at_least and _partial_bytes(world) > 0,
        what="a download under way with a partial on disk",
    )


def test_sigterm_mid_download_ends_waiting_requests_cleanly_exits_0_and_the_next_start_resumes(
    world: World,
) -> None:
    world.hub.cdn.rate_limit(60_000)  # 300 kB: 5 s
    size = len(world.content)
    with running_node(DOWNLOAD_CONNECTIONS="1", SHUTDOWN_GRACE="1") as node:
        answers: list[tuple[int, dict]] = []
        streams: list[list[str]] = []
        stream_open = threading.Event()
        waiting = threading.Thread(
            target=lambda: answers.append(node.post("/v1/chat/completions", CHAT)[::2])
        )
        streaming = threading.Thread(
            target=lambda: streams.append(_sse_events(node, {**CHAT, "stream": True}, stream_open))
        )
        pulls: list[list[dict]] = []
        pulling = threading.Thread(target=lambda: pulls.append(_pull_lines(node)))
        waiting.start()
        streaming.start()
        pulling.start()
        _downloading(node, world, at_least=150_000)
        assert stream_open.wait(10)  # answered 200, now sending ": downloading" comments
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        code = node.proc.wait(timeout=30)
        took = time.monotonic() - started
        waiting.join(10)
        streaming.join(10)
        pulling.join(10)
        log = node.log

    assert code == 0, log
    assert took < 1 + 5, log  # the grace, then unload and exit
    ((status, body),) = answers
    assert status == 503 and body["error"]["code"] == "shutting_down"
    (events,) = streams
    assert events[0].startswith(": downloading")
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))
    assert error["error"]["code"] == "shutting_down"
    (pull,) = pulls
    assert any(line.get("status") == "downloading" for line in pull)
    assert pull[-1]["error"]["code"] == "shutting_down"
    kept = _partial_bytes(world)
    assert 2 * OVERLAP < kept < size
    assert not world.installed_path().exists()
    sent_before = world.hub.cdn.bytes_sent

    world.hub.cdn.rate_limit(None)
    with running_node() as node:  # no request: the start itself resumes the download
        node.wait_for(lambda: _status(node)["status"] == "completed", what="the resumed install")
        log = node.log

    assert world.installed_path().read_bytes() == world.content
    resumed = world.hub.cdn.bytes_sent - sent_before
    assert resumed <= size - kept + OVERLAP, (resumed, size, kept)  # only what was missing
    assert "resuming the download interrupted by the last stop" in log


def test_new_requests_after_sigterm_are_refused_while_in_flight_ones_finish(world: World) -> None:
    world.hub.cdn.rate_limit(100_000)  # 3 s
    with running_node(DOWNLOAD_CONNECTIONS="1", SHUTDOWN_GRACE="30") as node:
        answers: list[int] = []
        first = threading.Thread(
            target=lambda: answers.append(node.post("/v1/chat/completions", CHAT)[0])
        )
        first.start()
        _downloading(node, world)
        conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
        conn.request("GET", "/v1/models")  # a keep-alive connection, open before the signal
        conn.getresponse().read()
        node.proc.send_signal(signal.SIGTERM)
        # Logged in the same loop callback that starts refusing: once it shows, refusal holds.
        node.wait_for(lambda: "shutting down: no new requests" in node.log, what="the shutdown")
        late = _post_on(conn, "/v1/chat/completions", CHAT)
        first.join(30)
        code = node.proc.wait(timeout=30)
        log = node.log

    assert late in (503, None)  # 503 shutting_down, or the idle connection was closed first
    assert answers == [500], log  # it finished its download within the grace (then: fake GGUF)
    assert world.installed_path().exists()
    assert code == 0


def _pull_until_killed(node: Node, model_id: str) -> None:
    with contextlib.suppress(OSError):  # the node is SIGKILLed mid-answer
        node.post("/api/models/pull", {"model": model_id, "stream": False})


def _post_on(conn: http.client.HTTPConnection, path: str, body: dict) -> int | None:
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "x"})
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None


def test_a_sigkilled_node_restarted_serves_installed_models_at_once_and_resumes_partials(
    world: World,
) -> None:
    world.add_model("other", {"other.gguf": world.content[:200_000] + bytes(100_000)})
    with running_node() as node:
        assert node.post("/api/models/pull", {"model": MODEL_ID, "stream": False})[0] == 200
        world.hub.cdn.rate_limit(60_000)
        threading.Thread(target=_pull_until_killed, args=(node, "other"), daemon=True).start()
        node.wait_for(
            lambda: ModelStore(world.models_dir).partial_bytes("other", "other.gguf") > 150_000,
            what="a partial of the second model",
        )
        node.proc.kill()
        node.proc.wait()
    kept = ModelStore(world.models_dir).partial_bytes("other", "other.gguf")
    assert kept > 2 * OVERLAP
    sent_before = world.hub.cdn.bytes_sent
    requests_before = world.requests()

    world.hub.cdn.rate_limit(20_000)  # the resume takes seconds: long enough to answer within
    with running_node() as node:
        status, _, body = node.post("/api/models/pull", {"model": MODEL_ID, "stream": False})
        other_meanwhile = node.get("/v0/models/other/status")[2]["status"]
        world.hub.cdn.rate_limit(None)
        node.wait_for(
            lambda: node.get("/v0/models/other/status")[2]["status"] == "completed",
            what="the resumed second model",
        )
        _, _, tags = node.get("/api/tags")

    assert status == 200 and body == {"status": "success"}
    assert other_meanwhile != "completed"  # the installed model did not wait for the resume
    assert {m["id"] for m in tags["models"]} == {MODEL_ID, "other"}
    assert world.hub.cdn.bytes_sent - sent_before <= 300_000 - kept + OVERLAP
    assert world.requests() > requests_before  # only for "other"


def test_once_shutdown_begins_health_says_offline_and_new_requests_get_503(world: World) -> None:
    from starlette.testclient import TestClient

    from llmlb_node.server.app import create_app
    from llmlb_node.server.settings import ServerSettings

    app = create_app(ServerSettings.from_env())
    with TestClient(app) as client:
        before = client.get("/api/health")
        app.state.shutdown.begin()  # what SIGTERM does (the signal itself: the tests above)
        deadline = time.monotonic() + 5
        while (health := client.get("/api/health")).status_code != 503:
            assert time.monotonic() < deadline, health.json()
            time.sleep(0.02)
        chat = client.post("/v1/chat/completions", json=CHAT)
        pull = client.post("/api/models/pull", json={"model": MODEL_ID})

    assert before.status_code == 200 and before.json()["status"] != "offline"
    assert health.json()["status"] == "offline"
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "shutting_down"
    assert chat.headers["Retry-After"] == "1"
    assert pull.status_code == 503
    assert world.requests() == 0


def test_a_second_ctrl_c_stops_waiting_for_the_grace(world: World) -> None:
    world.hub.cdn.rate_limit(10_000)  # 300 kB: 30 s, far longer than the test waits
    with running_node(DOWNLOAD_CONNECTIONS="1", SHUTDOWN_GRACE="60") as node:
        answers: list[object] = []
        waiting = threading.Thread(
            target=lambda: answers.append(node.post("/v1/chat/completions", CHAT))
        )
        waiting.start()
        _downloading(node, world)
        node.proc.send_signal(signal.SIGINT)
        time.sleep(1)
        assert node.proc.poll() is None  # the first Ctrl-C waits for the request in flight
        started = time.monotonic()
        node.proc.send_signal(signal.SIGINT)
        node.proc.wait(timeout=20)
        took = time.monotonic() - started
        waiting.join(10)
        log = node.log

    assert took < 10, log  # far from the 60 s grace
