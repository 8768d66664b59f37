"""A whole small world for resolution tests: a catalog, a loopback Hub, a loopback proxy.

`world` (a fixture) serves one small GGUF model, ``tiny``, from both servers and points the
environment (LLMLB_*, HF_ENDPOINT) at them, so `ModelResolver()` behaves as it would for a user.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from gguf import make_gguf, sha256_hex

from llmlb_node import ModelResolver, Settings

REPO = "test-org/tiny-GGUF"
FILENAME = "tiny-Q4_K_M.gguf"
MODEL_ID = "tiny"
SIZE = 300_000


@dataclass
class World:
    hub: Any
    proxy: Any
    home: Path
    catalog_path: Path
    content: bytes
    monkeypatch: pytest.MonkeyPatch
    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return sha256_hex(self.content)

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def installed_path(self, model_id: str = MODEL_ID, filename: str = FILENAME) -> Path:
        return self.models_dir / model_id / filename

    def write_catalog(self, entries: list[dict[str, Any]] | None = None) -> None:
        if entries is not None:
            self.entries = entries
        self.catalog_path.write_text(json.dumps(self.entries, indent=1))

    def entry(self, model_id: str = MODEL_ID) -> dict[str, Any]:
        return next(e for e in self.entries if e["id"] == model_id)

    def add_model(
        self,
        model_id: str,
        files: dict[str, bytes],
        *,
        repo: str | None = None,
        on_hub: bool = True,
        on_proxy: bool = True,
        **extra: Any,
    ) -> dict[str, Any]:
        """Serve a model (one or more files) and add its catalog entry."""
        repo = repo or f"test-org/{model_id}-GGUF"
        for name, data in files.items():
            if on_hub:
                self.hub.add_file(repo, name, data)
        if on_proxy:
            self.proxy.add_model(model_id, files)
        first = next(iter(files))
        entry: dict[str, Any] = {
            "id": model_id,
            "name": model_id.title(),
            "description": "a small test model",
            "repo": repo,
            "recommended_filename": first,
            "size_bytes": sum(len(d) for d in files.values()),
            "required_memory_bytes": 1_000_000,
            "tags": ["test"],
            "capabilities": ["TextGeneration"],
            "quantization": "Q4_K_M",
            "parameter_count": "1M",
            "format": "gguf",
            "engine": "llama_cpp",
            "platforms": ["linux-cpu"],
        }
        if len(files) > 1:
            entry["files"] = [
                {"filename": n, "size_bytes": len(d), "sha256": sha256_hex(d)}
                for n, d in files.items()
            ]
        entry.update(extra)
        self.entries = [e for e in self.entries if e["id"] != model_id] + [entry]
        self.write_catalog()
        return entry

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {"retry_backoff": 0.01}
        values.update(overrides)
        return Settings.from_env(**values)

    def resolver(self, **overrides: Any) -> ModelResolver:
        return ModelResolver(self.settings(**overrides))

    def hub_bytes(self) -> int:
        return self.hub.total_bytes_sent()

    def requests(self) -> int:
        return self.hub.total_requests() + self.proxy.request_count

    def env(self) -> dict[str, str]:
        """The environment a subprocess needs to see this world."""
        keys = [k for k in os.environ if k.startswith(("LLMLB_", "HF_"))]
        return {k: os.environ[k] for k in keys}


@pytest.fixture
def world(llmlb_env: Any, hub: Any, proxy: Any, monkeypatch: pytest.MonkeyPatch) -> World:
    """The `tiny` model on a loopback Hub and proxy, and an environment pointing at both."""
    catalog_path = llmlb_env.home / "catalog.json"
    llmlb_env.home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("LLMLB_SUPPORTED_MODELS", str(catalog_path))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("LLMLB_URL", proxy.url)
    monkeypatch.setenv("LLMLB_API_KEY", "test-key")
    monkeypatch.setenv("LLMLB_STALL_TIMEOUT", "2")
    w = World(hub, proxy, llmlb_env.home, catalog_path, make_gguf(SIZE, seed=1), monkeypatch)
    w.add_model(MODEL_ID, {FILENAME: w.content}, repo=REPO)
    return w
