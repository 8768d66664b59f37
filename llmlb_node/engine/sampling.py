"""How one sequence picks its tokens: the request's sampling parameters, the llama.cpp sampler
chain they make, and the log-probabilities of a step's logits.

No pointers here: `stages()` names the chain, `native.Context.sampler()` builds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

RANDOM_SEED = 0xFFFFFFFF
"""llama.cpp's LLAMA_DEFAULT_SEED: a different seed every time."""


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of its sampler (llama-cpp-python's create_completion defaults)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    grammar: str | None = None
    """A GBNF grammar (root rule ``root``) the output must match."""

    def with_seed(self, offset: int) -> SamplingParams:
        """The same parameters for the `offset`-th of n choices (its own seed, if one is set)."""
        if self.seed is None or offset == 0:
            return self
        return replace(self, seed=self.seed + offset)


def stages(params: SamplingParams) -> list[tuple[str, tuple[object, ...]]]:
    """The sampler chain, in the order llama.cpp applies it: biases and penalties change the
    logits, the grammar removes what cannot follow, then the filters, then the pick."""
    chain: list[tuple[str, tuple[object, ...]]] = []
    if params.logit_bias:
        chain.append(("logit_bias", (dict(params.logit_bias),)))
    penalties = (params.repeat_penalty, params.frequency_penalty, params.presence_penalty)
    if penalties != (1.0, 0.0, 0.0):
        chain.append(("penalties", (params.penalty_last_n, *penalties)))
    if params.grammar is not None:
        chain.append(("grammar", (params.grammar,)))
    if params.temperature <= 0:
        chain.append(("greedy", ()))
        return chain
    if params.top_k > 0:
        chain.append(("top_k", (params.top_k,)))
    if params.typical_p < 1.0:
        chain.append(("typical", (params.typical_p,)))
    if params.top_p < 1.0:
        chain.append(("top_p", (params.top_p,)))
    if params.min_p > 0.0:
        chain.append(("min_p", (params.min_p,)))
    seed = RANDOM_SEED if params.seed is None else params.seed
    chain += [("temp", (params.temperature,)), ("dist", (seed,))]
    return chain


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability the model gave the chosen token, and its `top` alternatives."""

    logprob: float
    top: list[tuple[int, float]]
    """(token id, log-probability), most likely first."""


def logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """Log-softmax of the raw logits at `token`, with the `top` most likely tokens."""
    import numpy as np

    peak = float(logits.max())
    log_z = peak + math.log(float(np.exp(logits - peak).sum()))
    chosen = float(logits[token]) - log_z
    if top <= 0:
        return TokenLogprob(chosen, [])
    best = np.argpartition(logits, -top)[-top:]
    best = best[np.argsort(-logits[best])]
    return TokenLogprob(chosen, [(int(t), float(logits[t]) - log_z) for t in best])
