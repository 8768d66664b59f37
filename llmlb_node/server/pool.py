"""Loaded models: one slot per model with named states, residency, FIFO turns and keep-alive.

Handlers only ``lease = await pool.admit(model_id)``, ``await lease.wait()``, ``lease.run(...)`` or
``lease.stream(...)`` and ``lease.release()``; every state check lives in this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from ..errors import InsufficientDiskSpaceError, IntegrityError, LlmlbError, ModelDownloadError
from ..lazy import LazyLlama
from ..progress import ProgressCallback, ProgressEvent
from ..resolver import ModelResolver, ModelStatus
from ..units import human_bytes
from . import memory
from .errors import (
    DownloadInterrupted,
    GenerationCancelledError,
    InsufficientMemoryError,
    ModelBusyError,
    ModelLoadingError,
    ServerBusyError,
    ShuttingDownError,
)
from .settings import ServerSettings

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger(__name__)

_LLAMA_POOLING_MEAN = 1  # llama_cpp.LLAMA_POOLING_TYPE_MEAN, without importing llama_cpp here


class SlotState(Enum):
    """Where one model is in its life on this node."""

    UNLOADED = "unloaded"
    LOADING = "loading"  # resolving (maybe downloading), then llama.cpp loading
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"  # the last load failed; answered from memory for a short while


TRANSITIONS: dict[SlotState, frozenset[SlotState]] = {
    SlotState.UNLOADED: frozenset({SlotState.LOADING}),
    SlotState.LOADING: frozenset({SlotState.READY, SlotState.FAILED}),
    SlotState.READY: frozenset({SlotState.UNLOADING}),
    SlotState.UNLOADING: frozenset({SlotState.UNLOADED}),
    SlotState.FAILED: frozenset({SlotState.LOADING, SlotState.UNLOADED}),
}
_RESIDENT = frozenset({SlotState.LOADING, SlotState.READY, SlotState.UNLOADING})


class Slot:
    """One model (or its embedding context) on this node: its state and its requests.

    Requests wait in `waiting` (for the load, then for a turn) and generate in `running`; every
    count the node reports is the length of one of the two.
    """

    def __init__(self, model_id: str, embedding: bool, llm: LazyLlama, keep_alive: float) -> None:
        self.model_id = model_id
        self.embedding = embedding
        self.llm = llm
        self.state = SlotState.UNLOADED
        self.error: BaseException | None = None
        self.failed_at = 0.0
        self.waiting: deque[Lease] = deque()
        """Admitted requests without a turn yet, in arrival order."""
        self.running: deque[Lease] = deque()
        """Requests holding a turn: at most `capacity`."""
        self.capacity = 1
        """Requests that generate at once: LLMLB_PARALLEL with an engine, else one (a llama.cpp
        context of its own answers one request at a time)."""
        self.engine: Engine | None = None
        """The model's continuous-batching engine (generation slots, once loaded)."""
        self.last_used = time.monotonic()
        self.keep_alive = keep_alive
        self.timer: asyncio.TimerHandle | None = None
        self.load_task: asyncio.Task[None] | None = None
        self.rss_bytes: int | None = None
        """How much the process's resident memory grew while this model loaded."""
        self.status: ModelStatus | None = None
        """The download status when the model became ready (answered from memory)."""
        self.need: memory.MemoryNeed | None = None
        """What the model will occupy, from its GGUF header (known once it is on disk)."""
        self.reserved = False
        """Its `need` passed the memory budget: it counts against the others' loads."""

    @property
    def users(self) -> int:
        """Admitted requests not finished yet (waiting or running)."""
        return len(self.waiting) + len(self.running)

    def move(self, new: SlotState) -> None:
        """Change state along `TRANSITIONS`; anything else is a bug in this module."""
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"{self}: {self.state.value} -> {new.value} is not allowed")
        log.debug("%s: %s -> %s", self, self.state.value, new.value)
        self.state = new
        if new in (SlotState.UNLOADED, SlotState.FAILED):
            self.reserved = False

    def __str__(self) -> str:
        return f"{self.model_id} (embeddings)" if self.embedding else self.model_id


@dataclass(frozen=True)
class SlotInfo:
    """One model context as /api/ps and /metrics show it (times are Unix seconds)."""

    model_id: str
    embedding: bool
    state: SlotState
    active: int
    """Requests holding the model's turn (0 or 1)."""
    queued: int
    """Requests admitted and waiting (for the load or for their turn)."""
    last_used: float
    expires_at: float | None
    """When keep-alive unloads it; None while in use or kept forever."""
    rss_bytes: int | None
    need: memory.MemoryNeed | None = None


class PoolObserver:
    """What the pool reports as it works (the metrics subscribe); this base ignores it all."""

    def progress(self, event: ProgressEvent) -> None:
        """A download's progress event (from any thread)."""

    def resolved(self, model_id: str, outcome: str) -> None:
        """A resolve ended: ``local``, ``downloaded`` or ``failed`` (from any thread)."""


class Lease:
    """One request's claim on one model: admitted, then waiting, then holding a turn.

    `release()` is synchronous and safe to call from a cancelled task: if a worker thread is
    still running for this lease, the turn passes on when that thread returns.
    """

    def __init__(self, pool: ModelPool, slot: Slot, deadline: float) -> None:
        self._pool = pool
        self._slot = slot
        self._deadline = deadline
        self._granted: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future()
        )
        """Done when the pool gives this request a turn (None) or its load failed (the error)."""
        self._worker: asyncio.Future[Any] | None = None
        self._released = False
        self._cancel = threading.Event()
        """Set when this request's client went away: its generation stops at the next token."""

    @property
    def llm(self) -> LazyLlama:
        return self._slot.llm

    @property
    def model_id(self) -> str:
        return self._slot.model_id

    @property
    def engine(self) -> Engine | None:
        """The model's engine, where its requests batch (None for embeddings)."""
        return self._slot.engine

    async def wait(self, step: float | None = None) -> bool:
        """Wait up to `step` seconds for the model's turn; True once this request holds it.

        Raises the load's error, or `ModelLoadingError` once LLMLB_LOAD_WAIT has passed while
        the model is still downloading or loading (the load goes on for the next request).
        """
        loop = asyncio.get_running_loop()
        timeout = step
        loading = self._slot.state is not SlotState.READY
        if loading:
            left = max(0.0, self._deadline - loop.time())
            timeout = left if step is None else min(step, left)
        if not self._granted.done():
            await asyncio.wait({self._granted}, timeout=timeout)
        if self._granted.done():
            error = self._granted.result()
            if error is not None:
                raise error
            return True
        if loading and loop.time() >= self._deadline:
            raise await self._pool.loading_error(self._slot.model_id)
        return False

    def grant(self, error: BaseException | None = None) -> None:
        """The pool's answer: a turn (no `error`) or the reason there will be none."""
        self._granted.set_result(error)

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in a worker thread; cancelling stops it at the next token."""
        worker = self._start(functools.partial(fn, *args, **kwargs))
        try:
            return await asyncio.shield(worker)
        except asyncio.CancelledError:
            self._cancel.set()
            raise

    async def stream(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """Iterate ``fn(*args, **kwargs)`` in a worker thread, yielding its items here.

        Leaving the loop early (a client that disconnects) stops the generation before the
        next token and closes the stream in its own thread.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
        cancel = self._cancel
        put = functools.partial(loop.call_soon_threadsafe, queue.put_nowait)

        def pump() -> None:
            try:
                for item in _closing(fn(*args, **kwargs)):
                    if cancel.is_set():
                        return
                    put((item, None))
            except BaseException as exc:  # handed to the event loop, raised there
                put((_END, exc))
            else:
                put((_END, None))

        worker = self._start(pump)
        try:
            while True:
                item, exc = await queue.get()
                if item is _END:
                    if exc is not None:
                        raise exc
                    return
                yield item
        finally:
            if not worker.done():
                cancel.set()

    def _start(self, call: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run `call` in the pool's threads: the one place where this request's model works."""
        cancel = self._cancel

        def with_cancel() -> Any:
            _working.cancel = cancel
            try:
                return call()
            finally:
                _working.cancel = None

        worker = asyncio.get_running_loop().run_in_executor(self._pool.executor, with_cancel)
        worker.add_done_callback(_retrieved)  # a request gone before its answer reads no error
        self._worker = worker
        return worker

    def release(self) -> None:
        """Give the turn to the next request (after this request's worker thread returns)."""
        if self._released:
            return
        self._released = True
        slot, worker = self._slot, self._worker
        if self in slot.waiting:
            slot.waiting.remove(self)
        elif worker is not None and not worker.done():
            self._cancel.set()  # the request is over: its generation stops now
            worker.add_done_callback(lambda _: self._leave())
            return
        self._leave()

    def _leave(self) -> None:
        if self in self._slot.running:
            self._slot.running.remove(self)
        self._pool._finished(self._slot)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


_END = object()


def _closing(items: Iterator[Any]) -> Iterator[Any]:
    """Iterate `items`, closing it (in this thread) however the loop ends."""
    try:
        yield from items
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


_working = threading.local()
"""`cancel`: the event of the request whose call runs in this worker thread."""


def _install_cancel_hook(llama: Any) -> None:
    """Make generation stop at the next token once the calling request's cancel event is set.

    llama-cpp-python's chat handlers take no stopping criteria, but every generated token goes
    through ``Llama.eval``: an exception there ends the call (streaming or not) cleanly.
    """
    evaluate = llama.eval

    def eval_unless_cancelled(tokens: Any) -> Any:
        cancel = getattr(_working, "cancel", None)
        if cancel is not None and cancel.is_set():
            raise GenerationCancelledError("the client went away; generation stopped")
        return evaluate(tokens)

    llama.eval = eval_unless_cancelled


class ModelPool:
    """The models this node serves: at most LLMLB_MAX_LOADED_MODELS loaded, one turn at a time."""

    def __init__(
        self,
        settings: ServerSettings,
        resolver: ModelResolver | None = None,
        llama_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver or ModelResolver(settings.library)
        threads = {"n_threads": settings.n_threads, "n_threads_batch": settings.n_threads}
        self.llama_kwargs = {
            "n_ctx": settings.n_ctx,
            "verbose": False,
            **(threads if settings.n_threads else {}),
            **(llama_kwargs or {}),
        }
        workers = 4 * settings.max_loaded_models + 4  # a load, a generation, a close per model
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="llmlb-model")
        self._slots: dict[tuple[str, bool], Slot] = {}
        self._sleepers: list[asyncio.Future[None]] = []
        """The loads waiting for another model to become idle or leave (`_changed`)."""
        self._removing: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        self.shutting_down = False
        """Set when the node stops taking requests: /api/health answers 503 ``offline``."""
        self.observer = PoolObserver()
        self._interrupting = False

    # -- what handlers use ----------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def ready(
        self, model_id: str, *, embedding: bool = False, keep_alive: float | None = None
    ) -> AsyncIterator[Lease]:
        """Wait for the model (downloading and loading it if needed) and hold its turn."""
        lease = await self.admit(model_id, embedding=embedding, keep_alive=keep_alive)
        try:
            await lease.wait()
            yield lease
        finally:
            lease.release()

    async def admit(
        self, model_id: str, *, embedding: bool = False, keep_alive: float | None = None
    ) -> Lease:
        """Queue a request for `model_id`: `UnsupportedModelError` or `ServerBusyError` at once."""
        if self.shutting_down:
            raise ShuttingDownError("the node is shutting down; send the request to another node")
        model_id = await self.check_known(model_id)  # one slot for a reference and its id
        slot = self._slot(model_id, embedding)
        if len(slot.waiting) >= self.settings.max_queue:
            raise ServerBusyError(
                f"model {model_id!r} has {len(slot.waiting)} requests waiting "
                f"(LLMLB_MAX_QUEUE={self.settings.max_queue}); retry shortly",
                retry_after=1,
            )
        slot.keep_alive = self.settings.keep_alive if keep_alive is None else keep_alive
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        deadline = asyncio.get_running_loop().time() + self.settings.load_wait
        lease = Lease(self, slot, deadline)
        slot.waiting.append(lease)
        self._schedule(slot)
        return lease

    def engines(self) -> dict[str, Engine]:
        """The engine of each loaded generation model (from memory: never waits)."""
        return {
            s.model_id: s.engine
            for s in self._slots.values()
            if s.engine is not None and s.state is SlotState.READY
        }

    def loaded(self) -> set[str]:
        """Ids of the models loaded now (from memory: never waits)."""
        return {s.model_id for s in self._slots.values() if s.state is SlotState.READY}

    def in_flight(self) -> int:
        """Requests admitted and not finished, over every model (from memory: never waits)."""
        return sum(s.users for s in self._slots.values())

    def saturated(self) -> bool:
        """True when models are loaded and each has LLMLB_MAX_QUEUE requests waiting: a new
        request for any of them would get 429, so a load balancer should send it elsewhere."""
        ready = [s for s in self._slots.values() if s.state is SlotState.READY]
        return bool(ready) and all(len(s.waiting) >= self.settings.max_queue for s in ready)

    def snapshot(self) -> list[SlotInfo]:
        """Every model context the pool holds or tracks, from memory (never waits)."""
        now, wall = time.monotonic(), time.time()
        infos = []
        for slot in self._slots.values():
            if slot.state is SlotState.UNLOADED and not slot.users:
                continue
            expires = None
            if slot.timer is not None and not slot.users:
                expires = wall + slot.timer.when() - asyncio.get_running_loop().time()
            infos.append(
                SlotInfo(
                    slot.model_id,
                    slot.embedding,
                    slot.state,
                    len(slot.running),
                    len(slot.waiting),
                    wall - (now - slot.last_used),
                    expires,
                    slot.rss_bytes,
                    slot.need,
                )
            )
        return infos

    async def unload(self, model_id: str) -> bool:
        """Unload the model's contexts now; `ModelBusyError` while requests use them.

        True if something was loaded.
        """
        slots = [s for s in self._slots.values() if s.model_id == model_id]
        self._check_idle(model_id, slots)
        victims = [s for s in slots if s.state is SlotState.READY]
        for slot in victims:  # all at once: no request can slip in between
            log.info("%s: unloading (asked to)", slot)
            self._set(slot, SlotState.UNLOADING)
        for slot in victims:
            await self._close(slot)
        return bool(victims)

    async def remove(self, model_id: str) -> bool:
        """Unload the model, then delete its files; `ModelBusyError` while it is in use."""
        await self.unload(model_id)
        slots = [s for s in self._slots.values() if s.model_id == model_id]
        status = await self.status(model_id)
        self._check_idle(model_id, slots)
        if status.status in ("downloading", "waiting"):
            raise ModelBusyError(
                f"model {model_id!r} is downloading; wait for it to finish, then delete it"
            )
        self._removing.add(model_id)  # requests arriving now wait for the files to go first
        try:
            return await asyncio.to_thread(self.resolver.remove, model_id)
        finally:
            self._removing.discard(model_id)
            for slot in slots:
                self._schedule(slot)

    @staticmethod
    def _check_idle(model_id: str, slots: list[Slot]) -> None:
        users = sum(s.users for s in slots)
        if users:
            raise ModelBusyError(
                f"model {model_id!r} has {users} request(s) in flight; retry when they finish"
            )
        if any(s.state is SlotState.LOADING for s in slots):
            raise ModelBusyError(f"model {model_id!r} is loading; retry when it is ready")

    def drain(self) -> None:
        """Shutdown began: refuse new requests from now on."""
        self.shutting_down = True

    def interrupt_downloads(self) -> None:
        """Stop this process's downloads at their next progress report, keeping the partials
        resumable (the resolver records them as interrupted)."""
        self._interrupting = True

    def progress_hook(self, then: ProgressCallback | None = None) -> ProgressCallback:
        """The progress callback for a download this node runs: the observer sees it, `then`
        gets it, and after `interrupt_downloads()` it stops the download."""

        def hook(event: ProgressEvent) -> None:
            self.observer.progress(event)
            if then is not None:
                then(event)
            # The library has no cancel call: an exception that is not an Exception, raised in
            # a progress callback, stops the transfer like Ctrl-C does (partial kept).
            if self._interrupting and threading.current_thread().name != "llmlb-progress":
                raise DownloadInterrupted(f"{event.model_id}: node shutting down")

        return hook

    def state(self, model_id: str) -> SlotState:
        """The model's generation slot state (`UNLOADED` if never asked for)."""
        slot = self._slots.get((model_id, False))
        return SlotState.UNLOADED if slot is None else slot.state

    def usage(self, model_id: str) -> tuple[int, int]:
        """(requests running, requests waiting) for the model, over its contexts."""
        slots = [s for (m, _), s in self._slots.items() if m == model_id]
        return sum(len(s.running) for s in slots), sum(len(s.waiting) for s in slots)

    async def status(self, model_id: str) -> ModelStatus:
        """The model's download status (ModelResolutionStatus).

        From memory while the model is loaded (its files cannot change under it); otherwise
        read in a worker thread (status files, stat calls).
        """
        slot = self._slots.get((model_id, False)) or self._slots.get((model_id, True))
        if slot is not None and slot.state is SlotState.READY and slot.status is not None:
            return slot.status
        return await asyncio.to_thread(self.resolver.status, model_id)  # type: ignore[arg-type]

    async def loading_error(self, model_id: str) -> ModelLoadingError:
        """A 503 for a request that waited LLMLB_LOAD_WAIT: progress and a Retry-After."""
        status = await self.status(model_id)
        retry = 5
        if status.bytes_per_s > 0 and status.total_bytes:
            left = (status.total_bytes - status.downloaded_bytes) / status.bytes_per_s
            retry = int(min(60, max(1, left)))
        return ModelLoadingError(
            f"model {model_id!r} is still {describe(status, self.state(model_id))} after "
            f"{self.settings.load_wait:g}s (LLMLB_LOAD_WAIT); the download goes on, retry later",
            retry_after=retry,
        )

    async def close(self) -> None:
        """Unload every model and stop the worker threads."""
        for slot in self._slots.values():
            if slot.timer is not None:
                slot.timer.cancel()
        for task in list(self._background):
            task.cancel()
        loop = asyncio.get_running_loop()
        for slot in self._slots.values():
            if slot.state is SlotState.READY:
                await loop.run_in_executor(self.executor, _close_model, slot)
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- turns and loading ------------------------------------------------------------------
    async def check_known(self, model_id: str) -> str:
        """The id the store knows `model_id` by (a Hub reference's derived id), or
        `UnsupportedModelError` naming up to three close ids. No network."""
        if self.resolver.catalog.find(model_id) is not None:
            return model_id
        return await asyncio.to_thread(self.resolver.check_known, model_id)

    def _slot(self, model_id: str, embedding: bool) -> Slot:
        slot = self._slots.get((model_id, embedding))
        if slot is None:
            kwargs = dict(self.llama_kwargs)
            if embedding:
                kwargs.update(embedding=True, pooling_type=_LLAMA_POOLING_MEAN)
            llm = LazyLlama(
                model_id, resolver=self.resolver, progress=self.progress_hook(), **kwargs
            )
            slot = self._slots[(model_id, embedding)] = Slot(
                model_id, embedding, llm, self.settings.keep_alive
            )
        return slot

    def _schedule(self, slot: Slot) -> None:
        """Give free turns to waiting requests in arrival order, or start the load they need."""
        if slot.state is SlotState.READY:
            while slot.waiting and len(slot.running) < slot.capacity:
                lease = slot.waiting.popleft()
                slot.running.append(lease)
                lease.grant()
        elif slot.state is SlotState.FAILED and self._recent_failure(slot):
            while slot.waiting:
                slot.waiting.popleft().grant(slot.error)
        elif slot.state in (SlotState.UNLOADED, SlotState.FAILED) and self._wants_load(slot):
            slot.load_task = self._spawn(self._load(slot))

    def _wants_load(self, slot: Slot) -> bool:
        return bool(slot.waiting) and slot.load_task is None and slot.model_id not in self._removing

    def _recent_failure(self, slot: Slot) -> bool:
        return time.monotonic() - slot.failed_at < self.settings.failure_ttl

    async def _load(self, slot: Slot) -> None:
        """UNLOADED or FAILED -> LOADING -> READY or FAILED, making room on the way."""
        try:
            await self._evict_until(slot, self._fits_count, f"to load {slot}")
        except BaseException:
            slot.load_task = None
            raise
        self._set(slot, SlotState.LOADING)
        try:
            await self._load_steps(slot)
        except Exception as exc:
            log.warning("%s: load failed: %s", slot, exc)
            slot.error = exc if isinstance(exc, LlmlbError) else _load_error(slot, exc)
            slot.failed_at = time.monotonic()
            outcome = SlotState.FAILED
        else:
            slot.error = None
            outcome = SlotState.READY
        slot.load_task = None
        self._set(slot, outcome)

    async def _load_steps(self, slot: Slot) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._resolve_blocking, slot)
        if slot.need is not None:
            why = f"to make room for {slot}, which needs {slot.need.describe()}"
            await self._evict_until(slot, functools.partial(self._fits_memory, slot), why)
        await loop.run_in_executor(self.executor, self._load_blocking, slot)

    def _resolve_blocking(self, slot: Slot) -> None:
        """Download the model if needed, then read what it will occupy from its header."""
        try:
            resolved = slot.llm.prefetch()
        except (ModelDownloadError, IntegrityError, InsufficientDiskSpaceError):
            self.observer.resolved(slot.model_id, "failed")
            raise
        outcome = "local" if resolved.source == "local" else "downloaded"
        self.observer.resolved(slot.model_id, outcome)
        contexts = 1 if slot.embedding else 1 + self.settings.parallel
        slot.need = memory.need_for(resolved.path, self.llama_kwargs.get("n_ctx"), contexts)

    def _load_blocking(self, slot: Slot) -> None:
        before = rss_bytes()
        llama = slot.llm.load()
        slot.rss_bytes = max(0, rss_bytes() - before) if before else None
        _install_cancel_hook(llama)
        if not slot.embedding:
            from ..engine import Engine  # numpy and ctypes: only once a model loads

            slot.engine = Engine(
                llama,
                parallel=self.settings.parallel,
                n_ctx=self.settings.n_ctx or None,
                name=f"llmlb-engine {slot.model_id}",
            )
            slot.capacity = self.settings.parallel
        slot.status = self.resolver.status(slot.model_id)  # type: ignore[assignment]

    # -- room: one eviction loop, two limits ---------------------------------------------------
    async def _evict_until(self, slot: Slot, fits: Callable[[list[Slot]], bool], why: str) -> None:
        """Unload the least recently used idle models until `fits(the other resident models)`;
        wait while none is idle. Checking and claiming happen with no await in between, so two
        loads never both count on the same room."""
        while not fits(others := self._resident(but=slot)):
            idle = [s for s in others if s.state is SlotState.READY and not s.users]
            if not idle:
                await self._changed()
                continue
            victim = min(idle, key=lambda s: s.last_used)
            log.info("%s: unloading (least recently used) %s", victim, why)
            self._set(victim, SlotState.UNLOADING)
            await self._close(victim)

    def _resident(self, but: Slot) -> list[Slot]:
        return [s for s in self._slots.values() if s is not but and s.state in _RESIDENT]

    def _fits_count(self, others: list[Slot]) -> bool:
        return len(others) < self.settings.max_loaded_models

    def _fits_memory(self, slot: Slot, others: list[Slot]) -> bool:
        """True (and `slot` reserves its need) if it fits beside the models that reserved
        theirs; a load still waiting for room reserves nothing, so two cannot wait on each
        other. `InsufficientMemoryError` if it cannot fit even alone."""
        need = slot.need
        available = memory.available_bytes()
        if need is None or available is None:
            return True  # the system does not say: load as before
        held = sum(s.need.ram_bytes for s in others if s.reserved and s.need is not None)
        capacity = self.settings.memory_budget.capacity(available, held)
        if need.ram_bytes > capacity:
            raise self._too_big(slot, need, capacity, available, held)
        if need.ram_bytes + held > capacity:
            return False
        log.info(
            "%s: needs %s; fits the memory budget of %s with %s held by others",
            slot,
            need.describe(),
            human_bytes(capacity),
            human_bytes(held),
        )
        slot.reserved = True
        return True

    def _too_big(
        self, slot: Slot, need: memory.MemoryNeed, capacity: int, available: int, held: int
    ) -> InsufficientMemoryError:
        budget = self.settings.memory_budget
        return InsufficientMemoryError(
            f"model {slot.model_id!r} needs {need.describe()}, more than the node's memory "
            f"budget of {human_bytes(capacity)} (LLMLB_MEMORY_BUDGET={budget}; "
            f"{human_bytes(available)} available now, {human_bytes(held)} held by other models) "
            "even with every other model unloaded. Lower LLMLB_N_CTX, raise "
            "LLMLB_MEMORY_BUDGET, or serve it from a node with more memory",
            needed=need.ram_bytes,
            budget=capacity,
        )

    async def _close(self, slot: Slot) -> None:
        """Close a slot already moved to UNLOADING, then mark it UNLOADED."""
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, _close_model, slot)
        finally:
            self._set(slot, SlotState.UNLOADED)

    def _set(self, slot: Slot, state: SlotState) -> None:
        """Move `slot` to `state`, then act on it: turns, a load, the waiting loads."""
        slot.move(state)
        if state is SlotState.UNLOADING and slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        self._schedule(slot)
        self._wake()

    async def _changed(self) -> None:
        """Until some model changes state or lets go of its last request."""
        waiter = asyncio.get_running_loop().create_future()
        self._sleepers.append(waiter)
        await waiter

    def _wake(self) -> None:
        sleepers, self._sleepers = self._sleepers, []
        for waiter in sleepers:
            if not waiter.done():
                waiter.set_result(None)

    # -- keep-alive ---------------------------------------------------------------------------
    def _finished(self, slot: Slot) -> None:
        """A request let go of `slot`: the next one's turn, and the idle timer if it was last."""
        slot.last_used = time.monotonic()
        self._schedule(slot)
        self._wake()
        if slot.users or slot.keep_alive < 0:
            return
        if slot.timer is not None:
            slot.timer.cancel()
        loop = asyncio.get_running_loop()
        slot.timer = loop.call_later(slot.keep_alive, self._idle_timer_fired, slot)

    def _idle_timer_fired(self, slot: Slot) -> None:
        slot.timer = None
        if slot.state is SlotState.READY and not slot.users:
            log.info("%s: idle for %gs (keep_alive): unloading", slot, slot.keep_alive)
            self._set(slot, SlotState.UNLOADING)
            self._spawn(self._close(slot))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def _close_model(slot: Slot) -> None:
    """Stop the engine (its sequences end), then free the model."""
    engine, slot.engine, slot.capacity = slot.engine, None, 1
    if engine is not None:
        engine.close()
    slot.llm.close()


def _load_error(slot: Slot, exc: BaseException) -> LlmlbError:
    from ..errors import ModelLoadError

    error = ModelLoadError(f"could not load model {slot.model_id!r}: {exc}")
    error.__cause__ = exc
    return error


def rss_bytes() -> int:
    """This process's resident memory now (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def describe(status: ModelStatus, state: SlotState) -> str:
    """What a waiting request is waiting for, e.g. ``downloading 45% (113 MB / 253 MB)``."""
    if status.status == "downloading":
        total = f" / {human_bytes(status.total_bytes)}" if status.total_bytes else ""
        return f"downloading {status.progress:.0%} ({human_bytes(status.downloaded_bytes)}{total})"
    if status.status == "waiting":
        return "waiting for a download slot"
    if state is SlotState.READY:
        return "queued behind other requests"
    return "loading"
