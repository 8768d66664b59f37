"""One choice of one request on its way through the engine: its prompt, its cells, the tokens it
generated, and the text it has let out so far (held back while it could still become a stop).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from .native import Sampler
from .sampling import TokenLogprob


class SequenceState(Enum):
    """Where a sequence is (llama.cpp's server calls these slot states)."""

    WAITING = "waiting"  # queued: no cells yet
    PREFILL = "prefill"  # has cells; its prompt is being evaluated chunk by chunk
    DECODING = "decoding"  # one token per step
    FINISHED = "finished"  # its cells are free again


@dataclass(frozen=True)
class Output:
    """What one step produced for one choice: text let out (maybe empty), the token, and, at the
    end, why it finished (``stop``, ``length``, ``cancelled`` or ``error``)."""

    index: int
    text: str
    token: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    error: BaseException | None = None


class Sequence:
    """One choice: prompt tokens, sampler chain, stop rules, and an `emit` for its outputs."""

    def __init__(
        self,
        index: int,
        prompt: list[int],
        sampler: Sampler,
        max_tokens: int,
        stop: list[str],
        logprobs: int | None,
        emit: Callable[[Output], None],
    ) -> None:
        self.index = index
        self.prompt = prompt
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.logprobs = logprobs
        """How many alternatives to report per token (0: only the chosen one); None: no logprobs."""
        self.emit = emit
        self.state = SequenceState.WAITING
        self.seq_id = -1
        self.n_cached = 0
        """Tokens of `tokens` already in this sequence's cells."""
        self.generated: list[int] = []
        self.parent: Sequence | None = None
        """For the 2nd..nth choice: the sequence whose evaluated prompt it copies."""
        self.cancelled = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._held = ""

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def pending(self) -> list[int]:
        """Tokens not evaluated yet: the rest of the prompt, or the last sampled token."""
        return self.tokens[self.n_cached :]

    def accept(self, token: int, logprob: TokenLogprob | None, is_eog: bool, piece: bytes) -> None:
        """Take the sampled `token`: emit its text (minus a possible stop), finish if it ends."""
        self.generated.append(token)
        if is_eog:  # not a token of the answer (llama-cpp-python does not count it either)
            self.finish("stop")
            return
        self._held += self._decoder.decode(piece)
        stop_at = min((i for i in (self._held.find(s) for s in self.stop) if i >= 0), default=-1)
        if stop_at >= 0:
            self._held = self._held[:stop_at]
            self.finish("stop", token, logprob)
        elif len(self.generated) >= self.max_tokens:
            self.finish("length", token, logprob)
        else:
            cut = len(self._held) - self._stop_prefix()
            text, self._held = self._held[:cut], self._held[cut:]
            self.emit(Output(self.index, text, token, logprob))

    def _stop_prefix(self) -> int:
        """How many trailing characters could still start a stop string."""
        held = self._held
        for size in range(min(len(held), max((len(s) for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(held[-size:]) for s in self.stop):
                return size
        return 0

    def finish(
        self,
        reason: str,
        token: int | None = None,
        logprob: TokenLogprob | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Emit what is held and the finish reason; the scheduler frees the cells."""
        if self.state is SequenceState.FINISHED:
            return
        self.state = SequenceState.FINISHED
        text = self._held + (self._decoder.decode(b"", final=True) if reason != "stop" else "")
        self._held = ""
        self.emit(Output(self.index, text, token, logprob, reason, error))
        self.sampler.close()
