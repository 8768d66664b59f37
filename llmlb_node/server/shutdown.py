"""Clean shutdown: on SIGTERM or SIGINT stop taking requests, let those in flight finish for up to
LLMLB_SHUTDOWN_GRACE seconds, end the rest with a clean error, stop downloads resumably, exit 0.

uvicorn stops listening and waits for open requests; `Shutdown` adds the deadline and the errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import openai
from .errors import ShuttingDownError

if TYPE_CHECKING:
    from .pool import ModelPool

log = logging.getLogger(__name__)

BACKSTOP = 5.0
"""Seconds uvicorn waits past the grace before it cancels what is left (it should be nothing)."""


class Shutdown:
    """The node's shutdown: begun by a signal, over when the grace period ends."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.pool: ModelPool | None = None
        self.begun = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expired: asyncio.Event | None = None

    def attach(self, pool: ModelPool) -> None:
        """Called by the app's lifespan, in the event loop."""
        self.pool = pool
        self._loop = asyncio.get_running_loop()
        self._expired = asyncio.Event()

    def begin(self) -> None:
        """Start shutting down (safe from a signal handler or any thread)."""
        if self._loop is not None and not self.begun:
            self.begun = True
            self._loop.call_soon_threadsafe(self._begin)

    def _begin(self) -> None:
        log.info(
            "shutting down: no new requests; %d in flight get up to %gs (LLMLB_SHUTDOWN_GRACE)",
            self.pool.in_flight() if self.pool else 0,
            self.grace,
        )
        if self.pool is not None:
            self.pool.drain()
        asyncio.get_running_loop().call_later(self.grace, self.expire)

    def expire(self) -> None:
        """The grace period is over: requests still running end now, downloads stop."""
        if self._expired is not None and not self._expired.is_set():
            self._expired.set()
        if self.pool is not None:
            self.pool.interrupt_downloads()

    async def expired(self) -> None:
        assert self._expired is not None
        await self._expired.wait()


class EndAtDeadline:
    """Middleware: a request still running when the grace period ends gets a clean end, a 503
    ``shutting_down`` if nothing was sent yet, an error event then ``[DONE]`` in a stream, or an
    error line in a pull's NDJSON."""

    def __init__(self, app: ASGIApp, shutdown: Shutdown) -> None:
        self.app = app
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.shutdown._expired is None:
            await self.app(scope, receive, send)
            return
        sent = _SentSoFar(send)
        work = asyncio.ensure_future(self.app(scope, receive, sent))
        deadline = asyncio.ensure_future(self.shutdown.expired())
        try:
            await asyncio.wait({work, deadline}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # uvicorn gave up on this request: so does its handler
            work.cancel()
            raise
        finally:
            deadline.cancel()
        if not work.done():
            work.cancel()  # the handler's own cleanup runs: its model turn is given back
            await asyncio.gather(work, return_exceptions=True)
            await sent.end_cleanly(scope)
            return
        work.result()


class _SentSoFar:
    """The `send` of one request, remembering how far its response got."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False
        self.content_type = b""
        self.finished = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.content_type = dict(message.get("headers") or []).get(b"content-type", b"")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self.send(message)

    async def end_cleanly(self, scope: Scope) -> None:
        if self.finished:
            return
        error = ShuttingDownError(
            "the node shut down before this request finished (LLMLB_SHUTDOWN_GRACE); retry it "
            "on another node"
        )
        body = openai.error_body(str(error), "server_error", "shutting_down")
        if not self.started:
            headers = {"Retry-After": str(error.retry_after)}
            await JSONResponse(body, 503, headers=headers)(scope, _no_receive, self.send)
            return
        if self.content_type.startswith(b"text/event-stream"):
            tail = (openai.sse(body) + openai.sse("[DONE]")).encode()
        elif self.content_type.startswith(b"application/x-ndjson"):  # a pull's progress
            tail = json.dumps(body, separators=(",", ":")).encode() + b"\n"
        else:
            tail = b""  # a JSON body cut short: the client sees a truncated answer
        await self.send({"type": "http.response.body", "body": tail, "more_body": False})


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class NodeServer(uvicorn.Server):
    """uvicorn's server, telling `Shutdown` when a signal arrives, and returning normally after
    a clean shutdown (uvicorn itself re-raises the signal once stopped: a non-zero exit)."""

    def __init__(self, config: uvicorn.Config, shutdown: Shutdown) -> None:
        super().__init__(config)
        self.node_shutdown = shutdown  # not `shutdown`: uvicorn's own method has that name

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        self.should_exit = True
        self.node_shutdown.begin()
