"""What the node says about its models: /v1/models, /v0/supported-models, /v0/downloads,
/v0/models/{id}/status.

Built in a worker thread from the catalog, the store's status files and the pool's memory.
"""

from __future__ import annotations

from typing import Any

from ..catalog import ModelEntry
from ..resolver import ModelStatus
from . import openai
from .pool import ModelPool

_SOURCE_BY_FORMAT = {"gguf": "hf_gguf", "safetensors": "hf_safetensors", "onnx": "hf_onnx"}


def runnable(entry: ModelEntry) -> bool:
    """True when llama.cpp can run the entry (GGUF for the llama_cpp engine, or unstated)."""
    return entry.runnable


def model_ids(pool: ModelPool) -> list[str]:
    """What /v1/models advertises: the runnable models on disk (catalog order, then those
    installed by hand); with LLMLB_ADVERTISE=catalog, every runnable catalog entry too.

    A load balancer routes a model to every node that lists it, so a node lists only what it
    can answer before the balancer's timeout: a model it has (a cold download can take longer)
    in a format and an architecture its llama.cpp runs.
    """
    resolver = pool.resolver
    catalog = resolver.catalog
    installed = resolver.store.installed_ids()
    on_disk = set(installed)
    everything = pool.settings.advertise == "catalog"
    ids = [e.id for e in catalog if runnable(e) and (everything or e.id in on_disk)]
    ids += [i for i in installed if i not in catalog]
    return [i for i in ids if resolver.unusable(i) is None]


def model_list(pool: ModelPool, created: int) -> list[dict[str, Any]]:
    """/v1/models' ``data``: OpenAI ``Model`` objects plus ``status`` and ``loaded``."""
    loaded = pool.loaded()
    return [_model(pool, model_id, model_id in loaded, created) for model_id in model_ids(pool)]


def model_info(pool: ModelPool, model_id: str, created: int) -> dict[str, Any]:
    """/v1/models/{id}: one model (the caller checked the id is known)."""
    return _model(pool, model_id, model_id in pool.loaded(), created)


def _model(pool: ModelPool, model_id: str, loaded: bool, created: int) -> dict[str, Any]:
    status = pool.resolver.status(model_id)
    return openai.model_object(model_id, contract_status(status.status), loaded, created)  # type: ignore[union-attr]


# The seed contract's ModelResolutionStatus.status has four values; ours are finer.
_CONTRACT_STATUS = {
    "local": "local",
    "completed": "completed",
    "downloading": "downloading",
    "waiting": "downloading",  # another process downloads it; ours joins when it is done
    "error": "error",
    "interrupted": "error",  # stopped part way: not usable until the next request resumes it
    "missing": "error",  # not on disk and not downloading: not usable until a request asks
}


_WHY_NOT_USABLE = {
    "missing": "not on this node; a request for it downloads it",
    "interrupted": "its download was interrupted; the next request for it resumes it",
}


def contract_status(status: str) -> str:
    """`ModelStatus.status` in the contract's terms: local, downloading, completed or error."""
    return _CONTRACT_STATUS.get(status, "error")


def status_body(status: ModelStatus, catalog_size: int | None) -> dict[str, Any]:
    """/v0/models/{id}/status: the contract's fields (numbers never null), our `stage`."""
    body = status.to_dict()
    total = status.total_bytes if status.total_bytes is not None else catalog_size
    body.update(
        status=contract_status(status.status),
        stage=status.status,
        error_message=status.error_message or _WHY_NOT_USABLE.get(status.status),
        progress=status.progress or 0.0,
        downloaded_bytes=status.downloaded_bytes or 0,
        total_bytes=total or 0,
    )
    return body


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
                "runnable": runnable(entry) and resolver.unusable(entry.id) is None,
            }
        )
    return {"models": rows}


def downloads(pool: ModelPool) -> list[dict[str, Any]]:
    """/v0/downloads' rows: the status of each download this node runs now, oldest first, with
    the failures of the sources it tried before the one in use."""
    resolver = pool.resolver
    rows = []
    for event in resolver.activity().running:
        entry = resolver.catalog.find(event.model_id)
        status = resolver.status(event.model_id)
        rows.append(status_body(status, entry and entry.total_size))  # type: ignore[arg-type]
    return rows
