"""What the node says about its models: /v1/models, /v0/supported-models, /v0/downloads,
/v0/models/{id}/status.

Built in a worker thread from the catalog, the store's status files and the pool's memory.
"""

from __future__ import annotations

from typing import Any

from ..catalog import ModelEntry
from . import openai
from .pool import ModelPool

_SOURCE_BY_FORMAT = {"gguf": "hf_gguf", "safetensors": "hf_safetensors", "onnx": "hf_onnx"}


def runnable(entry: ModelEntry) -> bool:
    """True when llama.cpp can run the entry (GGUF for the llama_cpp engine, or unstated)."""
    return entry.runnable


def model_ids(pool: ModelPool) -> list[str]:
    """Every model this node can serve: runnable catalog entries, then hand-installed ones."""
    resolver = pool.resolver
    ids = [e.id for e in resolver.catalog if runnable(e)]
    catalog = resolver.catalog
    ids += [i for i in resolver.store.installed_ids() if i not in catalog]
    return ids


def model_list(pool: ModelPool, created: int) -> list[dict[str, Any]]:
    """/v1/models' ``data``: OpenAI ``Model`` objects plus ``status`` and ``loaded``."""
    loaded = pool.loaded()
    return [_model(pool, model_id, model_id in loaded, created) for model_id in model_ids(pool)]


def model_info(pool: ModelPool, model_id: str, created: int) -> dict[str, Any]:
    """/v1/models/{id}: one model (the caller checked the id is known)."""
    return _model(pool, model_id, model_id in pool.loaded(), created)


def _model(pool: ModelPool, model_id: str, loaded: bool, created: int) -> dict[str, Any]:
    status = pool.resolver.status(model_id)
    return openai.model_object(model_id, status.status, loaded, created)  # type: ignore[union-attr]


def supported_models(pool: ModelPool) -> dict[str, Any]:
    """The seed contract's ``{"models": [{id, name, source, repo_id, ...}]}``."""
    resolver = pool.resolver
    rows = []
    for entry in resolver.catalog:
        fmt = str(entry.raw.get("format") or "gguf").lower()
        rows.append(
            {
                "id": entry.id,
                "name": entry.name,
                "source": _SOURCE_BY_FORMAT.get(fmt, "predefined"),
                "repo_id": entry.repo,
                "size_bytes": entry.total_size,
                "required_vram_mb": (entry.required_memory_bytes or 0) // (1024 * 1024),
                "tags": list(entry.raw.get("tags") or []),
                "is_local": resolver.installed(entry.id) is not None,
                "runnable": runnable(entry),
            }
        )
    return {"models": rows}


def downloads(pool: ModelPool) -> list[dict[str, Any]]:
    """/v0/downloads' rows: the status of each download this node runs now, oldest first, with
    the failures of the sources it tried before the one in use."""
    resolver = pool.resolver
    rows = [resolver.status(event.model_id) for event in resolver.activity().running]
    return [status.to_dict() for status in rows]  # type: ignore[union-attr]
