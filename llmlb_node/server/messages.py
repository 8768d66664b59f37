"""OpenAI chat messages -> the messages a model's chat format renders: nothing dropped on the way.

llama-cpp-python's named chat formats keep only the roles in their table (Gemma's: user and
assistant) and read a list of text parts as no text at all; a message they cannot render is
folded into one they can: text parts joined, `developer` as `system`, `system` into the next user
turn, `tool` results as user turns, tool calls as text, turns of one role merged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_NAMED_FORMAT_ROLES = {"gemma": frozenset({"user", "assistant"})}
"""Named formats that render fewer roles than the usual system, user and assistant."""


@dataclass(frozen=True)
class ChatFormat:
    """What one model's chat format renders, as far as it can be known before rendering."""

    roles: frozenset[str]
    """The roles it renders; any other is mapped onto these."""
    tool_calls: bool = False
    """It renders an assistant turn's ``tool_calls`` itself."""
    alternates: bool = True
    """It wants user and assistant turns to alternate (two in a row are merged)."""
    one_system: bool = False
    """It reads only the first system message (llama-cpp-python's named formats): all of them
    are joined into that one."""

    @classmethod
    def of(cls, llama: Any) -> ChatFormat | None:
        """The format `llama` (a loaded ``Llama``) renders chats with; None for a custom chat
        handler, whose messages are passed as they come (only text parts joined)."""
        if getattr(llama, "chat_handler", None) is not None:
            return None
        name = getattr(llama, "chat_format", None) or ""
        if name.startswith("chat_template."):
            return cls.of_template(_template(llama, name))
        roles = _NAMED_FORMAT_ROLES.get(name, frozenset({"system", "user", "assistant"}))
        return cls(roles, one_system=True)

    @classmethod
    def of_template(cls, template: str) -> ChatFormat:
        """A Jinja chat template's format: the roles it names, whether it renders tool calls."""
        named = {r for r in _ROLES if re.search(rf"""['"]{r}['"]""", template)}
        return cls(
            frozenset(named | {"user", "assistant"}),
            tool_calls="tool_calls" in template,
            alternates="alternate" in template,
        )


def _template(llama: Any, name: str) -> str:
    metadata: Mapping[str, str] = getattr(llama, "metadata", None) or {}
    key = "tokenizer.chat_template"
    if name != "chat_template.default":
        key = f"tokenizer.{name}"
    return metadata.get(key, "")


def text_of(content: Any) -> str:
    """A message's content as one string: a list of text parts joined by newlines."""
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content)
    return content or ""


def for_format(messages: Iterable[Mapping[str, Any]], fmt: ChatFormat | None) -> list[dict]:
    """`messages` (validated by `openai.parse_chat`) as `fmt` can render them."""
    flat = [{**m, "content": text_of(m.get("content"))} for m in messages]
    if fmt is None:
        return flat
    names = _call_names(flat)
    mapped = [_map(m, fmt, names) for m in flat]
    return _merge(_fold_system(mapped, fmt), fmt)


def _call_names(messages: list[dict]) -> dict[str, str]:
    """tool_call_id -> the function an assistant turn called under it."""
    return {
        call.get("id", ""): call["function"]["name"]
        for m in messages
        for call in m.get("tool_calls") or ()
    }


def _map(message: dict, fmt: ChatFormat, names: dict[str, str]) -> dict:
    role = message["role"]
    if role == "developer" and role not in fmt.roles:
        return {"role": "system", "content": message["content"]}
    if role in ("tool", "function") and role not in fmt.roles:
        name = message.get("name") or names.get(message.get("tool_call_id", ""), "")
        label = f"Result of the tool {name}" if name else "Tool result"
        return {"role": "user", "content": f"{label}:\n{message['content']}"}
    if role == "assistant" and message.get("tool_calls") and not fmt.tool_calls:
        return {"role": "assistant", "content": _with_calls(message)}
    return message


def _with_calls(message: dict) -> str:
    calls = [
        json.dumps({"name": c["function"]["name"], "arguments": c["function"].get("arguments")})
        for c in message["tool_calls"]
    ]
    return "\n".join(filter(None, [message["content"], *calls]))


def _fold_system(messages: list[dict], fmt: ChatFormat) -> list[dict]:
    """Without a system role, system text opens the next user turn (as Gemma's own template
    does); with nothing after it, it is a user turn itself."""
    if "system" in fmt.roles:
        return _one_system(messages) if fmt.one_system else messages
    out: list[dict] = []
    pending: list[str] = []
    for message in messages:
        if message["role"] == "system":
            pending.append(message["content"])
            continue
        if pending and message["role"] == "user":
            message = {**message, "content": "\n\n".join([*pending, message["content"]])}
            pending = []
        out.append(message)
    if pending:
        out.append({"role": "user", "content": "\n\n".join(pending)})
    return out


def _one_system(messages: list[dict]) -> list[dict]:
    texts = [m["content"] for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": "\n\n".join(texts)}, *rest] if texts else rest


def _merge(messages: list[dict], fmt: ChatFormat) -> list[dict]:
    """Two user (or assistant) turns in a row become one, for formats that alternate."""
    if not fmt.alternates:
        return messages
    out: list[dict] = []
    for message in messages:
        last = out[-1] if out else None
        plain = message["role"] in ("user", "assistant") and not message.get("tool_calls")
        if last is not None and plain and last["role"] == message["role"]:
            last["content"] = f"{last['content']}\n\n{message['content']}"
        else:
            out.append(dict(message))
    return out
