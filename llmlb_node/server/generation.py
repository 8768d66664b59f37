"""Chat and text completions through the model's engine: the prompt, sampler and grammar of a
validated request, checked before any answer starts, then OpenAI's bodies and stream chunks.

`prepare()` answers None for what the engine does not do (a chat format with its own generation
loop, `suffix`, `echo`): those requests take the one-at-a-time path in `inference.py`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine, Generation, Output, SamplingParams, chat
from ..errors import PromptTooLongError
from ..lazy import LazyLlama
from .errors import ContextLengthExceededError, InvalidRequestError
from .inference import check_token_ids, renderable

# llama-cpp-python's defaults: its chat handlers' and create_completion's.
_CHAT_DEFAULTS = {"temperature": 0.2, "repeat_penalty": 1.1}
_TEXT_DEFAULTS = {"temperature": 0.8, "repeat_penalty": 1.0}
_SAMPLING = (
    "temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty",
    "presence_penalty", "logit_bias", "seed",
)  # fmt: skip


@dataclass
class Job:
    """One request, ready for the engine: what to submit and how to shape the answer."""

    chat: bool
    model_id: str
    prompt: list[int]
    params: SamplingParams
    max_tokens: int | None
    stop: list[str]
    n: int
    logprobs: int | None
    tool: str | None = None
    """``named:NAME`` or ``required``: the output is a tool call, forced by the grammar."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def prepare(
    engine: Engine, llm: LazyLlama, method: str, kwargs: dict[str, Any], model_id: str
) -> Job | None:
    """The engine job for a validated request, or None for the one-at-a-time path. Raises the
    400s: a prompt longer than a sequence's context, n above LLMLB_PARALLEL, a bad schema."""
    check_token_ids(llm, kwargs)
    kwargs = renderable(llm, kwargs)
    is_chat = method == "create_chat_completion"
    llama = llm.llama
    if (is_chat and not chat.available(llama)) or kwargs.get("suffix") or kwargs.get("echo"):
        return None
    prompt, stop = _prompt(llama, is_chat, kwargs)
    n = kwargs.get("n", 1)
    if n > engine.parallel:
        raise InvalidRequestError(
            f"'n' is {n}; this node runs at most {engine.parallel} sequences of a model at once "
            "(LLMLB_PARALLEL)",
            "n",
        )
    tool, grammar = _grammar(kwargs)
    job = Job(
        is_chat, model_id, prompt, _params(kwargs, is_chat, grammar),
        kwargs.get("max_tokens", None if is_chat else 16), stop + _stops(kwargs), n,
        _logprobs(kwargs, is_chat), tool,
    )  # fmt: skip
    if len(prompt) >= engine.n_ctx:
        raise _too_long(len(prompt), engine.n_ctx, "messages" if is_chat else "prompt")
    return job


def submit(engine: Engine, job: Job) -> Generation:
    """Queue the job (`ValueError` from llama.cpp's sampler is a 400 naming the grammar)."""
    try:
        return engine.submit(
            job.prompt, job.params, max_tokens=job.max_tokens, stop=job.stop, n=job.n,
            logprobs=job.logprobs,
        )  # fmt: skip
    except PromptTooLongError as exc:
        raise _too_long(exc.prompt_tokens, exc.n_ctx, "messages" if job.chat else "prompt") from exc
    except ValueError as exc:
        param = "tool_choice" if job.tool else "response_format"
        raise InvalidRequestError(f"llama.cpp refused the grammar: {exc}", param) from exc


def _too_long(tokens: int, n_ctx: int, param: str) -> ContextLengthExceededError:
    return ContextLengthExceededError(
        f"the prompt has {tokens} tokens; this model's context holds {n_ctx} per request (prompt "
        "and answer together). Shorten it, or start the node with a larger LLMLB_N_CTX.",
        param,
    )


def _prompt(llama: Any, is_chat: bool, kwargs: dict[str, Any]) -> tuple[list[int], list[str]]:
    if is_chat:
        rendered = chat.render(llama, kwargs["messages"], kwargs.get("tools"))
        return rendered.tokens, rendered.stop
    prompt = kwargs["prompt"]
    if isinstance(prompt, list):
        return list(prompt), []
    # As create_completion does: BOS added, special tokens in the text parsed.
    return llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True), []


def _stops(kwargs: dict[str, Any]) -> list[str]:
    stop = kwargs.get("stop") or []
    return [stop] if isinstance(stop, str) else list(stop)


def _params(kwargs: dict[str, Any], is_chat: bool, grammar: str | None) -> SamplingParams:
    values = {**(_CHAT_DEFAULTS if is_chat else _TEXT_DEFAULTS)}
    values.update({k: kwargs[k] for k in _SAMPLING if kwargs.get(k) is not None})
    return SamplingParams(**values, grammar=grammar)


def _logprobs(kwargs: dict[str, Any], is_chat: bool) -> int | None:
    if not is_chat:
        return kwargs.get("logprobs")
    return (kwargs.get("top_logprobs") or 0) if kwargs.get("logprobs") else None


# -- grammars -----------------------------------------------------------------------------------
def _grammar(kwargs: dict[str, Any]) -> tuple[str | None, str | None]:
    """(tool mode, GBNF): a tool call forced by `tool_choice`, or the shape `response_format`
    asks for; (None, None) for free text."""
    tools = kwargs.get("tools") or []
    choice = kwargs.get("tool_choice")
    if isinstance(choice, dict) and tools:
        name = choice["function"]["name"]
        tool = next(t for t in tools if t["function"]["name"] == name)
        return f"named:{name}", _from_schema(_parameters(tool), "tool_choice")
    if choice == "required" and tools:
        return "required", _from_schema(_any_call(tools), "tool_choice")
    fmt = kwargs.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        schema = fmt["json_schema"].get("schema") or {}
        return None, _from_schema(schema, "response_format")
    if fmt.get("type") == "json_object":
        return None, _from_schema(fmt.get("schema") or {"type": "object"}, "response_format")
    return None, None


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object"}


def _any_call(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A schema matching a call of any one of `tools`: ``{"name": ..., "arguments": {...}}``."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, "arguments": _parameters(t)},
            "required": ["name", "arguments"],
        }
        for t in tools
    ]
    return calls[0] if len(calls) == 1 else {"oneOf": calls}


def _from_schema(schema: dict[str, Any], param: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises whatever its parser meets
        raise InvalidRequestError(
            f"'{param}' has a JSON schema that cannot be turned into a grammar: "
            f"{type(exc).__name__}: {exc}",
            param,
        ) from None


# -- answers ------------------------------------------------------------------------------------
class Choice:
    """One choice's text, tokens and logprobs as they arrive."""

    def __init__(self) -> None:
        self.text = ""
        self.outputs: list[Output] = []
        self.finish_reason: str | None = None


async def answer(engine: Engine, job: Job, generation: Generation) -> dict[str, Any]:
    """The whole OpenAI body (chat.completion or text_completion)."""
    choices = [Choice() for _ in range(job.n)]
    try:
        async for output in generation:
            choice = choices[output.index]
            choice.text += output.text
            choice.outputs.append(output)
            choice.finish_reason = output.finish_reason or choice.finish_reason
    finally:
        generation.cancel()
    shaped = [_choice(engine, job, i, c) for i, c in enumerate(choices)]
    kind = "chat.completion" if job.chat else "text_completion"
    return {**_head(job, kind), "choices": shaped, "usage": _usage(generation)}


def _choice(engine: Engine, job: Job, index: int, choice: Choice) -> dict[str, Any]:
    reason = _finish(choice.finish_reason)
    logprobs = _chat_logprobs if job.chat else _text_logprobs
    lp = logprobs(engine, choice.outputs) if job.logprobs is not None else None
    if not job.chat:
        return {"text": choice.text, "index": index, "logprobs": lp, "finish_reason": reason}
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if job.tool is not None:
        message = {"role": "assistant", "content": None, "tool_calls": [_call(job, choice.text)]}
        reason = "tool_calls" if reason == "stop" else reason
    return {"index": index, "message": message, "logprobs": lp, "finish_reason": reason}


def _call(job: Job, text: str) -> dict[str, Any]:
    """The tool call the grammar made the model write."""
    if job.tool is not None and job.tool.startswith("named:"):
        name, arguments = job.tool[len("named:") :], text
    else:
        try:
            value = json.loads(text)
            name, arguments = value["name"], json.dumps(value["arguments"])
        except (ValueError, KeyError, TypeError):  # cut short by max_tokens
            name, arguments = "", text
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


async def chunks(engine: Engine, job: Job, generation: Generation) -> AsyncIterator[dict[str, Any]]:
    """Stream chunks as each choice's tokens arrive, then the usage chunk (``choices: []``)."""
    started: set[int] = set()
    held: dict[int, str] = {}  # tool calls are sent whole, once their JSON is complete
    try:
        async for output in generation:
            if job.chat and output.index not in started:
                started.add(output.index)
                yield _chunk(job, output.index, {"role": "assistant"}, None, None)
            if job.tool is not None:
                held[output.index] = held.get(output.index, "") + output.text
                if output.finish_reason is not None:
                    yield _tool_chunk(job, output, held.pop(output.index))
                continue
            yield _output_chunk(engine, job, output)
    finally:
        generation.cancel()
    kind = "chat.completion.chunk" if job.chat else "text_completion"
    yield {**_head(job, kind), "choices": [], "usage": _usage(generation)}


def _output_chunk(engine: Engine, job: Job, output: Output) -> dict[str, Any]:
    reason = _finish(output.finish_reason) if output.finish_reason else None
    lp = None
    if job.logprobs is not None and output.token is not None:
        lp = (_chat_logprobs if job.chat else _text_logprobs)(engine, [output])
    if not job.chat:
        choice = {"text": output.text, "index": output.index, "logprobs": lp}
        return {**_head(job, "text_completion"), "choices": [{**choice, "finish_reason": reason}]}
    return _chunk(job, output.index, {"content": output.text} if output.text else {}, lp, reason)


def _tool_chunk(job: Job, output: Output, text: str) -> dict[str, Any]:
    call = {"index": 0, **_call(job, text)}
    reason = _finish(output.finish_reason)
    return _chunk(job, output.index, {"tool_calls": [call]}, None, _tool_reason(reason))


def _tool_reason(reason: str) -> str:
    return "tool_calls" if reason == "stop" else reason


def _chunk(
    job: Job, index: int, delta: dict[str, Any], logprobs: Any, reason: str | None
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    return {**_head(job, "chat.completion.chunk"), "choices": [choice]}


def _head(job: Job, kind: str) -> dict[str, Any]:
    prefix = "chatcmpl-" if job.chat else "cmpl-"
    return {"id": prefix + job.id, "object": kind, "created": job.created, "model": job.model_id}


def _finish(reason: str | None) -> str:
    # The engine's `cancelled` never reaches a client (it left); an error is raised before.
    return "length" if reason == "length" else "stop"


def _usage(generation: Generation) -> dict[str, int]:
    prompt, completion = generation.prompt_tokens, generation.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# -- logprobs -----------------------------------------------------------------------------------
def _chat_logprobs(engine: Engine, outputs: list[Output]) -> dict[str, Any]:
    content = []
    for output in outputs:
        if output.token is None or output.logprob is None:
            continue
        text = engine.token_text(output.token)
        top = [_entry(engine.token_text(t), lp) for t, lp in output.logprob.top]
        content.append({**_entry(text, output.logprob.logprob), "top_logprobs": top})
    return {"content": content, "refusal": None}


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _text_logprobs(engine: Engine, outputs: list[Output]) -> dict[str, Any]:
    tokens, offsets, values, tops = [], [], [], []
    offset = 0
    for output in outputs:
        if output.token is None or output.logprob is None:
            continue
        text = engine.token_text(output.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        values.append(output.logprob.logprob)
        tops.append({engine.token_text(t): lp for t, lp in output.logprob.top})
    return {
        "tokens": tokens,
        "text_offset": offsets,
        "token_logprobs": values,
        "top_logprobs": tops,
    }
