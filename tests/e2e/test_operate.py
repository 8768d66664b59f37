"""Operating `llmlb-node serve` with the real Gemma: /api/ps, unload and delete of a loaded model,
the memory budget and its estimate against the real RSS, metrics of real generations, SIGTERM in
the middle of a stream, and a SIGKILLed node restarted on its store."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from pathlib import Path

import pytest
from node import Node, manual_store, offline_env, running_node
from prometheus_client.parser import text_string_to_metric_families

from llmlb_node.server.memory import need_for

from .test_serve import _open_stream

pytestmark = pytest.mark.e2e

NO_EOS = {"1": -100, "106": -100}  # Gemma's <eos> and <end_of_turn>: generate until max_tokens


def _stream(node: Node, body: dict, seen: threading.Event | None = None) -> list[str]:
    """POST a streaming completion; every non-empty SSE line; `seen` set at the first token."""
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}))
    response = conn.getresponse()
    assert response.status == 200, response.read()
    lines = []
    for raw in response:
        line = raw.decode().strip()
        if line:
            lines.append(line)
            if seen is not None and line.startswith("data: {"):
                seen.set()
    conn.close()
    return lines


def _ps(node: Node) -> list[dict]:
    status, _, body = node.get("/api/ps")
    assert status == 200, body
    return body["models"]


def _samples(node: Node) -> dict[tuple[str, tuple], float]:
    _, _, text = node.get("/metrics")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_ps_unload_and_delete_of_a_loaded_model_and_its_metrics(
    tmp_path: Path, gemma_file: Path
) -> None:
    home = manual_store(tmp_path, gemma_file, "gemma-a")
    # One sequence: the second request queues behind the stream instead of joining its batch.
    with running_node(offline_env(home, N_CTX="4096", PARALLEL="1")) as node:
        answer = node.post("/v1/completions", {"model": "gemma-a", "prompt": "Hi", "max_tokens": 4})
        (loaded,) = _ps(node)
        running = threading.Event()
        long_stream = {"model": "gemma-a", "prompt": "Once", "max_tokens": 300}
        lines: list[list[str]] = []
        streamer = threading.Thread(
            target=lambda: lines.append(
                _stream(node, {**long_stream, "logit_bias": NO_EOS}, running)
            )
        )
        streamer.start()
        assert running.wait(60)
        queued: list[int] = []
        behind = threading.Thread(
            target=lambda: queued.append(
                node.post("/v1/completions", {"model": "gemma-a", "prompt": "Hi", "max_tokens": 2})[
                    0
                ]
            )
        )
        behind.start()
        node.wait_for(lambda: _ps(node)[0]["queued_requests"] == 1, what="a queued request")
        (busy,) = _ps(node)
        depth = _samples(node)[("llmlb_queue_depth", (("model", "gemma-a"),))]
        deleting, _, deleting_body = node.request("DELETE", "/api/models/gemma-a")
        unloading, _, _ = node.post("/api/models/unload", {"model": "gemma-a"})
        streamer.join(120)
        behind.join(60)
        samples = _samples(node)
        unloaded, _, unloaded_body = node.post("/api/models/unload", {"model": "gemma-a"})
        after_unload = _ps(node)
        deleted, _, _ = node.request("DELETE", "/api/models/gemma-a")
        _, _, tags = node.get("/api/tags")
        gone, _, _ = node.post("/v1/completions", {"model": "gemma-a", "prompt": "Hi"})

    assert answer[0] == 200, answer
    assert loaded["id"] == "gemma-a" and loaded["state"] == "ready"
    assert loaded["active_requests"] == 0 and loaded["queued_requests"] == 0
    assert loaded["expires_at"] is not None and loaded["last_used"]
    estimate, rss = loaded["memory_estimate_bytes"], loaded["memory_rss_bytes"]
    assert abs(estimate / rss - 1) <= 0.15, (estimate, rss)  # the estimate against the real RSS
    assert "n_ctx=4096" in loaded["memory_estimate"]
    assert busy["active_requests"] == 1 and busy["expires_at"] is None
    assert depth == 1 and queued == [200]
    assert deleting == 409 and deleting_body["error"]["code"] == "model_in_use"
    assert unloading == 409
    assert lines[0][-1] == "data: [DONE]"
    ttft = samples[("llmlb_time_to_first_token_seconds_count", (("model", "gemma-a"),))]
    assert ttft == 1
    assert samples[("llmlb_completion_tokens_total", (("model", "gemma-a"),))] >= 4 + 300 + 2
    assert samples[("llmlb_prompt_tokens_total", (("model", "gemma-a"),))] >= 1
    assert samples[("llmlb_loaded_models", ())] == 1
    assert unloaded == 200 and unloaded_body["status"] == "unloaded"
    assert after_unload == []
    assert deleted == 200
    assert not (home / "models" / "gemma-a").exists()
    assert tags == {"models": []}
    assert gone == 404


def test_the_memory_budget_unloads_the_least_recently_used_model_to_make_room(
    tmp_path: Path, gemma_file: Path
) -> None:
    home = manual_store(tmp_path, gemma_file, "gemma-a", "gemma-b")
    need = need_for(gemma_file, 512, contexts=5)  # its own and LLMLB_PARALLEL (4) sequences
    assert need is not None
    budget = str(int(1.5 * need.ram_bytes))  # one Gemma fits, two do not
    with running_node(offline_env(home, N_CTX="512", MEMORY_BUDGET=budget)) as node:
        first = node.post("/v1/completions", {"model": "gemma-a", "prompt": "Hi", "max_tokens": 2})
        second = node.post("/v1/completions", {"model": "gemma-b", "prompt": "Hi", "max_tokens": 2})
        loaded = node.loaded()
        log = node.log

    assert first[0] == 200 and second[0] == 200
    assert loaded == {"gemma-b"}  # LLMLB_MAX_LOADED_MODELS (2) allowed both: memory did not
    assert "gemma-a: unloading (least recently used) to make room for gemma-b" in log
    assert "gemma-a: needs " in log and "at n_ctx=512" in log  # the estimate, logged at load
    assert "fits the memory budget of" in log


def test_two_cold_models_waiting_for_room_under_a_budget_for_one_both_answer(
    tmp_path: Path, gemma_file: Path
) -> None:
    """Two loads waiting for the memory a busy model holds: once it was idle, each counted the
    other's need as held while only a READY idle model could be evicted, and both stayed
    `loading` forever. Now a load that does not fit reserves nothing, so one goes, then the
    other."""
    home = manual_store(tmp_path, gemma_file, "gemma-a", "gemma-b", "gemma-c")
    need = need_for(gemma_file, 1024, contexts=5)  # its own and LLMLB_PARALLEL (4) sequences
    assert need is not None
    budget = str(int(1.5 * need.ram_bytes))  # one Gemma fits, two do not
    env = offline_env(
        home, N_CTX="1024", MEMORY_BUDGET=budget, MAX_LOADED_MODELS="3", LOAD_WAIT="150"
    )
    with running_node(env) as node:
        first = node.post("/v1/completions", {"model": "gemma-c", "prompt": "Hi", "max_tokens": 1})
        story = {"model": "gemma-c", "prompt": "Once", "max_tokens": 900, "logit_bias": NO_EOS}
        busy = _open_stream(node, "/v1/completions", story, b'"text"')  # gemma-c holds the room
        answers: dict[str, int] = {}

        def ask(model_id: str) -> None:
            body = {"model": model_id, "prompt": "Hi", "max_tokens": 2}
            answers[model_id] = node.post("/v1/completions", body, timeout=200)[0]

        both = []
        for model_id in ("gemma-a", "gemma-b"):  # each resolves, knows its need, then waits
            both.append(threading.Thread(target=ask, args=(model_id,)))
            both[-1].start()
            node.wait_for(lambda m=model_id: _estimate(node, m), timeout=60, what=model_id)
        streaming = _row(node, "gemma-c")["active_requests"]
        busy.close()  # gemma-c goes idle: the two waiting loads wake together
        for thread in both:
            thread.join(240)  # a hang guard: each load takes about a second
        ps = _ps(node)
        log = node.log

    assert first[0] == 200
    assert streaming == 1  # both waited while gemma-c was generating
    assert answers == {"gemma-a": 200, "gemma-b": 200}
    assert len(ps) == 1 and ps[0]["id"] in ("gemma-a", "gemma-b")  # never two at once
    assert "gemma-c: unloading (least recently used) to make room for gemma-" in log


def _row(node: Node, model_id: str) -> dict:
    return next((row for row in _ps(node) if row["id"] == model_id), {})


def _estimate(node: Node, model_id: str) -> bool:
    return _row(node, model_id).get("memory_estimate_bytes") is not None


def test_sigterm_mid_stream_ends_it_with_an_error_event_then_done_and_exits_0(
    tmp_path: Path, gemma_file: Path
) -> None:
    home = manual_store(tmp_path, gemma_file, "gemma-a")
    with running_node(offline_env(home, N_CTX="512", SHUTDOWN_GRACE="1")) as node:
        running = threading.Event()
        lines: list[list[str]] = []
        body = {"model": "gemma-a", "prompt": "Once", "max_tokens": 5000, "logit_bias": NO_EOS}
        streamer = threading.Thread(target=lambda: lines.append(_stream(node, body, running)))
        streamer.start()
        assert running.wait(60)
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        code = node.proc.wait(timeout=60)
        took = time.monotonic() - started
        streamer.join(10)
        log = node.log

    assert code == 0, log
    assert took < 1 + 10, log
    (events,) = lines
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    tokens = [e for e in events[:-2] if e.startswith("data: {")]
    assert 1 <= len(tokens) < 5000
    assert all("choices" in json.loads(e.removeprefix("data: ")) for e in tokens)


def test_a_sigkilled_node_restarted_on_its_store_serves_at_once(
    tmp_path: Path, gemma_file: Path
) -> None:
    home = manual_store(tmp_path, gemma_file, "gemma-a")
    with running_node(offline_env(home, N_CTX="512")) as node:
        assert node.post("/v1/completions", {"model": "gemma-a", "prompt": "Hi"})[0] == 200
        node.proc.kill()
        node.proc.wait()

    with running_node(offline_env(home, N_CTX="512")) as node:
        started = time.monotonic()
        status, _, body = node.post(
            "/v1/completions", {"model": "gemma-a", "prompt": "Hi", "max_tokens": 4}
        )
        took = time.monotonic() - started
        _, _, tags = node.get("/api/tags")

    assert status == 200, body
    assert body["choices"][0]["text"] is not None
    assert took < 30  # a load from the store, nothing to fetch (and no network to fetch from)
    assert [m["id"] for m in tags["models"]] == ["gemma-a"]
