"""The node's chat and completions through the engine, with the real Gemma, llama.cpp and the
official openai client: batched streams (proved by the engine's counters in /metrics, not by
timing), cancellation, prefix reuse, n > 1, logprobs, JSON schemas and forced tool calls.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pydantic
import pytest
from node import Node, offline_env, running_node

from .conftest import GEMMA_ID

pytestmark = pytest.mark.e2e

NO_EOS = {"1": -100, "106": -100}  # Gemma's <eos> and <end_of_turn>: streams run their length


@pytest.fixture(scope="module")
def node(gemma_file: Path) -> Iterator[Node]:
    with running_node(offline_env(gemma_file.parents[2], N_CTX="512", PARALLEL="4")) as running:
        yield running


@pytest.fixture
def client(node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.base_url, api_key="none", max_retries=0)


def engine_counters(node: Node) -> dict[str, float]:
    """The engine's own counters for Gemma, from /metrics."""
    text = httpx.get(node.url + "/metrics", timeout=30).text
    found = re.findall(rf'^(llmlb_engine_\w+)_total{{model="{GEMMA_ID}"}} (\S+)$', text, re.M)
    return {name: float(value) for name, value in found}


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after[f"llmlb_engine_{name}"] - before.get(f"llmlb_engine_{name}", 0.0)


def settled(node: Node) -> dict[str, float]:
    """The counters once the engine has counted its last step (it counts after answering)."""
    last: dict[str, float] = {}
    for _ in range(100):
        now = engine_counters(node)
        if now == last:
            return now
        last = now
        time.sleep(0.05)
    return last


def test_concurrent_streams_decode_in_the_same_steps(client: openai.OpenAI, node: Node) -> None:
    client.completions.create(model=GEMMA_ID, prompt="warm", max_tokens=1)
    before = settled(node)

    def stream(prompt: str) -> int:
        chunks = client.completions.create(
            model=GEMMA_ID, prompt=prompt, max_tokens=16, temperature=0, stream=True,
            logit_bias=NO_EOS,
        )  # fmt: skip
        return sum(1 for c in chunks if c.choices and c.choices[0].text)

    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(stream, ["The sea", "A red fox", "In 1999", "My garden"]))
    after = settled(node)

    assert all(n >= 14 for n in counts)  # a token can be a partial character: no text yet
    assert delta(before, after, "decoded_tokens") == 4 * 15
    # One request at a time would take 4 x 16 steps; four at once share them (requests arrive
    # over HTTP a little apart, so the first and last steps can carry fewer).
    assert delta(before, after, "steps") <= 16 + 12


def test_a_stream_longer_than_the_context_is_400_before_it_starts(node: Node) -> None:
    body = {"model": GEMMA_ID, "prompt": "word " * 600, "max_tokens": 4, "stream": True}
    answer = httpx.post(node.url + "/v1/completions", json=body, timeout=60)

    assert answer.status_code == 400
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["error"]["code"] == "context_length_exceeded"


def test_a_follow_up_turn_reuses_the_cached_conversation(client: openai.OpenAI, node: Node) -> None:
    turn = [{"role": "user", "content": "Name three colours of the rainbow, please."}]
    first = client.chat.completions.create(
        model=GEMMA_ID, messages=turn, max_tokens=8, temperature=0
    )
    before = settled(node)
    follow = [*turn, {"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "And two more?"}]  # fmt: skip
    client.chat.completions.create(model=GEMMA_ID, messages=follow, max_tokens=4, temperature=0)
    after = settled(node)

    assert delta(before, after, "reused_tokens") >= first.usage.prompt_tokens


def test_n_choices_come_from_one_evaluated_prompt(client: openai.OpenAI, node: Node) -> None:
    before = settled(node)
    answer = client.chat.completions.create(
        model=GEMMA_ID, messages=[{"role": "user", "content": "Name an animal."}],
        max_tokens=10, temperature=1.0, seed=5, n=3, logit_bias=NO_EOS,
    )  # fmt: skip
    after = settled(node)

    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len({c.message.content for c in answer.choices}) > 1
    assert answer.usage.completion_tokens == 30
    assert delta(before, after, "prompt_tokens") <= answer.usage.prompt_tokens


def test_n_above_llmlb_parallel_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="LLMLB_PARALLEL"):
        client.completions.create(model=GEMMA_ID, prompt="x", max_tokens=2, n=5)


def test_chat_logprobs_and_top_logprobs(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=GEMMA_ID, messages=[{"role": "user", "content": "Say hi."}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=3, logit_bias=NO_EOS,
    )  # fmt: skip
    content = answer.choices[0].logprobs.content

    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the best
    assert "".join(e.token for e in content) == answer.choices[0].message.content


def test_completion_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=GEMMA_ID, prompt="The capital of France is", max_tokens=4, temperature=0,
        logprobs=2, logit_bias=NO_EOS,
    )  # fmt: skip
    lp = out.choices[0].logprobs

    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text


class City(pydantic.BaseModel):
    name: str
    country: str
    population: int


def test_parse_with_a_pydantic_schema(client: openai.OpenAI) -> None:
    answer = client.chat.completions.parse(
        model=GEMMA_ID, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City, max_tokens=80, temperature=0,
    )  # fmt: skip
    city = answer.choices[0].message.parsed

    assert isinstance(city, City) and isinstance(city.population, int)


def test_an_invalid_json_schema_is_400(client: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=GEMMA_ID, messages=[{"role": "user", "content": "x"}], response_format=bad
        )
    assert caught.value.body["param"] == "response_format"  # type: ignore[index]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_forces_a_call(client: openai.OpenAI, stream: bool) -> None:
    ask = {"model": GEMMA_ID, "messages": [{"role": "user", "content": "Weather in Oslo?"}],
           "tools": [WEATHER, TIME], "tool_choice": "required", "max_tokens": 60,
           "temperature": 0}  # fmt: skip
    if stream:
        chunks = list(client.chat.completions.create(**ask, stream=True))
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        reason = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**ask).choices[0]
        calls, reason = choice.message.tool_calls, choice.finish_reason

    assert reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(calls[0].function.arguments), dict)


# Gemma 270M is a base model: asked plainly it loops inside the string ("1000000...") until
# max_tokens. The grammar decides the call's shape; the example decides when its string ends.
ZONE_QUESTION = 'Which time zone is Tokyo in? Answer like {"zone": "Europe/Paris"}.'


def test_a_named_tool_choice_calls_that_tool(client: openai.OpenAI) -> None:
    choice = client.chat.completions.create(
        model=GEMMA_ID, messages=[{"role": "user", "content": ZONE_QUESTION}],
        tools=[WEATHER, TIME], max_tokens=40, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    ).choices[0]  # fmt: skip

    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_time" and "zone" in json.loads(call.function.arguments)


def test_a_client_leaving_frees_its_sequence_for_the_next(gemma_file: Path) -> None:
    with running_node(offline_env(gemma_file.parents[2], N_CTX="512", PARALLEL="1")) as node:
        body = {"model": GEMMA_ID, "prompt": "Count:", "max_tokens": 400, "stream": True,
                "logit_bias": NO_EOS}  # fmt: skip
        sock = socket.create_connection(("127.0.0.1", node.port))
        payload = json.dumps(body).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        seen = b""
        while seen.count(b'"text"') < 3:
            seen += sock.recv(65536)
        sock.close()  # one sequence: the next request can only run once this one is gone
        client = openai.OpenAI(base_url=node.base_url, api_key="none", max_retries=0)
        out = client.completions.create(model=GEMMA_ID, prompt="Hi", max_tokens=3, temperature=0)
        counters = settled(node)

    assert out.choices[0].text
    # The cancelled stream stopped long before its 400 tokens.
    assert counters["llmlb_engine_decoded_tokens"] < 200
