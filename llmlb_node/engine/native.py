"""The engine's only door to llama.cpp: its own multi-sequence context, the batch, the KV cells of
each sequence and the sampler chains, through llama-cpp-python's low-level bindings.

Everything with a pointer, a ctypes array or a llama.cpp return code lives here; the scheduler and
the sampling module speak in token ids, positions and sequence ids.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from ..llamacpp import import_llama_cpp

log = logging.getLogger(__name__)

REQUIRED = (
    "llama_init_from_model", "llama_free", "llama_get_memory", "llama_memory_seq_rm",
    "llama_memory_seq_cp", "llama_batch_init", "llama_batch_free", "llama_decode",
    "llama_get_logits_ith", "llama_n_ctx", "llama_n_batch", "llama_model_get_vocab",
    "llama_vocab_n_tokens", "llama_vocab_is_eog", "llama_token_to_piece", "llama_set_n_threads",
    "llama_sampler_chain_default_params", "llama_sampler_chain_init", "llama_sampler_chain_add",
    "llama_sampler_free", "llama_sampler_sample", "llama_sampler_init_greedy",
    "llama_sampler_init_dist", "llama_sampler_init_temp", "llama_sampler_init_top_k",
    "llama_sampler_init_top_p", "llama_sampler_init_min_p", "llama_sampler_init_typical",
    "llama_sampler_init_penalties", "llama_sampler_init_logit_bias", "llama_sampler_init_grammar",
)  # fmt: skip
"""The llama-cpp-python functions the engine calls (a test checks that they exist)."""


class DecodeError(RuntimeError):
    """llama_decode failed for a whole batch (its return code says why)."""


@dataclass(frozen=True)
class Piece:
    """One run of consecutive prompt or generated tokens of one sequence in a batch."""

    seq_id: int
    tokens: Sequence[int]
    pos: int
    """The position of the first token."""
    logits: bool
    """Whether the last token's logits are wanted (to sample the next token)."""


class Context:
    """A llama.cpp context for up to `n_seq` sequences, each with `n_ctx_seq` cells of its own,
    sharing the weights of an already loaded ``llama_cpp.Llama``."""

    def __init__(self, llama: Any, n_seq: int, n_ctx_seq: int, n_batch: int = 512) -> None:
        self.lib = import_llama_cpp()
        self.n_seq = n_seq
        self.llama = llama  # keeps the model (and its weights) alive while this context lives
        self.model = llama._model.model
        self.vocab = self.lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(self.lib.llama_vocab_n_tokens(self.vocab))
        self.ctx = self.lib.llama_init_from_model(
            self.model, self._params(llama, n_seq, n_ctx_seq, n_batch)
        )
        if not self.ctx:
            raise MemoryError(f"llama.cpp could not create a context of {n_seq}x{n_ctx_seq} cells")
        self.memory = self.lib.llama_get_memory(self.ctx)
        self.n_batch = int(self.lib.llama_n_batch(self.ctx))
        self.n_ctx_seq = self._n_ctx_seq(n_seq)
        self._batch = self.lib.llama_batch_init(self.n_batch, 0, 1)
        self._pieces: dict[int, bytes] = {}

    def _params(self, llama: Any, n_seq: int, n_ctx_seq: int, n_batch: int) -> Any:
        # A copy of the Llama's own parameters: threads, rope, KV cache types, flash attention.
        params = type(llama.context_params).from_buffer_copy(llama.context_params)
        params.n_seq_max = n_seq
        params.n_ctx = n_seq * n_ctx_seq
        params.n_batch = params.n_ubatch = n_batch
        params.embeddings = False
        fields = {name for name, *_ in type(params)._fields_}
        if "kv_unified" in fields:
            params.kv_unified = False  # one stream per sequence: each gets its n_ctx_seq cells
        if "swa_full" in fields:
            params.swa_full = True  # a sliding-window cache cannot keep a reusable prefix
        return params

    def _n_ctx_seq(self, n_seq: int) -> int:
        per_seq = getattr(self.lib, "llama_n_ctx_seq", None)
        if per_seq is not None:
            return int(per_seq(self.ctx))
        return int(self.lib.llama_n_ctx(self.ctx)) // n_seq

    # -- the batch ---------------------------------------------------------------------------
    def decode(self, pieces: Sequence[Piece]) -> list[int]:
        """One llama_decode of every piece together; the batch index of each piece's last token
        (-1 where its logits were not asked for)."""
        batch, n, outputs = self._batch, 0, []
        for piece in pieces:
            for offset, token in enumerate(piece.tokens):
                batch.token[n] = token
                batch.pos[n] = piece.pos + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = piece.seq_id
                batch.logits[n] = False
                n += 1
            batch.logits[n - 1] = piece.logits
            outputs.append(n - 1 if piece.logits else -1)
        batch.n_tokens = n
        code = self.lib.llama_decode(self.ctx, batch)
        if code != 0:
            raise DecodeError(f"llama_decode returned {code} for a batch of {n} tokens")
        return outputs

    def logits(self, index: int) -> np.ndarray:
        """The logits of the batch's token `index` (a view: copy it to keep it past a decode)."""
        import numpy as np

        pointer = self.lib.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    # -- KV cells ----------------------------------------------------------------------------
    def forget(self, seq_id: int, start: int = 0) -> None:
        """Free the sequence's cells from position `start` on."""
        self.lib.llama_memory_seq_rm(self.memory, seq_id, start, -1)

    def fork(self, source: int, target: int) -> None:
        """Give `target` a copy of every cell of `source` (an evaluated prompt, shared by n>1)."""
        self.lib.llama_memory_seq_rm(self.memory, target, -1, -1)
        self.lib.llama_memory_seq_cp(self.memory, source, target, -1, -1)

    # -- tokens ------------------------------------------------------------------------------
    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for (control tokens: none)."""
        cached = self._pieces.get(token)
        if cached is None:
            buffer = ctypes.create_string_buffer(64)
            size = self.lib.llama_token_to_piece(self.vocab, token, buffer, 64, 0, False)
            if size < 0:
                buffer = ctypes.create_string_buffer(-size)
                size = self.lib.llama_token_to_piece(self.vocab, token, buffer, -size, 0, False)
            cached = self._pieces[token] = buffer.raw[:size]
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    # -- samplers ----------------------------------------------------------------------------
    def sampler(self, stages: Sequence[tuple[str, tuple[Any, ...]]]) -> Sampler:
        """A sampler chain from ``(stage, args)`` pairs (see `sampling.stages`); `ValueError` if
        llama.cpp refuses a stage (a grammar it cannot parse)."""
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        try:
            for name, args in stages:
                stage = getattr(self, f"_stage_{name}")(*args)
                if not stage:
                    raise ValueError(f"llama.cpp refused the {name} sampler")
                lib.llama_sampler_chain_add(chain, stage)
        except BaseException:
            lib.llama_sampler_free(chain)
            raise
        return Sampler(self, chain)

    def _stage_greedy(self) -> Any:
        return self.lib.llama_sampler_init_greedy()

    def _stage_dist(self, seed: int) -> Any:
        return self.lib.llama_sampler_init_dist(seed & 0xFFFFFFFF)

    def _stage_temp(self, t: float) -> Any:
        return self.lib.llama_sampler_init_temp(t)

    def _stage_top_k(self, k: int) -> Any:
        return self.lib.llama_sampler_init_top_k(k)

    def _stage_top_p(self, p: float) -> Any:
        return self.lib.llama_sampler_init_top_p(p, 1)

    def _stage_min_p(self, p: float) -> Any:
        return self.lib.llama_sampler_init_min_p(p, 1)

    def _stage_typical(self, p: float) -> Any:
        return self.lib.llama_sampler_init_typical(p, 1)

    def _stage_penalties(self, last_n: int, repeat: float, freq: float, present: float) -> Any:
        init = self.lib.llama_sampler_init_penalties
        args = (last_n, repeat, freq, present)
        if len(getattr(init, "argtypes", None) or args) == 5:  # some builds take n_vocab first
            args = (self.n_vocab, *args)
        return init(*args)

    def _stage_logit_bias(self, bias: dict[int, float]) -> Any:
        entries = (self.lib.llama_logit_bias * len(bias))()
        for entry, (token, value) in zip(entries, bias.items(), strict=True):
            entry.token, entry.bias = token, value
        return self.lib.llama_sampler_init_logit_bias(self.n_vocab, len(bias), entries)

    def _stage_grammar(self, gbnf: str) -> Any:
        return self.lib.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")

    def close(self) -> None:
        """Free the batch and the context (the model stays with its Llama)."""
        if self.ctx:
            self.lib.llama_batch_free(self._batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None


class Sampler:
    """One sequence's sampler chain: it samples from the context's logits and remembers what it
    chose (penalties, grammar state)."""

    def __init__(self, context: Context, chain: Any) -> None:
        self._context = context
        self._chain = chain

    def sample(self, index: int) -> int:
        """Pick the next token from the logits of batch token `index` (and accept it)."""
        context = self._context
        return int(context.lib.llama_sampler_sample(self._chain, context.ctx, index))

    def close(self) -> None:
        if self._chain:
            self._context.lib.llama_sampler_free(self._chain)
            self._chain = None
