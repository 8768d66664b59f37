"""Continuous batching: the waiting and running sequences of one model, and `step()`, which puts
every running sequence's next tokens (prompt chunks and decode tokens together) into one
llama_decode and lets each sequence sample from its own logits.
"""

from __future__ import annotations

import collections
import logging
from collections import deque
from dataclasses import dataclass, field

from .native import Context, DecodeError, Piece
from .sampling import logprob
from .sequence import Sequence, SequenceState

log = logging.getLogger(__name__)

MIN_REUSE = 16
"""Fewer shared prefix tokens than this (a BOS, a chat template's first line) are not worth
taking a free sequence id above the lowest: evaluating them again costs less than the second pass
over the weights a gap in the running ids costs every step."""


@dataclass
class StepStats:
    """What the scheduler has done so far: counted, never timed."""

    steps: int = 0
    decoded_tokens: int = 0
    """Generated tokens fed back (one per decoding sequence per step)."""
    prompt_tokens: int = 0
    """Prompt tokens evaluated (reused ones not counted)."""
    reused_tokens: int = 0
    """Prompt tokens found already in a free sequence's cells (prefix reuse)."""
    largest_prompt_chunk: int = 0
    """The most prompt tokens one step evaluated while other sequences were decoding."""
    sequences_per_step: collections.Counter[int] = field(default_factory=collections.Counter)
    """How many steps decoded 1, 2, ... sequences in one batch."""


class Scheduler:
    """One model's sequences: `waiting` (no cells yet), `running` (prefill or decoding)."""

    def __init__(self, context: Context, prefill_chunk: int = 64) -> None:
        self.context = context
        self.prefill_chunk = prefill_chunk
        """The most prompt tokens a step takes while other sequences are decoding."""
        self.waiting: deque[list[Sequence]] = deque()
        """Requests in arrival order, each with its n choices (admitted together)."""
        self.running: list[Sequence] = []
        self.free: dict[int, list[int]] = {i: [] for i in range(context.n_seq)}
        """Free sequence ids, each with the tokens its cells still hold (for prefix reuse)."""
        self.stats = StepStats()

    def add(self, choices: list[Sequence]) -> None:
        self.waiting.append(choices)

    def idle(self) -> bool:
        return not self.waiting and not self.running

    def step(self) -> bool:
        """One llama_decode for every running sequence; False when there was nothing to do."""
        self._drop_cancelled()
        self._admit()
        plan = self._plan()
        if not plan:
            return False
        try:
            indices = self.context.decode([piece for _, piece in plan])
        except DecodeError as exc:
            self._fail(plan, exc)
            return True
        for (seq, piece), index in zip(plan, indices, strict=True):
            self._advance(seq, piece, index)
        self._count(plan)
        self._retire()
        return True

    def _fail(self, plan: list[tuple[Sequence, Piece]], exc: DecodeError) -> None:
        log.error("%s: failing %d sequences", exc, len(plan))
        for seq, _ in plan:
            seq.n_cached = 0  # what the failed batch left in its cells is unknown
            self.context.forget(seq.seq_id)
            seq.finish("error", error=exc)
        self._retire()

    # -- admission ---------------------------------------------------------------------------
    def _admit(self) -> None:
        """Waiting requests take free sequence ids, in order, while all their choices fit."""
        while self.waiting and len(self.waiting[0]) <= len(self.free):
            first, *others = self.waiting.popleft()
            self._place(first, self._best_cell(first.prompt))
            for seq in others:
                seq.parent = first
                self._place(seq, min(self.free))

    def _best_cell(self, prompt: list[int]) -> int:
        """The free sequence id whose cells share the longest prefix with `prompt`, if that is
        worth a prompt chunk (`MIN_REUSE`); else, and among equals, the lowest, so that running
        ids stay consecutive (see `_plan`)."""

        def worth(cell: int) -> tuple[int, int]:
            shared = _common(self.free[cell], prompt)
            return (shared if shared >= MIN_REUSE else 0), -cell

        return max(self.free, key=worth)

    def _place(self, seq: Sequence, cell: int) -> None:
        held = self.free.pop(cell)
        reuse = min(_common(held, seq.prompt), len(seq.prompt) - 1) if seq.parent is None else 0
        self.context.forget(cell, reuse)
        seq.seq_id, seq.n_cached, seq.state = cell, reuse, SequenceState.PREFILL
        self.stats.reused_tokens += reuse
        self.running.append(seq)

    # -- the batch ---------------------------------------------------------------------------
    def _plan(self) -> list[tuple[Sequence, Piece]]:
        """Decode tokens first (one per decoding sequence), then prompt chunks in arrival order:
        all the batch has room for when nothing decodes, else at most `prefill_chunk` tokens.

        The batch goes in sequence-id order: with one KV stream per sequence llama.cpp splits a
        batch into micro-batches of consecutive sequence ids (`split_equal`, sequential), so
        pieces in arrival order (1, 0, 2, ...) cost two passes over the weights instead of one."""
        room = self.context.n_batch
        plan = []
        for seq in self.running:
            if seq.state is SequenceState.DECODING:
                plan.append((seq, Piece(seq.seq_id, seq.pending, seq.n_cached, True)))
        room -= len(plan)
        if plan:
            room = min(room, self.prefill_chunk)
        for seq in self.running:
            if seq.state is not SequenceState.PREFILL or seq.parent is not None or room <= 0:
                continue
            chunk = seq.pending[:room]
            last = len(chunk) == len(seq.pending)
            plan.append((seq, Piece(seq.seq_id, chunk, seq.n_cached, last)))
            room -= len(chunk)
        return sorted(plan, key=lambda entry: entry[1].seq_id)

    def _advance(self, seq: Sequence, piece: Piece, index: int) -> None:
        """After the decode: the sequence's cells hold the piece; sample if its logits came."""
        seq.n_cached += len(piece.tokens)
        if index < 0 or seq.state is SequenceState.FINISHED:
            return
        if seq.state is SequenceState.PREFILL:
            for child in self.running:
                if child.parent is seq:
                    self.context.fork(seq.seq_id, child.seq_id)
                    child.n_cached, child.parent = seq.n_cached, None
                    self._sample(child, index)
        self._sample(seq, index)

    def _sample(self, seq: Sequence, index: int) -> None:
        seq.state = SequenceState.DECODING
        token = seq.sampler.sample(index)
        chosen = None
        if seq.logprobs is not None:
            chosen = logprob(self.context.logits(index), token, seq.logprobs)
        seq.accept(token, chosen, self.context.is_eog(token), self.context.piece(token))
        if seq.state is not SequenceState.FINISHED and len(seq.tokens) >= self.context.n_ctx_seq:
            seq.finish("length")  # its cells are full

    def _count(self, plan: list[tuple[Sequence, Piece]]) -> None:
        stats = self.stats
        stats.steps += 1
        decoding = [p for s, p in plan if p.pos >= len(s.prompt)]
        prompt = sum(len(p.tokens) for _, p in plan) - len(decoding)
        stats.decoded_tokens += len(decoding)
        stats.prompt_tokens += prompt
        if decoding:
            stats.largest_prompt_chunk = max(stats.largest_prompt_chunk, prompt)
            stats.sequences_per_step[len(decoding)] += 1

    # -- leaving -----------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        for choices in list(self.waiting):
            if all(seq.cancelled for seq in choices):
                self.waiting.remove(choices)
                for seq in choices:
                    seq.finish("cancelled")
        for seq in self.running:
            if seq.cancelled:
                seq.finish("cancelled")
        self._retire()

    def _retire(self) -> None:
        """Finished sequences give their sequence id back at once (its cells keep the tokens
        for the next request with the same prefix)."""
        for seq in [s for s in self.running if s.state is SequenceState.FINISHED]:
            self.running.remove(seq)
            orphans = [c for c in self.running if c.parent is seq]
            for child in orphans:  # the prompt was never evaluated: they cannot copy it
                child.finish(seq_finish_reason(seq))
            self.free[seq.seq_id] = seq.tokens[: seq.n_cached] if seq.parent is None else []
        if any(s.state is SequenceState.FINISHED for s in self.running):
            self._retire()

    def close(self) -> None:
        """Cancel everything (the engine is stopping)."""
        for choices in self.waiting:
            for seq in choices:
                seq.finish("cancelled")
        self.waiting.clear()
        for seq in self.running:
            seq.finish("cancelled")
        self._retire()


def seq_finish_reason(seq: Sequence) -> str:
    return "cancelled" if seq.cancelled else "error"


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
