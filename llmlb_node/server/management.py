"""Model management, the calls Ollama users and llmlb's own node expose: pull, tags, ps, unload,
delete. Pull joins the resolver's download (the one inference requests share); the pool owns
loading and unloading.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..progress import ProgressEvent
from .errors import DownloadInterrupted, InvalidRequestError, ShuttingDownError
from .openai import read_json
from .pool import ModelPool, SlotInfo

log = logging.getLogger(__name__)

PULL_LINE_GAP = 0.2
"""Seconds between two NDJSON progress lines at least (at most 5 lines a second)."""


# -- handlers ----------------------------------------------------------------------------------
async def pull(request: Request) -> Response:
    """``POST /api/models/pull {"model", "stream": true}``: NDJSON progress, then success."""
    body = await read_json(request)
    model_id = _model_param(body)
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise InvalidRequestError("'stream' must be true or false", "stream")
    request.state.model = model_id
    pool: ModelPool = request.state.pool
    if pool.shutting_down:
        raise ShuttingDownError("the node is shutting down; pull from another node")
    await pool.check_known(model_id)
    job = PullJob(pool, model_id)
    if not stream:
        await job.finished
        return JSONResponse({"status": "success"})
    return StreamingResponse(_ndjson(job), media_type="application/x-ndjson")


async def tags(request: Request) -> Response:
    """``GET /api/tags``: the installed models, from the store's install records."""
    pool: ModelPool = request.state.pool
    return JSONResponse({"models": await asyncio.to_thread(installed_models, pool)})


async def ps(request: Request) -> Response:
    """``GET /api/ps``: the loaded (and loading) models, from the pool's memory."""
    pool: ModelPool = request.state.pool
    return JSONResponse({"models": [_slot_row(info) for info in pool.snapshot()]})


async def unload(request: Request) -> Response:
    """``POST /api/models/unload {"model"}``: free its memory now (409 while in use)."""
    model_id = _model_param(await read_json(request))
    request.state.model = model_id
    pool: ModelPool = request.state.pool
    await pool.check_known(model_id)
    was_loaded = await pool.unload(model_id)
    return JSONResponse({"model": model_id, "status": "unloaded" if was_loaded else "not_loaded"})


async def delete(request: Request) -> Response:
    """``DELETE /api/models/{model_id}``: unload, then remove its files (409 while in use)."""
    model_id = request.path_params["model_id"]
    request.state.model = model_id
    pool: ModelPool = request.state.pool
    await pool.check_known(model_id)
    if not await pool.remove(model_id):
        return JSONResponse(
            _error(f"model {model_id!r} is not installed", "not_found", "model"), 404
        )
    return JSONResponse({"model": model_id, "status": "deleted"})


def _model_param(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise InvalidRequestError("missing required parameter: 'model'", "model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' must be a non-empty string", "model")
    return model


def _error(message: str, code: str, param: str | None = None) -> dict[str, Any]:
    from .openai import error_body

    return error_body(message, "invalid_request_error", code, param)


# -- pull --------------------------------------------------------------------------------------
class PullJob:
    """One pull: the resolve runs in its own thread (joining any download of the same model)
    and hands its progress events to the event loop."""

    def __init__(self, pool: ModelPool, model_id: str) -> None:
        self.model_id = model_id
        self.events: asyncio.Queue[ProgressEvent] = asyncio.Queue()
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        name = f"llmlb-pull-{model_id}"
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        pool, loop = self._pool, self._loop
        hook = pool.progress_hook(lambda e: loop.call_soon_threadsafe(self.events.put_nowait, e))
        error: BaseException | None = None
        try:
            resolved = pool.resolver.resolve(self.model_id, progress=hook)
        except DownloadInterrupted:
            error = ShuttingDownError(
                f"the node is shutting down: the download of {self.model_id!r} stopped; its "
                "partial file is kept and the next start resumes it"
            )
        except Exception as exc:  # noqa: BLE001 - handed to the request, which reports it
            error = exc
            pool.observer.resolved(self.model_id, "failed")
        else:
            outcome = "local" if resolved.source == "local" else "downloaded"
            pool.observer.resolved(self.model_id, outcome)
        loop.call_soon_threadsafe(self._finish, error)

    def _finish(self, error: BaseException | None) -> None:
        if self.finished.done():
            return
        if error is None:
            self.finished.set_result(None)
        else:
            self.finished.set_exception(error)


async def _ndjson(job: PullJob) -> AsyncIterator[str]:
    async for line in progress_lines(job):
        yield json.dumps(line, separators=(",", ":")) + "\n"


async def progress_lines(job: PullJob) -> AsyncIterator[dict[str, Any]]:
    """A line for each new stage and each 10% step, at most one per PULL_LINE_GAP (a line due
    sooner waits and then carries the latest figures), then success or the error."""
    loop = asyncio.get_running_loop()
    last_sent = -PULL_LINE_GAP
    stage, decile = "", -1
    pending: ProgressEvent | None = None
    while not (job.finished.done() and job.events.empty()):
        wait = 0.5 if pending is None else max(0.0, last_sent + PULL_LINE_GAP - loop.time())
        try:
            event = await asyncio.wait_for(job.events.get(), wait)
        except TimeoutError:
            event = None
        if event is not None and event.stage not in ("installed", "failed", "interrupted"):
            step = int((event.fraction or 0) * 10) if event.stage == "downloading" else -1
            if pending is not None or event.stage != stage or step > decile:
                stage, decile, pending = event.stage, max(decile, step), event
        if pending is not None and loop.time() - last_sent >= PULL_LINE_GAP:
            yield _progress_line(pending)
            last_sent, pending = loop.time(), None
    if pending is not None:
        await asyncio.sleep(max(0.0, last_sent + PULL_LINE_GAP - loop.time()))
        yield _progress_line(pending)
        last_sent = loop.time()
    await asyncio.sleep(max(0.0, last_sent + PULL_LINE_GAP - loop.time()))
    yield _final_line(job)


def _progress_line(event: ProgressEvent) -> dict[str, Any]:
    return {
        "status": event.stage,
        "completed": event.downloaded,
        "total": event.total,
        "speed": round(event.bytes_per_s),
    }


def _final_line(job: PullJob) -> dict[str, Any]:
    error = job.finished.exception()
    if error is None:
        return {"status": "success"}
    from .app import error_payload  # app.py imports this module for its route table

    return error_payload(error)[1]


async def resume_interrupted(pool: ModelPool) -> list[str]:
    """Resume, in the background, every catalog model whose download was interrupted (a
    shutdown, a crash): the seed's "a download interrupted by a restart is retried on the next
    start". Returns their ids."""
    ids = await asyncio.to_thread(_interrupted_ids, pool)
    for model_id in ids:
        log.info("%s: resuming the download interrupted by the last stop", model_id)
        thread = threading.Thread(
            target=_resume, args=(pool, model_id), name=f"llmlb-resume-{model_id}", daemon=True
        )
        thread.start()
    return ids


def _interrupted_ids(pool: ModelPool) -> list[str]:
    catalog = pool.resolver.catalog
    statuses = pool.resolver.status()
    assert isinstance(statuses, list)
    return [s.model_id for s in statuses if s.status == "interrupted" and s.model_id in catalog]


def _resume(pool: ModelPool, model_id: str) -> None:
    try:
        resolved = pool.resolver.resolve(model_id, progress=pool.progress_hook())
    except DownloadInterrupted:
        return
    except Exception as exc:  # noqa: BLE001 - nobody waits on it: the status route shows it
        log.warning("%s: resuming the interrupted download failed: %s", model_id, exc)
        pool.observer.resolved(model_id, "failed")
    else:
        pool.observer.resolved(model_id, "local" if resolved.source == "local" else "downloaded")


# -- tags and ps -------------------------------------------------------------------------------
def installed_models(pool: ModelPool) -> list[dict[str, Any]]:
    """/api/tags' rows, read from the install records (in a worker thread)."""
    store = pool.resolver.store
    rows = []
    for model_id in store.installed_ids():
        record = store.read_record(model_id)
        if record is None:
            continue
        files = [{"filename": f.filename, "size": f.size, "sha256": f.sha256} for f in record.files]
        rows.append(
            {
                "id": model_id,
                "files": files,
                "size": sum(f.size for f in record.files),
                "sha256": record.files[0].sha256 if record.files else None,
                "source": record.source,
                "installed_at": _iso(record.installed_at),
            }
        )
    return rows


def _slot_row(info: SlotInfo) -> dict[str, Any]:
    return {
        "id": info.model_id,
        "embedding": info.embedding,
        "state": info.state.value,
        "memory_estimate_bytes": info.need.ram_bytes if info.need else None,
        "memory_estimate": info.need.describe() if info.need else None,
        "memory_rss_bytes": info.rss_bytes,
        "expires_at": None if info.expires_at is None else _iso(info.expires_at),
        "last_used": _iso(info.last_used),
        "active_requests": info.active,
        "queued_requests": info.queued,
    }


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")
