"""A node key short enough to occur in any text ("e") never garbles what the model generated:
the scrubber masks secrets in the node's own texts (errors, statuses), not in a model's output.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from node import Node, offline_env, running_node

from .conftest import GEMMA_ID

KEY = "e"  # every English answer holds it
CHAT = {
    "model": GEMMA_ID,
    "messages": [{"role": "user", "content": "Describe the weather in three sentences."}],
    "temperature": 0,
    "max_tokens": 24,
}

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def node(gemma_file: Path) -> Iterator[Node]:
    with running_node(offline_env(gemma_file.parents[2]), api_key=KEY, N_CTX="1024") as running:
        yield running


def test_a_short_key_never_garbles_generated_text(node: Node) -> None:
    client = openai.OpenAI(base_url=node.base_url, api_key=KEY, max_retries=0)
    whole = client.chat.completions.create(**CHAT).choices[0].message.content or ""
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(**CHAT, stream=True)
        if chunk.choices
    )
    completion = client.completions.create(
        model=GEMMA_ID, prompt="The weather here is", max_tokens=24, temperature=0
    )
    for text in (whole, streamed, completion.choices[0].text):
        assert KEY in text and "***" not in text, text
    usage = client.chat.completions.create(
        **CHAT, stream=True, stream_options={"include_usage": True}
    )
    assert [c.usage.completion_tokens for c in usage if c.usage] == [24]  # "completion_tokens"


def test_the_nodes_own_texts_are_still_scrubbed(node: Node) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    # An unknown model's error is the node's own text: the key is masked in its message, and
    # only there (the keys and codes of the answer stay as written).
    answer = httpx.post(
        node.url + "/v1/chat/completions",
        json={**CHAT, "model": "no-such-model-here"},
        headers=headers,
        timeout=30,
    )
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert "***" in error["message"] and KEY not in error["message"]
