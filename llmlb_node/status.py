"""Model status: llmlb's ModelResolutionStatus of one model, from a live download's event,
another process's status file, or the store; the one table mapping a download stage to a status.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .progress import ProgressEvent, event_from_status
from .store import hostname, pid_alive

STATUS_OF_STAGE = {
    "resolving": "waiting",
    "waiting": "waiting",
    "downloading": "downloading",
    "verifying": "downloading",
    "installed": "completed",
    "failed": "error",
    "interrupted": "interrupted",
}
"""A download's stage (`progress.STAGES`) -> the status llmlb shows for it."""


@dataclass(frozen=True)
class ModelStatus:
    """llmlb's ModelResolutionStatus for one model."""

    model_id: str
    status: str
    """local (installed; no download of it recorded), completed (installed by the download
    recorded in the store), waiting, downloading, interrupted (stopped part way; the next
    resolve resumes it), error (the last download failed), or missing (not installed, idle)."""
    progress: float
    downloaded_bytes: int
    total_bytes: int | None
    local_path: str | None
    error_message: str | None = None
    source: str | None = None
    bytes_per_s: float = 0.0
    pid: int | None = None
    failures: tuple[dict[str, str], ...] = ()
    """After a failed download: each source's ``{"source", "kind", "message"}``, in order."""
    architecture: str | None = None
    """``general.architecture`` from the installed GGUF's header (e.g. ``gemma3``)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``json.dumps(status.to_dict())`` (failures become a list)."""
        data = asdict(self)
        data["failures"] = [dict(f) for f in self.failures]
        return data


def from_event(
    event: ProgressEvent, pid: int | None, failures: tuple[dict[str, str], ...] = ()
) -> ModelStatus:
    """The status a download's latest event shows (`STATUS_OF_STAGE`)."""
    status = STATUS_OF_STAGE.get(event.stage, "downloading")
    completed = status == "completed"
    return ModelStatus(
        model_id=event.model_id,
        status=status,
        progress=event.fraction or (1.0 if completed else 0.0),
        downloaded_bytes=event.downloaded,
        total_bytes=event.total,
        local_path=event.message if completed else None,
        error_message=(event.message or "download failed") if status == "error" else None,
        source=event.source,
        bytes_per_s=event.bytes_per_s,
        pid=pid,
        failures=failures,
    )


def installed(
    model_id: str, paths: tuple[Path, ...], data: dict[str, Any] | None, arch: str | None
) -> ModelStatus:
    """An installed model: ``completed`` when the store records the download that installed it,
    else ``local``."""
    completed = data is not None and data.get("stage") == "installed"
    size = sum(p.stat().st_size for p in paths if p.exists())
    source = data.get("source") if data else "local"
    status = "completed" if completed else "local"
    local = str(paths[0])
    return ModelStatus(model_id, status, 1.0, size, size, local, source=source, architecture=arch)


def error(model_id: str, message: str) -> ModelStatus:
    return ModelStatus(model_id, "error", 0.0, 0, None, None, error_message=message)


def missing(model_id: str, total: int | None) -> ModelStatus:
    return ModelStatus(model_id, "missing", 0.0, 0, total, None)


def from_status_file(data: dict[str, Any], stale_after: float) -> ModelStatus | None:
    """What a status file left by a download says, or None when it says installed (the store,
    not the file, is the truth then). A writer gone quiet or dead was interrupted."""
    event = event_from_status(data)
    pid = data.get("pid")
    if event.stage == "failed":
        failures = data.get("failures")
        rows = failures if isinstance(failures, list) else []
        kept = tuple(_failure_dict(f) for f in rows if isinstance(f, dict))
        return from_event(event, pid, kept)
    alive = data.get("host") != hostname() or (isinstance(pid, int) and pid_alive(pid))
    fresh = time.time() - float(data.get("updated_at") or 0) < stale_after
    if event.stage not in ("installed", "interrupted") and not (alive and fresh):
        event = replace(event, stage="interrupted")  # killed: its partial is resumable
    return None if event.stage == "installed" else from_event(event, pid)


def _failure_dict(data: dict[str, Any]) -> dict[str, str]:
    return {k: str(data.get(k) or "") for k in ("source", "kind", "message")}
