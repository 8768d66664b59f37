"""The node's memory budget: LLMLB_MEMORY_BUDGET, the estimate it checks, and a model that cannot
fit refused with 507 before llama.cpp sees it (real node subprocess).

The estimate against Gemma's real RSS growth: tests/e2e/test_operate.py and benchmarks/memory.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import make_model_gguf
from node import running_node
from world import MODEL_ID, World

from llmlb_node.gguf import read_header
from llmlb_node.offload.memory import VOCAB_ENTRY_BYTES, estimate_memory, resident_bytes
from llmlb_node.server.memory import MemoryBudget, need_for
from llmlb_node.server.settings import ServerSettings

GiB = 1024**3
MiB = 1024**2

# Header fields that make a small file whose KV cache alone would need about 64 GiB at n_ctx 512.
GIANT = {
    "block_count": 4000,
    "embedding_length": 8192,
    "attention.head_count": 64,
    "attention.head_count_kv": 64,
    "feed_forward_length": 8192,
}


@pytest.mark.parametrize(
    ("text", "budget"),
    [
        (None, MemoryBudget(0.9, None)),
        ("", MemoryBudget(0.9, None)),
        ("75%", MemoryBudget(0.75, None)),
        ("0.5", MemoryBudget(0.5, None)),
        ("12GiB", MemoryBudget(None, 12 * GiB)),
        ("8GB", MemoryBudget(None, 8 * 1000**3)),
        ("500 MiB", MemoryBudget(None, 500 * MiB)),
        ("123456789", MemoryBudget(None, 123456789)),
    ],
)
def test_memory_budget_reads_a_share_or_a_size(text: str | None, budget: MemoryBudget) -> None:
    assert MemoryBudget.parse(text) == budget


@pytest.mark.parametrize("text", ["lots", "0%", "150%", "0", "-5GB", "12XB"])
def test_a_malformed_memory_budget_names_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match="LLMLB_MEMORY_BUDGET"):
        ServerSettings.from_env({"LLMLB_MEMORY_BUDGET": text})


def test_a_share_counts_what_loaded_models_hold_as_theirs_to_free() -> None:
    share, size = MemoryBudget(0.9, None), MemoryBudget(None, 5 * GiB)

    assert share.capacity(available=8 * GiB, held=2 * GiB) == int(0.9 * 10 * GiB)
    assert size.capacity(available=8 * GiB, held=2 * GiB) == 5 * GiB


def test_resident_bytes_leaves_out_what_the_cpu_never_touches(tmp_path: Path) -> None:
    fields = {
        "block_count": 2,
        "embedding_length": 64,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "feed_forward_length": 128,
        "vocab_size": 1000,
    }
    tensors = {"token_embd.weight": 64_000, "blk.0.w": 4096, "blk.1.w": 4096}
    path = tmp_path / "m.gguf"
    path.write_bytes(make_model_gguf("llama", fields, tensors))
    header = read_header(path)

    allocated = estimate_memory(header, 1024)
    resident = resident_bytes(header, 1024)

    assert allocated is not None and resident is not None
    kv = (
        2 * 1024 * (16 * 2 * 2 + 16 * 2 * 2)
    )  # layers * ctx * (K + V: head_dim 16, 2 kv heads, f16)
    assert allocated.kv_cache_bytes == kv
    weights = 64_000 + 2 * 4096  # the tied output head is token_embd itself on the CPU: no copy
    activations = 4 * 512 * (64 + 128) + 4 * 1000  # one ubatch, one token's logits
    assert resident == weights + kv + activations + VOCAB_ENTRY_BYTES * 1000
    assert resident < allocated.total_bytes  # no batch of logits, no copy of the embeddings
    need = need_for(path, 1024)
    assert need is not None and need.ram_bytes == resident and need.kv_cache_bytes == kv


def test_a_model_that_cannot_fit_even_alone_is_507_with_the_numbers_and_the_node_goes_on(
    world: World,
) -> None:
    world.add_model("giant", {"giant.gguf": make_model_gguf("llama", GIANT, {"blk.0.w": 4096})})
    with running_node(N_CTX="512") as node:
        status, _, body = node.post(
            "/v1/chat/completions",
            {"model": "giant", "messages": [{"role": "user", "content": "hi"}]},
        )
        again, _, _ = node.post(
            "/v1/completions", {"model": "giant", "prompt": "x", "max_tokens": 1}
        )
        listed, _, _ = node.get("/v1/models")
        tiny, _, tiny_body = node.post("/v1/completions", {"model": MODEL_ID, "prompt": "x"})
        alive = node.proc.poll() is None
        log = node.log

    assert status == 507, body
    error = body["error"]
    assert error["code"] == "insufficient_memory" and error["type"] == "server_error"
    assert "'giant' needs" in error["message"] and "n_ctx=512" in error["message"]
    assert "LLMLB_MEMORY_BUDGET=90% of the memory available" in error["message"]
    assert again == 507  # answered from memory for a while, like any failed load
    assert listed == 200
    assert tiny == 500 and tiny_body["error"]["code"] == "model_load_failed"  # tried, not refused
    assert alive
    assert "llama.cpp could not load model 'giant'" not in log  # never handed to llama.cpp


def test_an_absolute_budget_is_the_limit(world: World) -> None:
    world.add_model(
        "small",
        {"small.gguf": make_model_gguf("llama", {**GIANT, "block_count": 1}, {"blk.0.w": 4096})},
    )
    with running_node(N_CTX="512", MEMORY_BUDGET="1MiB") as node:
        status, _, body = node.post("/v1/completions", {"model": "small", "prompt": "x"})

    assert status == 507, body
    assert "budget of 1.0 MiB (LLMLB_MEMORY_BUDGET=1.0 MiB" in body["error"]["message"]
