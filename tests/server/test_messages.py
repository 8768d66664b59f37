"""Chat messages reach the prompt whole: rendered by llama-cpp-python's own chat formats."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from llama_cpp import llama_chat_format

from llmlb_node.server.messages import ChatFormat, for_format, text_of

CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "developer", "content": "Use metric units."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}],
    },
    {"role": "assistant", "tool_calls": [CALL]},  # no content key at all
    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    {"role": "user", "content": "And now?"},
]
TEXTS = ["Answer briefly.", "Use metric units.", "Part one.\nPart two.", '"add"', "42", "And now?"]

# Enough of a Jinja chat template for its roles to show: Gemma 3's GGUF template raises on
# turns that do not alternate and names no tool role; a ChatML one names system and tool.
ALTERNATING = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
)
WITH_TOOLS = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}<tool>{{ m['content'] }}</tool>"
    "{% elif m['role'] == 'system' %}<sys>{{ m['content'] }}</sys>{% else %}"
    "<{{ m['role'] }}>{{ m['content'] }}{% for c in m.tool_calls or [] %}"
    "[{{ c.function.name }}]{% endfor %}{% endif %}{% endfor %}"
)


def _gemma_prompt(messages: list[dict]) -> str:
    fmt = ChatFormat.of(SimpleNamespace(chat_format="gemma", chat_handler=None, metadata={}))
    return llama_chat_format.format_gemma(messages=for_format(messages, fmt)).prompt


def test_gemmas_format_renders_every_message_it_used_to_drop() -> None:
    prompt = _gemma_prompt(CONVERSATION)

    assert all(text in prompt for text in TEXTS), prompt
    assert prompt.startswith(
        "<start_of_turn>user\nAnswer briefly.\n\nUse metric units.\n\nPart one."
    )
    # user, model (its call), user (the tool's result, then the question), the model's turn
    assert prompt.count("<start_of_turn>user") == 2 and prompt.count("<start_of_turn>model") == 2
    assert "Result of the tool add:\n42\n\nAnd now?" in prompt


def test_without_the_mapping_gemmas_format_drops_them() -> None:
    """The defect, shown with llama-cpp-python's own formatter: text parts render as nothing,
    system, developer and tool turns vanish."""
    flat = [{**m, "content": m.get("content")} for m in CONVERSATION]
    prompt = llama_chat_format.format_gemma(messages=flat).prompt

    assert not any(text in prompt for text in ["Answer briefly.", "Part one.", "42"])


def test_a_template_that_wants_alternating_turns_gets_them() -> None:
    fmt = ChatFormat.of_template(ALTERNATING)
    formatter = llama_chat_format.Jinja2ChatFormatter(ALTERNATING, "", "")
    prompt = formatter(messages=for_format(CONVERSATION, fmt)).prompt

    assert fmt.roles == frozenset({"user", "assistant"}) and fmt.alternates
    assert all(text in prompt for text in TEXTS), prompt


def test_a_template_with_tool_and_system_roles_gets_them_as_they_are() -> None:
    fmt = ChatFormat.of_template(WITH_TOOLS)
    formatter = llama_chat_format.Jinja2ChatFormatter(WITH_TOOLS, "", "")
    prompt = formatter(messages=for_format(CONVERSATION, fmt)).prompt

    assert {"system", "tool"} <= fmt.roles and fmt.tool_calls and not fmt.alternates
    assert "<sys>Answer briefly.</sys>" in prompt and "<tool>42</tool>" in prompt
    assert "<assistant>[add]" in prompt  # the template renders the call itself
    assert "<sys>Use metric units.</sys>" in prompt  # developer: the system role it knows


def test_a_named_format_with_a_system_role_reads_one_system_message_holding_all() -> None:
    fmt = ChatFormat.of(SimpleNamespace(chat_format="chatml", chat_handler=None, metadata={}))
    prompt = llama_chat_format.format_chatml(messages=for_format(CONVERSATION, fmt)).prompt

    assert all(text in prompt for text in TEXTS), prompt
    assert prompt.count("<|im_start|>system") == 1


def test_a_custom_chat_handler_gets_the_messages_with_only_their_parts_joined() -> None:
    llama = SimpleNamespace(chat_format=None, chat_handler=object(), metadata={})

    assert ChatFormat.of(llama) is None
    assert [m["role"] for m in for_format(CONVERSATION, None)] == [m["role"] for m in CONVERSATION]


@pytest.mark.parametrize(
    ("content", "text"),
    [
        (None, ""),
        ("x", "x"),
        ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "a\nb"),
    ],
)
def test_content_is_one_string(content: object, text: str) -> None:
    assert text_of(content) == text
