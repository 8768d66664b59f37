"""How much memory a model needs to run, read from its GGUF header alone: weights per layer, the
KV cache for the requested context, and llama.cpp's compute buffers.

`estimate_memory` is the one estimate: the offload plan and the fleet's placement both use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..gguf import GGUFHeader, ggml_type_bytes

F16 = 1
"""ggml type of llama.cpp's default KV cache (``type_k``/``type_v``)."""
DEFAULT_N_CTX = 512
"""``llama_cpp.Llama``'s default ``n_ctx``."""
N_UBATCH = 512
"""``llama_cpp.Llama``'s default physical batch: the compute buffers scale with it."""
_LAYER = re.compile(r"^blk\.(\d+)\.")
_MIB = 1024 * 1024


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs, split the way llama.cpp places them (all figures in bytes).

    llama.cpp offloads the *last* ``n_gpu_layers`` repeating layers together with their KV
    cache; the output head joins them when every layer is offloaded; the token embeddings stay
    in host memory; each device that computes holds a compute buffer.
    """

    n_ctx: int
    n_layers: int
    layer_bytes: tuple[int, ...]
    """Weights of each repeating layer (``blk.N.*``)."""
    output_bytes: int
    """The output head and final norm (on the GPU only with a full offload); a model with tied
    embeddings counts a copy of ``token_embd`` here, as llama.cpp makes one."""
    host_only_bytes: int
    """Token embeddings and anything else llama.cpp keeps in host memory."""
    kv_layer_bytes: tuple[int, ...]
    """KV cache of each layer for `n_ctx` tokens (full-size, also for sliding-window layers)."""
    compute_bytes: int
    """One device's compute buffer (logits and activations of one ``n_ubatch``)."""

    @property
    def weights_bytes(self) -> int:
        return sum(self.layer_bytes) + self.output_bytes + self.host_only_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return sum(self.kv_layer_bytes)

    @property
    def total_bytes(self) -> int:
        """Everything, on one device: what a CPU-only or a full-offload run needs in all."""
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes

    def gpu_bytes(self, n_gpu_layers: int) -> int:
        """GPU memory for offloading `n_gpu_layers` layers (-1 or more than `n_layers`: all)."""
        n = self.n_layers if n_gpu_layers < 0 else min(n_gpu_layers, self.n_layers + 1)
        if n == 0:
            return 0
        layers = min(n, self.n_layers)
        first = self.n_layers - layers
        weights = sum(self.layer_bytes[first:]) + sum(self.kv_layer_bytes[first:])
        full = n_gpu_layers < 0 or n_gpu_layers > self.n_layers
        return weights + (self.output_bytes if full else 0) + self.compute_bytes

    def max_layers_within(self, budget: int) -> int:
        """The most layers whose `gpu_bytes` fit in `budget`: -1 for all, else 0..n_layers."""
        if self.gpu_bytes(-1) <= budget:
            return -1
        n = self.n_layers
        while n > 0 and self.gpu_bytes(n) > budget:
            n -= 1
        return n

    def __str__(self) -> str:
        return (
            f"{_mib(self.total_bytes)} for n_ctx={self.n_ctx}: weights {_mib(self.weights_bytes)}, "
            f"KV cache {_mib(self.kv_cache_bytes)}, compute {_mib(self.compute_bytes)}"
        )


def estimate_memory(
    header: GGUFHeader,
    n_ctx: int | None = None,
    n_gpu_layers: int = -1,
    *,
    type_k: int | None = None,
    type_v: int | None = None,
    n_ubatch: int = N_UBATCH,
) -> MemoryEstimate | None:
    """The memory the model of `header` needs at context `n_ctx` (``0``: its training context).

    `header` must carry its tensor infos (``read_header(path)``). Returns None when the header
    does not say enough (no layer count or no tensors): plan by file size then. `n_gpu_layers`
    is accepted for symmetry with llama.cpp's parameters; ask `MemoryEstimate.gpu_bytes` for
    any split. Cache types are ggml type ids as ``llama_cpp.Llama`` takes them (default F16).
    """
    del n_gpu_layers  # the estimate covers every split; see MemoryEstimate.gpu_bytes
    n_layers = header.arch_field("block_count")
    if not isinstance(n_layers, int) or n_layers <= 0 or not header.tensors:
        return None
    ctx = _context(header, n_ctx)
    layer = [0] * n_layers
    output = host = 0
    for tensor in header.tensors:
        size = tensor.size or 0
        match = _LAYER.match(tensor.name)
        if match and int(match.group(1)) < n_layers:
            layer[int(match.group(1))] += size
        elif tensor.name.startswith("output"):
            output += size
        else:
            host += size
    if not any(t.name == "output.weight" for t in header.tensors):
        # Tied embeddings: llama.cpp gives the output head its own copy of token_embd.
        output += sum(t.size or 0 for t in header.tensors if t.name == "token_embd.weight")
    kv = _kv_per_layer(header, n_layers, ctx, type_k, type_v)
    return MemoryEstimate(
        n_ctx=ctx,
        n_layers=n_layers,
        layer_bytes=tuple(layer),
        output_bytes=output,
        host_only_bytes=host,
        kv_layer_bytes=kv,
        compute_bytes=_compute(header, min(ctx, n_ubatch)),
    )


def _context(header: GGUFHeader, n_ctx: int | None) -> int:
    if n_ctx is None:
        return DEFAULT_N_CTX
    if n_ctx <= 0:  # llama.cpp: 0 means the model's training context
        trained = header.arch_field("context_length")
        return trained if isinstance(trained, int) and trained > 0 else DEFAULT_N_CTX
    return n_ctx


def _kv_per_layer(
    header: GGUFHeader, n_layers: int, n_ctx: int, type_k: int | None, type_v: int | None
) -> tuple[int, ...]:
    """``n_ctx * (key_length * kv_heads * size(type_k) + value_length * kv_heads * size(type_v))``
    per layer; a per-layer ``head_count_kv`` (hybrid models: 0 for recurrent layers) is honoured."""
    embd = _int(header.arch_field("embedding_length"))
    heads = header.arch_field("attention.head_count")
    heads_kv = header.arch_field("attention.head_count_kv")
    if heads_kv is None:
        heads_kv = heads
    first_heads = _int(heads[0] if isinstance(heads, tuple) and heads else heads)
    head_dim = embd // first_heads if embd and first_heads else 0
    key = _int(header.arch_field("attention.key_length")) or head_dim
    value = _int(header.arch_field("attention.value_length")) or head_dim
    per_layer = heads_kv if isinstance(heads_kv, tuple) else (heads_kv,) * n_layers
    k_size = ggml_type_bytes(F16 if type_k is None else type_k, n_ctx * key)
    v_size = ggml_type_bytes(F16 if type_v is None else type_v, n_ctx * value)
    return tuple(
        _int(per_layer[i] if i < len(per_layer) else 0) * (k_size + v_size) for i in range(n_layers)
    )


def _compute(header: GGUFHeader, n_ubatch: int) -> int:
    """llama.cpp's compute buffer: dominated by the logits of one batch (4 bytes per vocabulary
    entry per token) plus activations; 514.5 MiB measured for Gemma 3 270M, estimated 514.6."""
    vocab = _int(header.arch_field("vocab_size")) or header.array_lengths.get(
        "tokenizer.ggml.tokens", 0
    )
    embd = _int(header.arch_field("embedding_length"))
    ffn = header.arch_field("feed_forward_length")
    ffn_max = max(ffn) if isinstance(ffn, tuple) and ffn else _int(ffn)
    return 4 * n_ubatch * (vocab + max(embd, ffn_max))


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _mib(n: int) -> str:
    return f"{n / _MIB:.1f} MiB"


VOCAB_ENTRY_BYTES = 128
"""llama.cpp's tokenizer tables per vocabulary entry (token text, lookup maps): about 32 MiB for
Gemma 3's 262,144 tokens, the bulk of what a loaded model holds besides weights and KV cache."""


def resident_bytes(
    header: GGUFHeader,
    n_ctx: int | None = None,
    *,
    type_k: int | None = None,
    type_v: int | None = None,
    n_ubatch: int = N_UBATCH,
) -> int | None:
    """Host memory a model really occupies once loaded on the CPU and answering: what the node's
    memory budget counts (`estimate_memory` counts allocations, which is what a GPU needs).

    Two of the allocations stay mostly untouched on the CPU, so they are not resident: the copy
    of tied embeddings (the CPU reads ``token_embd`` itself) and the logits of a whole batch
    (llama.cpp computes the last token's unless asked for all). Within 15% of the measured RSS
    growth for Gemma 3 270M at n_ctx 512 to 32768 (``python -m benchmarks.memory``).
    """
    estimate = estimate_memory(header, n_ctx, type_k=type_k, type_v=type_v, n_ubatch=n_ubatch)
    if estimate is None:
        return None
    vocab = _int(header.arch_field("vocab_size")) or header.array_lengths.get(
        "tokenizer.ggml.tokens", 0
    )
    embd = _int(header.arch_field("embedding_length"))
    ffn = header.arch_field("feed_forward_length")
    ffn_max = max(ffn) if isinstance(ffn, tuple) and ffn else _int(ffn)
    weights = sum(t.size or 0 for t in header.tensors)
    activations = 4 * min(estimate.n_ctx, n_ubatch) * (embd + ffn_max) + 4 * vocab
    return weights + estimate.kv_cache_bytes + activations + VOCAB_ENTRY_BYTES * vocab
