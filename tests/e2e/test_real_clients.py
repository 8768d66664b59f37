"""langchain-openai and litellm, as their users call them, against a real node with the real Gemma.

Each sends what the review found dropped or refused: system turns, a tool round trip whose
assistant turn has no content, embeddings. langchain's `OpenAIEmbeddings` runs with
`check_embedding_ctx_length=False`: its default first fetches tiktoken's cl100k_base file from
the internet (not reachable here); what it then sends, lists of token ids, is tested with the
openai client in tests/e2e/test_clients.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from node import Node, offline_env, running_node

from .conftest import GEMMA_ID

pytestmark = pytest.mark.e2e

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from GitHub at import

CALL = {"id": "call_1", "name": "get_weather", "args": {"city": "Paris"}}


@pytest.fixture(scope="module")
def node(gemma_file: Path) -> Iterator[Node]:
    with running_node(offline_env(gemma_file.parents[2], N_CTX="512")) as running:
        yield running


def test_langchain_chat_with_a_system_turn_and_text_parts(node: Node) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model=GEMMA_ID, base_url=node.base_url, api_key="none", max_tokens=1, temperature=0
    )
    parts = [{"type": "text", "text": "Name a colour."}, {"type": "text", "text": "One word."}]
    plain = chat.invoke([HumanMessage("Name a colour.\nOne word.")])
    as_parts = chat.invoke([HumanMessage(parts)])
    instructed = chat.invoke([SystemMessage("Answer in French, always."), HumanMessage(parts)])

    tokens = [m.usage_metadata["input_tokens"] for m in (plain, as_parts, instructed)]
    assert tokens[0] == tokens[1]  # the parts reach the prompt whole
    assert tokens[2] >= tokens[1] + 5  # so does the system turn


def test_langchain_tool_round_trip(node: Node) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=GEMMA_ID, base_url=node.base_url, api_key="none", max_tokens=8)
    question = HumanMessage("What is the weather in Paris?")
    called = AIMessage(content="", tool_calls=[CALL])
    answer = chat.invoke(
        [question, called, ToolMessage("Sunny, 21 degrees.", tool_call_id="call_1")]
    )
    asked = chat.invoke([question])

    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    assert answer.usage_metadata["input_tokens"] > asked.usage_metadata["input_tokens"] + 10


def test_langchain_embeddings_are_unit_length(node: Node) -> None:
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model=GEMMA_ID, base_url=node.base_url, api_key="none", check_embedding_ctx_length=False
    )
    vectors = embeddings.embed_documents(["hello world", "the cat sat on the mat"])
    query = embeddings.embed_query("hello world")

    assert [len(v) for v in vectors] == [640, 640]
    assert [math.sqrt(sum(x * x for x in v)) for v in vectors] == pytest.approx([1, 1], abs=1e-4)
    assert query == pytest.approx(vectors[0], abs=1e-4)


def test_litellm_chat_and_embeddings(node: Node) -> None:
    import litellm

    where = {"api_base": node.base_url, "api_key": "none"}
    messages = [
        {"role": "system", "content": "Answer in French, always."},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
    ]
    answer = litellm.completion(
        model=f"openai/{GEMMA_ID}", messages=messages, max_tokens=2, temperature=0, **where
    )
    alone = litellm.completion(
        model=f"openai/{GEMMA_ID}", messages=messages[1:], max_tokens=2, temperature=0, **where
    )
    vectors = litellm.embedding(model=f"openai/{GEMMA_ID}", input=["hello world"], **where)

    assert answer.choices[0].message.content is not None
    assert answer.usage.prompt_tokens >= alone.usage.prompt_tokens + 5
    embedding = vectors.data[0]["embedding"]
    assert len(embedding) == 640
    assert math.sqrt(sum(x * x for x in embedding)) == pytest.approx(1, abs=1e-4)
