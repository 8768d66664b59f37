"""Continuous batching over llama.cpp's batch API: many requests of one model share one context,
one llama_decode per step (``Engine``), each with its own sampler chain (``SamplingParams``).

    from llmlb_node import LazyLlama
    from llmlb_node.engine import Engine, SamplingParams

    llm = LazyLlama("gemma-3-270m")
    engine = Engine(llm.load(), parallel=4)
    gen = engine.submit(llm.tokenize(b"Once upon a time"), SamplingParams(temperature=0),
                        max_tokens=32)
    print("".join(out.text for out in gen))
"""

from .engine import Engine, Generation
from .native import REQUIRED
from .sampling import SamplingParams, TokenLogprob
from .scheduler import StepStats
from .sequence import Output

__all__ = [
    "REQUIRED",
    "Engine",
    "Generation",
    "Output",
    "SamplingParams",
    "StepStats",
    "TokenLogprob",
]
