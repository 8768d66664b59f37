"""``POST /v1/responses`` on a real node with the real Gemma, driven by the official openai client:
``client.responses.create(...).output_text``, its streams, its errors, and the llmlb load
balancer's stand-in forwarding it as the LB does (as-is, counting tokens from the last event)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from lb import LoadBalancer
from node import Node, offline_env, running_node

from .conftest import GEMMA_ID

KEY = "node-key-0123456789"  # the node masks its key in every answer: never a common word

pytestmark = pytest.mark.e2e

SEQUENCE = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
CLOSING = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
YES_NO = {
    "type": "json_schema",
    "name": "answer",
    "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
}


@pytest.fixture(scope="module")
def node(gemma_file: Path) -> Iterator[Node]:
    with running_node(offline_env(gemma_file.parents[2]), api_key=KEY, N_CTX="512") as running:
        yield running


@pytest.fixture
def client(node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.base_url, api_key=KEY, max_retries=0)


def _settled(create: Any, **body: Any) -> Any:
    """`create(**body)` after one identical call, so that the next request with the same prompt
    finds the same cached prefix and samples the same tokens at temperature 0 (see
    tests/e2e/test_stream_usage.py)."""
    create(**body)
    return create(**body)


def test_output_text_of_a_string_input(client: openai.OpenAI) -> None:
    answer = client.responses.create(
        model=GEMMA_ID, input="The capital of France is", max_output_tokens=8, temperature=0
    )

    assert answer.object == "response" and answer.id.startswith("resp_")
    assert answer.model == GEMMA_ID and answer.output_text.strip()
    assert answer.output[0].type == "message" and answer.output[0].role == "assistant"
    assert answer.output[0].content[0].text == answer.output_text
    assert answer.status == "incomplete"  # 8 tokens, cut by max_output_tokens, as OpenAI says
    assert answer.incomplete_details.reason == "max_output_tokens"
    assert answer.usage.output_tokens == 8 and answer.usage.input_tokens > 0
    assert answer.usage.total_tokens == answer.usage.input_tokens + 8
    assert (answer.temperature, answer.max_output_tokens, answer.store) == (0, 8, False)


def test_it_generates_what_the_chat_route_generates_for_the_same_turns(
    client: openai.OpenAI,
) -> None:
    """instructions are the system turn and input items the turns (Gemma has no system role:
    the system text opens the first user turn, on both routes)."""
    turns = [
        {"role": "user", "content": [{"type": "input_text", "text": "Name a fruit."}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "An apple."}]},
        {"role": "user", "content": "Another one."},
    ]
    system = "Answer in French."
    common = {"model": GEMMA_ID, "temperature": 0}
    answer = _settled(
        client.responses.create, **common, instructions=system, input=turns, max_output_tokens=12
    )
    chat = client.chat.completions.create(
        **common,
        max_tokens=12,
        messages=[
            {"role": "system", "content": system},
            {"role": "user", "content": "Name a fruit."},
            {"role": "assistant", "content": "An apple."},
            {"role": "user", "content": "Another one."},
        ],
    )
    without = client.responses.create(**common, input=turns, max_output_tokens=1)

    assert answer.output_text == chat.choices[0].message.content
    assert answer.usage.input_tokens == chat.usage.prompt_tokens
    assert answer.usage.input_tokens > without.usage.input_tokens + 4  # the instructions count
    assert answer.instructions == system


def test_a_stream_has_openais_event_sequence_and_the_same_text(client: openai.OpenAI) -> None:
    body = {"model": GEMMA_ID, "input": "Once upon a time", "max_output_tokens": 10}
    whole = _settled(client.responses.create, **body, temperature=0)
    events = list(client.responses.create(**body, temperature=0, stream=True))

    types = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert types == [*SEQUENCE, *["response.output_text.delta"] * len(deltas), *CLOSING,
                     "response.incomplete"]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(d.delta for d in deltas)
    assert text == whole.output_text
    assert events[-4].text == text and events[-3].part.text == text
    final = events[-1].response
    assert final.output_text == text and final.status == "incomplete"
    assert final.usage.model_dump() == whole.usage.model_dump()
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert {d.item_id for d in deltas} == {final.output[0].id}


def test_a_json_schema_is_enforced_and_the_answer_completes(client: openai.OpenAI) -> None:
    body = {"model": GEMMA_ID, "input": "Is water wet?", "max_output_tokens": 40}
    answer = client.responses.create(**body, text={"format": YES_NO})
    with client.responses.stream(**body, text={"format": YES_NO}) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()  # needs response.completed

    assert answer.status == "completed" and answer.incomplete_details is None
    assert isinstance(json.loads(answer.output_text)["ok"], bool)
    assert types[-1] == "response.completed"
    assert isinstance(json.loads(final.output_text)["ok"], bool)


def test_errors_have_the_openai_shape_before_and_during_a_stream(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model="no-such-model", input="Hi")
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model=GEMMA_ID, input="Hi", store=True)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.responses.create(model=GEMMA_ID, input="word " * 700)
    # The prompt is tokenized before the stream starts: a 400, not a 200 with an error event.
    with pytest.raises(openai.BadRequestError) as too_long_stream:
        client.responses.create(model=GEMMA_ID, input="word " * 700, stream=True)

    assert unknown.value.code == "model_not_found" and unknown.value.body["param"] == "model"
    assert bad.value.body["param"] == "store"
    assert too_long.value.code == "context_length_exceeded"
    assert too_long_stream.value.code == "context_length_exceeded"


def test_the_load_balancer_forwards_it_and_counts_its_tokens(node: Node) -> None:
    lb = LoadBalancer()
    lb.register("node-1", node.url, KEY)
    body = {"model": GEMMA_ID, "input": "Hello", "max_output_tokens": 6}
    whole = lb.forward("node-1", "/v1/responses", body)
    streamed = lb.forward("node-1", "/v1/responses", {**body, "stream": True})

    assert whole.status == 200 and whole.body["usage"]["output_tokens"] == 6
    # 200: forwarded as it was (an injected stream_options would be a 400 unknown parameter)
    assert streamed.status == 200 and streamed.events[-1]["type"] == "response.incomplete"
    assert streamed.usage == {
        "input_tokens": whole.body["usage"]["input_tokens"],
        "output_tokens": 6,
        "total_tokens": whole.body["usage"]["input_tokens"] + 6,
    }
