"""``POST /v1/responses`` refuses what it cannot honour with a 400 naming the parameter, before
any model is touched (the answers with the real Gemma are in tests/e2e/test_responses.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from node import Node, offline_env, running_node

KEY = "node-key-0123456789"  # the node masks its key in every answer: never a common word

# A catalog model only the Hub serves: with the Hub unreachable, a valid request ends in a 502.
OK = {"model": "smollm2-360m-instruct", "input": "Hello"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node over an empty store with no source reachable: a request past validation is 4xx/5xx
    about the model, never a 400 about a parameter."""
    home: Path = tmp_path_factory.mktemp("empty-home")
    with running_node(offline_env(home), api_key=KEY) as running:
        yield running


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "smollm2-360m-instruct"}, "input"),
        ({**OK, "input": []}, "input"),
        ({**OK, "input": 5}, "input"),
        ({**OK, "input": ["x"]}, "input[0]"),
        ({**OK, "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({**OK, "input": [{"role": "user", "content": 5}]}, "input[0].content"),
        ({**OK, "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
         "input[0].content[0]"),
        ({**OK, "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].type"),
        ({**OK, "instructions": ["x"]}, "instructions"),
        ({**OK, "max_output_tokens": 0}, "max_output_tokens"),
        ({**OK, "max_output_tokens": "many"}, "max_output_tokens"),
        ({**OK, "temperature": 3}, "temperature"),
        ({**OK, "top_p": -1}, "top_p"),
        ({**OK, "stream": "yes"}, "stream"),
        ({**OK, "store": True}, "store"),
        ({**OK, "background": True}, "background"),
        ({**OK, "previous_response_id": "resp_1"}, "previous_response_id"),
        ({**OK, "tools": [{"type": "web_search"}]}, "tools"),
        ({**OK, "tool_choice": "required"}, "tool_choice"),
        ({**OK, "reasoning": {"effort": "high"}}, "reasoning"),
        ({**OK, "include": ["message.output_text.logprobs"]}, "include"),
        ({**OK, "truncation": "auto"}, "truncation"),
        ({**OK, "top_logprobs": 3}, "top_logprobs"),
        ({**OK, "text": {"format": {"type": "xml"}}}, "text"),
        ({**OK, "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({**OK, "metadata": {"a": 1}}, "metadata"),
        ({**OK, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ({**OK, "keep_alive": "soon"}, "keep_alive"),
        ({**OK, "seed": 1}, "seed"),  # not a Responses parameter: refused, not ignored
    ],
)  # fmt: skip
def test_a_parameter_that_cannot_be_honoured_is_400_naming_it(
    node: Node, body: dict, param: str
) -> None:
    status, _, answer = node.post("/v1/responses", body)

    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param
    assert param in answer["error"]["message"]


def test_what_passes_validation_reaches_the_model(node: Node) -> None:
    """Every accepted parameter at once: the request gets as far as the model (not installed,
    nothing reachable: 502), so none of them was refused."""
    body = {
        **OK,
        "input": [
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
            {"role": "user", "content": "Again."},
        ],
        "instructions": "You are kind.",
        "max_output_tokens": 16,
        "temperature": 0.5,
        "top_p": 0.9,
        "store": False,
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "truncation": "disabled",
        "metadata": {"k": "v"},
        "user": "u1",
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        "keep_alive": "1m",
    }
    status, _, answer = node.post("/v1/responses", body)
    no_key, _, refused = node.post("/v1/responses", OK, headers={"Authorization": "Bearer no"})

    assert status == 502 and answer["error"]["code"] == "download_failed", answer
    assert no_key == 401 and refused["error"]["code"] == "invalid_api_key"
