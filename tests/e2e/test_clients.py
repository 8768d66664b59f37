"""What real clients send reaches the real Gemma whole: message shapes and embedding inputs.

The official openai client against a real node; every answer is checked against what the model
saw (its prompt token count) or against another form of the same input.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from llama_cpp import Llama
from node import Node, offline_env, running_node

from .conftest import GEMMA_ID

pytestmark = pytest.mark.e2e

TEXT = "Tell me about the history of the city of Paris, in three short sentences."


@pytest.fixture(scope="module")
def node(gemma_file: Path) -> Iterator[Node]:
    with running_node(offline_env(gemma_file.parents[2], N_CTX="512")) as running:
        yield running


@pytest.fixture
def client(node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.base_url, api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def vocab(gemma_file: Path) -> Llama:
    """Gemma's tokenizer alone (no weights), to send token ids the way langchain does."""
    return Llama(str(gemma_file), vocab_only=True, verbose=False)


def _prompt_tokens(client: openai.OpenAI, messages: list) -> int:
    answer = client.chat.completions.create(
        model=GEMMA_ID, messages=messages, max_tokens=1, temperature=0
    )
    return answer.usage.prompt_tokens


def test_a_list_of_text_parts_reaches_the_prompt_whole(client: openai.OpenAI) -> None:
    """It was 7 prompt tokens (an empty user turn) against 24 for the same text as a string."""
    parts = [
        {"type": "text", "text": "Tell me about the history"},
        {"type": "text", "text": "of Paris."},
    ]
    as_parts = _prompt_tokens(client, [{"role": "user", "content": parts}])
    as_text = _prompt_tokens(
        client, [{"role": "user", "content": "Tell me about the history\nof Paris."}]
    )

    assert as_parts == as_text
    assert as_parts > _prompt_tokens(client, [{"role": "user", "content": ""}]) + 6


@pytest.mark.parametrize("role", ["system", "developer"])
def test_system_and_developer_messages_reach_gemmas_prompt(
    client: openai.OpenAI, role: str
) -> None:
    user = {"role": "user", "content": "Hi."}
    alone = _prompt_tokens(client, [user])
    instructed = _prompt_tokens(
        client, [{"role": role, "content": "Always answer in French."}, user]
    )

    assert instructed >= alone + 5  # the instruction's tokens, not dropped


def test_a_tool_round_trip_with_no_content_key_is_200_and_reaches_the_prompt(
    client: openai.OpenAI, node: Node
) -> None:
    """An assistant turn with tool_calls and no content key was a 500 that closed the connection."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    question = {"role": "user", "content": "What is the weather in Paris?"}
    turns = [question, {"role": "assistant", "tool_calls": [call]}]
    status, _, raw = node.post(
        "/v1/chat/completions",
        {
            "model": GEMMA_ID,
            "messages": turns
            + [{"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."}],
            "max_tokens": 4,
        },
    )
    without_result = _prompt_tokens(client, turns)
    with_result = _prompt_tokens(
        client,
        [*turns, {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."}],
    )

    assert status == 200, raw
    assert raw["choices"][0]["message"]["role"] == "assistant"
    assert without_result > _prompt_tokens(client, [question]) + 5  # the call, written out
    assert with_result > without_result + 5  # the tool's result, as a user turn


def test_embeddings_are_unit_length(client: openai.OpenAI) -> None:
    out = client.embeddings.create(
        model=GEMMA_ID, input=["hello world", "goodbye"], encoding_format="float"
    )

    norms = [math.sqrt(sum(x * x for x in d.embedding)) for d in out.data]
    assert norms == pytest.approx([1.0, 1.0], abs=1e-4)


def test_token_id_inputs_embed_as_their_text_does(client: openai.OpenAI, vocab: Llama) -> None:
    """[int] and [[int]], what langchain's OpenAIEmbeddings sends by default."""
    texts = ["hello world", "the cat sat on the mat"]
    ids = [vocab.tokenize(t.encode()) for t in texts]
    by_text = client.embeddings.create(model=GEMMA_ID, input=texts, encoding_format="float")
    by_ids = client.embeddings.create(model=GEMMA_ID, input=ids, encoding_format="float")
    one = client.embeddings.create(model=GEMMA_ID, input=ids[0], encoding_format="float")

    for text, tokens in zip(by_text.data, by_ids.data, strict=True):
        assert tokens.embedding == pytest.approx(text.embedding, abs=1e-4)
    assert one.data[0].embedding == pytest.approx(by_text.data[0].embedding, abs=1e-4)
    assert by_ids.usage.prompt_tokens == sum(len(t) for t in ids) == by_text.usage.prompt_tokens


def test_an_input_longer_than_the_context_is_400_never_cut(
    client: openai.OpenAI, vocab: Llama
) -> None:
    with pytest.raises(openai.BadRequestError) as text:
        client.embeddings.create(model=GEMMA_ID, input=["fine", "word " * 700])
    with pytest.raises(openai.BadRequestError) as ids:
        client.embeddings.create(model=GEMMA_ID, input=[[9259] * 600])
    with pytest.raises(openai.BadRequestError) as past_vocab:
        client.embeddings.create(model=GEMMA_ID, input=[[262144]])

    assert text.value.code == "context_length_exceeded" and text.value.body["param"] == "input"
    assert "'input[1]' is" in text.value.message and "512" in text.value.message
    assert ids.value.code == "context_length_exceeded"
    assert past_vocab.value.body["param"] == "input"


def test_dimensions_is_400_unless_it_is_the_models_vector_size(client: openai.OpenAI) -> None:
    full = client.embeddings.create(
        model=GEMMA_ID, input="x", dimensions=640, encoding_format="float"
    )
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=GEMMA_ID, input="x", dimensions=256)

    assert len(full.data[0].embedding) == 640
    assert caught.value.body["param"] == "dimensions" and "640" in caught.value.message
