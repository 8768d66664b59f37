"""The engine of one loaded model: a dedicated thread running the scheduler's steps, and the
`Generation` handle a caller iterates (from a thread or from asyncio) for a request's outputs.

Every llama_decode of a model runs on its engine's one thread: OpenMP gives each calling thread a
team of its own, so changing threads per call costs a third of the speed (README: Performance).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ..errors import GenerationError, PromptTooLongError
from .native import Context
from .sampling import SamplingParams, stages
from .scheduler import Scheduler, StepStats
from .sequence import Output, Sequence

log = logging.getLogger(__name__)


class Generation:
    """One request's outputs, choice by choice, as the engine produces them.

    Iterate it (``for out in gen`` in a thread, ``async for out in gen`` in asyncio); each
    `Output` carries its choice's `index`. `cancel()` frees the request's cells at the next step.
    """

    def __init__(self, engine: Engine, n: int, prompt_tokens: int) -> None:
        self._engine = engine
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reasons: dict[int, str] = {}
        self.sequences: list[Sequence] = []
        self._queue: queue.SimpleQueue[Output] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._open = n

    def _emit(self, output: Output) -> None:  # the engine thread
        self._queue.put(output)
        if self._loop is not None and self._ready is not None:
            self._loop.call_soon_threadsafe(self._ready.set)

    def _take(self, output: Output) -> Output:
        if output.token is not None:
            self.completion_tokens += 1
        if output.finish_reason is not None:
            self.finish_reasons[output.index] = output.finish_reason
            self._open -= 1
        if output.error is not None:
            raise GenerationError(f"llama.cpp failed while generating: {output.error}")
        return output

    def __iter__(self) -> Iterator[Output]:
        while self._open:
            yield self._take(self._queue.get())

    def __aiter__(self) -> AsyncIterator[Output]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Output]:
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        while self._open:
            try:
                output = self._queue.get_nowait()
            except queue.Empty:
                await self._ready.wait()
                self._ready.clear()
                continue
            yield self._take(output)

    def cancel(self) -> None:
        """Stop generating (safe from any thread, idempotent): the cells free at the next step."""
        for seq in self.sequences:
            seq.cancelled = True
        self._engine._wake.set()

    @property
    def done(self) -> bool:
        return self._open == 0


class Engine:
    """Continuous batching for one loaded ``llama_cpp.Llama``: up to `parallel` sequences share
    one context of `n_ctx` cells each, and every step is one llama_decode on this engine's thread.

    `llama` keeps serving its own calls (``create_embedding``, chat handlers with their own loop)
    through its own context; the engine only borrows its weights.
    """

    def __init__(
        self,
        llama: Any,
        parallel: int = 4,
        n_ctx: int | None = None,
        prefill_chunk: int = 64,
        name: str = "llmlb-engine",
    ) -> None:
        self.context = Context(llama, parallel, n_ctx or int(llama.n_ctx()))
        self.scheduler = Scheduler(self.context, prefill_chunk)
        self.n_ctx = self.context.n_ctx_seq
        """What each sequence may hold: prompt plus generated tokens."""
        self._inbox: queue.SimpleQueue[list[Sequence]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def parallel(self) -> int:
        """How many sequences can run at once (a request with n choices takes n)."""
        return self.context.n_seq

    def token_text(self, token: int) -> str:
        """A generated token's text on its own (for logprobs)."""
        return self.context.piece(token).decode("utf-8", "replace")

    @property
    def stats(self) -> StepStats:
        """The scheduler's counters (steps, tokens per step, reused prefix tokens)."""
        return self.scheduler.stats

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams | None = None,
        *,
        max_tokens: int | None = None,
        stop: list[str] | None = None,
        n: int = 1,
        logprobs: int | None = None,
    ) -> Generation:
        """Queue `n` choices for `prompt` (token ids); they join at the next step with a free
        sequence id. `PromptTooLongError` if the prompt leaves no cell to generate into;
        `ValueError` if llama.cpp refuses the sampler (a grammar it cannot parse)."""
        if self._closing:
            raise RuntimeError("the engine is closed")
        if not prompt or len(prompt) >= self.n_ctx:
            raise PromptTooLongError(
                f"the prompt has {len(prompt)} tokens; a sequence of this model holds "
                f"{self.n_ctx} (prompt and answer together)",
                len(prompt),
                self.n_ctx,
            )
        params = params or SamplingParams()
        limit = self.n_ctx - len(prompt)
        max_tokens = limit if max_tokens is None else min(max_tokens, limit)
        generation = Generation(self, n, len(prompt))
        for index in range(n):
            sampler = self.context.sampler(stages(params.with_seed(index)))
            seq = Sequence(
                index, list(prompt), sampler, max_tokens, stop or [], logprobs, generation._emit
            )
            generation.sequences.append(seq)
        self._inbox.put(generation.sequences)
        self._wake.set()
        return generation

    def _run(self) -> None:
        while not self._closing:
            self._wake.clear()
            while not self._inbox.empty():
                self.scheduler.add(self._inbox.get())
            try:
                busy = self.scheduler.step()
            except Exception:  # a bug here must not leave every caller waiting for ever
                log.exception("engine step failed; cancelling its sequences")
                self.scheduler.close()
                busy = False
            if not busy:
                self._wake.wait()
        while not self._inbox.empty():
            self.scheduler.add(self._inbox.get())
        self.scheduler.close()
        self.context.close()

    def close(self) -> None:
        """Cancel what runs, stop the thread and free the context (the Llama stays loaded)."""
        self._closing = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
