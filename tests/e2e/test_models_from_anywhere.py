"""Models from anywhere, end to end with the real Gemma and llama.cpp: a Hub reference served by the
loopback Hub, and the file another tool left in its huggingface_hub cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmlb_node import LazyLlama, ModelResolver

from .conftest import GEMMA_FILE, GEMMA_ID, GEMMA_REPO, GEMMA_SHA256, LLAMA_KWARGS, GemmaWorld

pytestmark = pytest.mark.e2e


def test_lazyllama_answers_from_a_hub_reference(
    gemma_world: GemmaWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMLB_ALLOW_HF", "1")
    monkeypatch.delenv("LLMLB_URL")  # the Hub only: the proxy does not know the derived id

    with LazyLlama(f"hf:{GEMMA_REPO}", **LLAMA_KWARGS) as llm:
        out = llm("The capital of France is", max_tokens=8, temperature=0)

    assert out["choices"][0]["text"].strip()
    model_id = "hf--hugginllam--gemma-3-270m-Q4_K_M-GGUF"  # Q4_K_M picked, the only GGUF
    path = gemma_world.home / "models" / model_id / GEMMA_FILE
    assert llm.model_path == str(path)
    record = ModelResolver().store.read_record(model_id)
    assert record is not None and record.files[0].sha256 == GEMMA_SHA256  # the Hub's LFS sha256
    # The architecture was read from the first 64 KiB, before the weights.
    first = gemma_world.hub.cdn.requests[0]
    assert (first.headers.get("range"), first.body_bytes) == ("bytes=0-65535", 65536)
    assert gemma_world.hub.cdn.bytes_sent <= gemma_world.file.stat().st_size * 1.01 + 65536


def test_lazyllama_answers_from_the_huggingface_cache_with_no_network(
    gemma_world: GemmaWorld, hub_only_catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hf-cache"
    blob = cache / ("models--" + GEMMA_REPO.replace("/", "--")) / "blobs" / GEMMA_SHA256
    blob.parent.mkdir(parents=True)
    os.link(gemma_world.file, blob)  # as hf_hub_download leaves it (same file system here)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    with LazyLlama(GEMMA_ID, **LLAMA_KWARGS) as llm:
        out = llm("The capital of France is", max_tokens=8, temperature=0)

    assert out["choices"][0]["text"].strip()
    assert gemma_world.requests() == 0
    assert os.path.samefile(llm.model_path or "", blob)
    record = ModelResolver().store.read_record(GEMMA_ID)
    assert record is not None and record.source == "reused:huggingface-cache"
