"""`stream_options.include_usage` on a real node with the real Gemma, read by the official openai
client and by the llmlb load balancer's stand-in, which injects the flag and counts from it.

OpenAI's shape: with the flag, every chunk has ``usage: null`` but the last before ``[DONE]``,
which has ``choices: []`` and the usage; without it, no chunk has a ``usage``. The counts are the
ones the same request answers without streaming (temperature 0: the same tokens).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from lb import LoadBalancer
from node import Node, offline_env, running_node

from .conftest import GEMMA_ID

KEY = "node-key-0123456789"  # the node masks its key in every answer: never a common word

pytestmark = pytest.mark.e2e

CHAT = {
    "model": GEMMA_ID,
    "messages": [{"role": "user", "content": "Name three colours."}],
    "temperature": 0,
}
COMPLETION = {"model": GEMMA_ID, "prompt": "The capital of France is", "temperature": 0}


@pytest.fixture(scope="module")
def node(gemma_file: Path) -> Iterator[Node]:
    with running_node(offline_env(gemma_file.parents[2]), api_key=KEY, N_CTX="1024") as running:
        yield running


@pytest.fixture
def client(node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.base_url, api_key=KEY, max_retries=0)


def _settled(create: Any, **body: Any) -> Any:
    """`create(**body)` after one identical call: the next request with this prompt (the
    stream) then finds the same cached prefix, and at temperature 0 samples the same tokens.
    (The first call evaluates the prompt in one batch, a repeat replays its last token alone:
    the logits differ in the last bits, enough to change the token where the model hesitates.)"""
    create(**body)
    return create(**body)


def _sse(node: Node, path: str, body: dict[str, Any]) -> list[Any]:
    """The raw ``data:`` payloads of a stream, JSON decoded, ``[DONE]`` kept as a string."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", node.url + path, json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in lines]


def test_chat_stream_ends_with_the_usage_of_the_same_answer_unstreamed(
    client: openai.OpenAI, node: Node
) -> None:
    whole = _settled(client.chat.completions.create, **CHAT, max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            **CHAT, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    options = {"stream": True, "stream_options": {"include_usage": True}}
    raw = _sse(node, "/v1/chat/completions", {**CHAT, "max_tokens": 12, **options})

    last = chunks[-1]
    assert last.choices == [] and last.object == "chat.completion.chunk"
    assert last.id == chunks[0].id and last.model == GEMMA_ID
    assert last.usage.model_dump() == whole.usage.model_dump()  # 12 tokens, same prompt count
    assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens > 0
    assert all(c.usage is None and c.choices for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == (
        whole.choices[0].message.content
    )
    assert raw[-1] == "[DONE]" and raw[-2]["choices"] == [] and raw[-2]["usage"]
    assert all("usage" in c and c["usage"] is None for c in raw[:-2])  # null, not absent


def test_completion_stream_ends_with_the_usage_chunk(client: openai.OpenAI, node: Node) -> None:
    whole = _settled(client.completions.create, **COMPLETION, max_tokens=10)
    chunks = list(
        client.completions.create(
            **COMPLETION, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )

    last = chunks[-1]
    assert last.choices == [] and last.object == "text_completion"
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text


def test_usage_counts_match_when_the_model_or_a_stop_string_ends_the_answer(
    client: openai.OpenAI,
) -> None:
    """End of generation is not a completion token (llama-cpp-python's own count); the token
    in which a stop string appears is. Gemma's <eos> (1) and <end_of_turn> (106), biased up,
    end the answer at once."""
    for body in (
        {**COMPLETION, "prompt": "1, 2, 3, 4,", "stop": [","], "max_tokens": 20},
        {**CHAT, "max_tokens": 20, "logit_bias": {"106": 100}},
        {**COMPLETION, "max_tokens": 20, "logit_bias": {"1": 100}},
    ):
        create = client.completions.create if "prompt" in body else client.chat.completions.create
        whole = _settled(create, **body)
        chunks = list(create(**body, stream=True, stream_options={"include_usage": True}))

        assert whole.choices[0].finish_reason == "stop", whole  # not cut by max_tokens
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
        assert _text(chunks[:-1]) == _text([whole])
        ended_by_the_model = "logit_bias" in body
        assert (whole.usage.completion_tokens == 0) == ended_by_the_model


def test_without_include_usage_no_chunk_has_usage(node: Node) -> None:
    for options in (None, {"include_usage": False}, {}):
        extra: dict[str, Any] = {"max_tokens": 4, "stream": True}
        if options is not None:
            extra["stream_options"] = options
        chat = _sse(node, "/v1/chat/completions", {**CHAT, **extra})
        completion = _sse(node, "/v1/completions", {**COMPLETION, **extra})

        for stream in (chat, completion):
            assert stream[-1] == "[DONE]"
            assert all("usage" not in c and c["choices"] for c in stream[:-1]), stream


def test_the_load_balancer_injects_include_usage_and_counts_the_real_tokens(node: Node) -> None:
    lb = LoadBalancer()
    lb.register("node-1", node.url, KEY)
    whole = lb.forward("node-1", "/v1/chat/completions", {**CHAT, "max_tokens": 9})
    chat = lb.forward("node-1", "/v1/chat/completions", {**CHAT, "max_tokens": 9, "stream": True})
    text = lb.forward("node-1", "/v1/completions", {**COMPLETION, "max_tokens": 7, "stream": True})
    refused = lb.forward(
        "node-1",
        "/v1/chat/completions",
        {**CHAT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": False}},
    )

    expected = whole.body["usage"]
    assert chat.done and chat.events[-1]["choices"] == []
    assert chat.usage == {
        "input_tokens": expected["prompt_tokens"],
        "output_tokens": 9,
        "total_tokens": expected["prompt_tokens"] + 9,
    }
    assert text.done and text.usage["output_tokens"] == 7 and text.usage["input_tokens"] > 0
    assert refused.done and refused.usage is None  # the client's false is kept: it estimates


def _text(answers: list[Any]) -> str:
    parts = []
    for answer in answers:
        choice = answer.choices[0]
        message = getattr(choice, "delta", None) or getattr(choice, "message", None)
        parts.append(choice.text if message is None else message.content or "")
    return "".join(parts)


def test_metrics_count_a_streams_tokens_from_its_usage(node: Node) -> None:
    """Role and finish chunks are not tokens: 5 generated tokens count 5, and the prompt counts."""
    before = _token_counters(node)
    _sse(node, "/v1/chat/completions", {**CHAT, "max_tokens": 5, "stream": True})
    after = _token_counters(node)

    assert after["completion"] - before["completion"] == 5
    assert after["prompt"] - before["prompt"] > 0


def _token_counters(node: Node) -> dict[str, float]:
    _, _, text = node.get("/metrics")
    found = {}
    for kind in ("prompt", "completion"):
        prefix = f'llmlb_{kind}_tokens_total{{model="{GEMMA_ID}"}} '
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        found[kind] = float(lines[0][len(prefix) :]) if lines else 0.0
    return found
