"""`llmlb-node serve` with the real Gemma and llama.cpp, driven by the official openai client."""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from node import Node, manual_store, offline_env, running_node

from .conftest import GEMMA_ID, GemmaWorld

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def node(gemma_file: Path) -> Iterator[Node]:
    """A node over the store that already holds Gemma (shared by the read-only tests)."""
    with running_node(offline_env(gemma_file.parents[2], N_CTX="512")) as running:
        yield running


@pytest.fixture
def client(node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.base_url, api_key="none", max_retries=0)


def test_chat_without_and_with_streaming(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=GEMMA_ID, messages=HELLO, max_tokens=8, temperature=0, seed=1
    )
    chunks = list(
        client.chat.completions.create(
            model=GEMMA_ID, messages=HELLO, max_tokens=8, temperature=0, stream=True
        )
    )

    assert answer.object == "chat.completion" and answer.model == GEMMA_ID
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content
    assert answer.usage.completion_tokens == 8 and answer.usage.prompt_tokens > 0
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == answer.choices[0].message.content  # temperature 0: the same tokens
    assert chunks[-1].choices[0].finish_reason == "length"


def test_text_completion(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=GEMMA_ID, prompt="The capital of France is", max_tokens=6, temperature=0
    )

    assert out.object == "text_completion" and out.choices[0].text.strip()
    assert out.usage.completion_tokens <= 6


def test_sampling_parameters_reach_llama_cpp(client: openai.OpenAI) -> None:
    stopped = client.completions.create(
        model=GEMMA_ID, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[","]
    )
    json_mode = client.chat.completions.create(
        model=GEMMA_ID,
        messages=[{"role": "user", "content": "Give a JSON object with a name."}],
        max_tokens=24,
        temperature=0,
        response_format={"type": "json_object"},
    )
    banned = client.completions.create(
        model=GEMMA_ID, prompt="Hi", max_tokens=12, logit_bias={"1": -100, "106": -100}
    )

    assert "," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    assert json_mode.choices[0].message.content.lstrip().startswith("{")  # the JSON grammar
    assert banned.usage.completion_tokens == 12  # end-of-text was never sampled


def test_embeddings_as_floats_and_as_base64(client: openai.OpenAI, node: Node) -> None:
    default = client.embeddings.create(model=GEMMA_ID, input=["hello world", "goodbye"])
    floats = client.embeddings.create(model=GEMMA_ID, input="hello world", encoding_format="float")
    status, _, raw = node.post(
        "/v1/embeddings", {"model": GEMMA_ID, "input": "hello world", "encoding_format": "base64"}
    )

    assert [d.index for d in default.data] == [0, 1]
    first = default.data[0].embedding  # the client asked for base64 and decoded it
    assert len(first) == 640 and first != default.data[1].embedding
    assert floats.data[0].embedding == pytest.approx(first, abs=1e-4)  # batched vs alone
    assert status == 200 and isinstance(raw["data"][0]["embedding"], str)
    decoded = base64.b64decode(raw["data"][0]["embedding"])
    single = floats.data[0].embedding
    assert struct.unpack(f"<{len(decoded) // 4}f", decoded) == pytest.approx(single, rel=1e-6)


def test_models_list_shows_gemma_loaded_after_use(client: openai.OpenAI, node: Node) -> None:
    client.completions.create(model=GEMMA_ID, prompt="Hi", max_tokens=1)
    models = {m.id: m for m in client.models.list()}

    assert GEMMA_ID in models
    assert models[GEMMA_ID].model_extra["loaded"] is True
    assert models[GEMMA_ID].model_extra["status"] in ("local", "completed")


def test_prompt_longer_than_the_context_is_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=GEMMA_ID, prompt="word " * 700, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(
            model=GEMMA_ID, messages=[{"role": "user", "content": "word " * 700}], max_tokens=4
        )

    assert caught.value.code == "context_length_exceeded"
    assert caught.value.body["param"] == "prompt"
    assert chat.value.code == "context_length_exceeded"


def test_status_and_models_answer_during_a_generation(client: openai.OpenAI, node: Node) -> None:
    client.completions.create(model=GEMMA_ID, prompt="Hi", max_tokens=1)  # loaded
    stream = client.completions.create(
        model=GEMMA_ID, prompt="Once upon a time", max_tokens=400, stream=True, temperature=0.8
    )
    first = next(iter(stream))
    answers = []
    # What shows they did not wait for the generation: the stream is still active after them.
    for _ in range(5):
        answers.append(node.get(f"/v0/models/{GEMMA_ID}/status", timeout=10)[0])
        answers.append(node.get("/v1/models", timeout=10)[0])
        answers.append(node.get("/v0/supported-models", timeout=10)[0])
    _, _, status = node.get(f"/v0/models/{GEMMA_ID}/status")
    rest = list(stream)

    assert first.choices[0].text is not None
    assert answers == [200] * 15
    assert status["active_requests"] == 1 and status["state"] == "ready"
    assert len(rest) > 5  # the stream was still going while they answered


def _long_stream_request(node: Node, model_id: str = GEMMA_ID) -> socket.socket:
    """Start a ~3000-token streaming chat on a raw socket; return once its first token arrives."""
    body = {"model": model_id, "messages": [{"role": "user", "content": "Tell a long story."}]}
    return _open_stream(node, "/v1/chat/completions", {**body, "max_tokens": 3000}, b'"content"')


def _open_stream(node: Node, path: str, body: dict, marker: bytes) -> socket.socket:
    payload = json.dumps({**body, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", node.port))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    received = b""
    while marker not in received:
        data = sock.recv(65536)
        assert data, f"the node closed the stream before any token: {received!r}"
        received += data
    return sock


def test_a_disconnected_stream_frees_the_model(tmp_path: Path, gemma_file: Path) -> None:
    with running_node(offline_env(gemma_file.parents[2], N_CTX="4096")) as node:
        client = openai.OpenAI(base_url=node.base_url, api_key="none", max_retries=0)
        sock = _long_stream_request(node)
        sock.close()  # gone after its first token, with ~3000 tokens to go
        node.wait_for(
            lambda: node.get(f"/v0/models/{GEMMA_ID}/status")[2]["active_requests"] == 0,
            timeout=60,  # a hang guard: the token count below shows how soon it stopped
            what="the abandoned generation to stop",
        )
        answer = client.chat.completions.create(model=GEMMA_ID, messages=HELLO, max_tokens=4)
        log = node.log

    assert answer.choices[0].message.content is not None
    access = [line for line in log.splitlines() if "POST /v1/chat/completions" in line]
    abandoned = int(access[0].rsplit("tokens=", 1)[1])
    assert abandoned < 100  # stopped soon after the client left, not after 3000 tokens


def test_a_disconnected_non_streaming_request_stops_its_generation(
    tmp_path: Path, gemma_file: Path
) -> None:
    with running_node(offline_env(gemma_file.parents[2], N_CTX="4096")) as node:
        node.post("/v1/completions", {"model": GEMMA_ID, "prompt": "Hi", "max_tokens": 1})
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                node.url + "/v1/completions",
                json={"model": GEMMA_ID, "prompt": "Once upon a time", "max_tokens": 3000},
                timeout=1.0,
            )
        node.wait_for(
            lambda: node.get(f"/v0/models/{GEMMA_ID}/status")[2]["active_requests"] == 0,
            timeout=60,  # a hang guard: the token count below shows how soon it stopped
            what="the abandoned generation to stop",
        )
        log = node.log

    assert "POST /v1/completions model=gemma-3-270m status=499" in log
    assert "exception was never retrieved" not in log  # the stopped generation's error is read


def test_queue_full_is_429_server_busy(gemma_file: Path) -> None:
    with running_node(offline_env(gemma_file.parents[2], MAX_QUEUE="1", PARALLEL="1")) as node:
        sock = _long_stream_request(node)  # running
        waiting = threading.Thread(
            target=node.post,
            args=("/v1/completions", {"model": GEMMA_ID, "prompt": "Hi", "max_tokens": 2}),
        )
        waiting.start()
        node.wait_for(
            lambda: node.get(f"/v0/models/{GEMMA_ID}/status")[2]["queued"] == 1,
            what="the second request to queue",
        )
        client = openai.OpenAI(base_url=node.base_url, api_key="none", max_retries=0)
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model=GEMMA_ID, prompt="Hi", max_tokens=2)
        sock.close()
        waiting.join(60)

    assert caught.value.code == "server_busy"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert not waiting.is_alive()


def test_keep_alive_unloads_an_idle_model_and_a_request_can_override_it(
    gemma_file: Path,
) -> None:
    with running_node(offline_env(gemma_file.parents[2], KEEP_ALIVE="1s")) as node:
        prompt = {"model": GEMMA_ID, "prompt": "Hi", "max_tokens": 1}
        assert node.post("/v1/completions", prompt)[0] == 200
        assert GEMMA_ID in node.loaded()
        node.wait_for(lambda: GEMMA_ID not in node.loaded(), timeout=30, what="keep-alive unload")

        assert node.post("/v1/completions", {**prompt, "keep_alive": -1})[0] == 200
        time.sleep(2.5)
        kept = GEMMA_ID in node.loaded()

        assert node.post("/v1/completions", {**prompt, "keep_alive": 0})[0] == 200
        node.wait_for(lambda: GEMMA_ID not in node.loaded(), timeout=30, what="keep_alive 0")
        log = node.log

    assert kept
    assert log.count("idle for") >= 2


def test_loading_a_second_model_evicts_the_least_recently_used_idle_one(
    tmp_path: Path, gemma_file: Path
) -> None:
    home = manual_store(tmp_path, gemma_file, "gemma-a", "gemma-b")
    with running_node(offline_env(home, MAX_LOADED_MODELS="1")) as node:
        one = {"prompt": "Hi", "max_tokens": 1}
        assert node.post("/v1/completions", {"model": "gemma-a", **one})[0] == 200
        first = node.loaded()
        story = {"model": "gemma-a", "prompt": "Once upon a time", "max_tokens": 3000}
        sock = _open_stream(node, "/v1/completions", story, b'"text"')  # gemma-b must wait
        done: list[int] = []
        other = threading.Thread(
            target=lambda: done.append(node.post("/v1/completions", {"model": "gemma-b", **one})[0])
        )
        other.start()
        time.sleep(1.5)
        while_busy, answered_while_busy = node.loaded(), list(done)
        sock.close()
        other.join(60)
        after = node.loaded()

    assert first == {"gemma-a"}
    assert while_busy == {"gemma-a"} and not answered_while_busy  # not unloaded under a request
    assert done == [200]
    assert after == {"gemma-b"}


def test_cold_store_first_chat_downloads_loads_and_answers(
    gemma_world: GemmaWorld, hub_only_catalog: Path
) -> None:
    with running_node() as node:
        client = openai.OpenAI(base_url=node.base_url, api_key="none", max_retries=0)
        answer = client.chat.completions.create(model=GEMMA_ID, messages=HELLO, max_tokens=4)
        _, _, status = node.get(f"/v0/models/{GEMMA_ID}/status")

    assert answer.choices[0].message.content is not None
    assert gemma_world.installed.exists()
    assert status["status"] in ("completed", "local") and status["progress"] == 1.0
    assert gemma_world.hub.cdn.bytes_sent <= gemma_world.file.stat().st_size * 1.01


def test_sixteen_concurrent_first_requests_share_one_download_and_one_load(
    gemma_world: GemmaWorld, hub_only_catalog: Path
) -> None:
    size = gemma_world.file.stat().st_size
    with running_node() as node:
        client = openai.OpenAI(base_url=node.base_url, api_key="none", max_retries=0, timeout=300)

        def ask(i: int) -> str:
            out = client.chat.completions.create(
                model=GEMMA_ID,
                messages=[{"role": "user", "content": f"Count to {i}."}],
                max_tokens=3,
            )
            return out.choices[0].finish_reason

        with ThreadPoolExecutor(16) as pool:
            reasons = list(pool.map(ask, range(16)))
        log = node.log

    assert len(reasons) == 16 and all(r in ("length", "stop") for r in reasons)
    assert gemma_world.hub.cdn.bytes_sent <= size * 1.01  # one download: 1.0x the file
    assert log.count(f"{GEMMA_ID}: loaded in") == 1
    assert log.count(f"{GEMMA_ID}: installed from") == 1
    assert log.count("status=200") == 16


def test_token_ids_past_the_vocabulary_are_400_not_500(node: Node) -> None:
    """Gemma's vocabulary has 262144 ids: a prompt id past it failed llama_decode (500 with a
    traceback), a logit_bias key past it raised inside llama.cpp's sampler callback."""
    log_start = len(node.log)
    prompt = node.post("/v1/completions", {"model": GEMMA_ID, "prompt": [262144], "max_tokens": 1})
    bias = node.post(
        "/v1/chat/completions",
        {"model": GEMMA_ID, "messages": HELLO, "max_tokens": 1, "logit_bias": {"999999999": 5}},
    )
    in_vocab = node.post(
        "/v1/completions", {"model": GEMMA_ID, "prompt": [2, 9259], "max_tokens": 1}
    )

    assert prompt[0] == 400 and prompt[2]["error"]["param"] == "prompt", prompt
    assert "262143" in prompt[2]["error"]["message"]
    assert bias[0] == 400 and bias[2]["error"]["param"] == "logit_bias", bias
    assert in_vocab[0] == 200, in_vocab
    assert "Traceback" not in node.log[log_start:]
