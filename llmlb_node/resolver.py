"""The resolution chain: local store -> catalog -> external sources -> llmlb proxy.

Orchestrates the other modules (it owns no I/O details) and makes sure that any number of threads
and processes asking for one model download it once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .catalog import Catalog, ModelEntry, ModelFile, is_valid_id, load_catalogs
from .errors import (
    NOT_TRIED,
    DownloadStalledError,
    InsufficientDiskSpaceError,
    InvalidModelIdError,
    ModelBusyError,
    ModelDownloadError,
    ModelNotInstalledError,
    SourceError,
    SourceFailure,
    UnsupportedArchitectureError,
)
from .progress import (
    FINAL_STAGES,
    Monitor,
    ProgressCallback,
    ProgressEvent,
    event_from_status,
    read_status_file,
)
from .settings import Settings
from .store import FOREIGN, InstallRecord, ModelStore, Partial, hostname, pid_alive

if TYPE_CHECKING:
    from .download import Downloader, Fetched
    from .sources import Source

log = logging.getLogger(__name__)

SourceFactory = Callable[[ModelEntry, Settings], "list[Source]"]


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: where its files are and where they came from."""

    model_id: str
    path: Path
    """The main file: what llama.cpp opens (the first file of a split GGUF)."""
    paths: tuple[Path, ...]
    source: str
    """``local`` for a cached resolve, else the source that delivered the files."""
    entry: ModelEntry | None = None

    def __fspath__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Filling:
    """A file this process is downloading now: its partial file, and what it will hold."""

    partial: Partial
    declared: int | None
    """The file's exact length as the source (or the catalog's exact `files[].size_bytes`)
    states it before the transfer; never the catalog's approximate size."""
    sha256: str | None
    """The sha256 the finished file must have (the catalog's, else the source's)."""
    proven: threading.Event = field(default_factory=threading.Event, compare=False)
    """Set once the finished file passed every check (sizes, sha256, GGUF layout): until then a
    reader serving it to another node holds back its last byte, so a file that fails them never
    reaches anyone whole."""

    @property
    def size(self) -> int | None:
        """The exact length, once known: declared, else the one the server's answer stated
        (what a reader may promise as Content-Length); None until then."""
        if self.declared is not None:
            return self.declared
        learned = self.partial.meta.get("size")
        return learned if isinstance(learned, int) and not isinstance(learned, bool) else None

    @property
    def verified(self) -> int:
        """Bytes at the start of the partial file written and hashed in order so far."""
        return self.partial.verified


@contextlib.contextmanager
def _filling(store: str, model_id: str, filename: str, filling: Filling) -> Iterator[None]:
    key = (store, model_id, filename)
    with _FLIGHTS_LOCK:
        _FILLING[key] = filling
    try:
        yield
    finally:
        with _FLIGHTS_LOCK:
            if _FILLING.get(key) is filling:
                del _FILLING[key]


@dataclass(frozen=True)
class DownloadActivity:
    """This process's downloads into one store: those running now, and how the last one ended."""

    running: tuple[ProgressEvent, ...]
    """The live event of each download in flight, oldest first."""
    last: ProgressEvent | None
    """The final event (stage installed, failed or interrupted) of the last one to finish."""


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
    architecture: str | None = None
    """``general.architecture`` from the installed GGUF's header (e.g. ``gemma3``)."""
    """After a failed download: each source's ``{"source", "kind", "message"}``, in order."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``json.dumps(status.to_dict())`` (failures become a list)."""
        data = asdict(self)
        data["failures"] = [dict(f) for f in self.failures]
        return data


@dataclass(frozen=True)
class ModelInfo:
    """One catalog entry as a listing shows it (`ModelResolver.models`)."""

    id: str
    name: str
    size_bytes: int | None
    """The catalog's size (approximate unless the catalog lists exact file sizes)."""
    installed: bool
    path: str | None
    """The installed main file, or None."""
    catalog: str
    """The catalog file the entry comes from."""
    overrides: tuple[str, ...] = ()
    """Lower catalog layers whose entry for the same id this one replaces."""
    runnable: bool = True
    """Whether this node can run it: a GGUF (`format`) for llama.cpp (`engine`)."""
    format: str = "gguf"
    engine: str = "llama_cpp"
    platforms: tuple[str, ...] = ()
    """The platforms the catalog lists it for (``linux-cuda``, ...); empty: not stated."""
    architecture: str | None = None
    """``general.architecture`` of the installed GGUF, or None."""
    unusable: str | None = None
    """Why this llama.cpp cannot load it (its architecture), or None; `runnable` is then False."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``json.dumps([m.to_dict() for m in resolver.models()])``."""
        data = asdict(self)
        data["overrides"] = list(self.overrides)
        data["platforms"] = list(self.platforms)
        return data


class _Flight:
    """One in-process download that every thread asking for the same model shares."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.done = threading.Event()
        self.result: ResolvedModel | None = None
        self.error: BaseException | None = None


# Shared by every resolver in the process, so two resolvers on one store still download once.
_FLIGHTS: dict[tuple[str, str], _Flight] = {}
_FLIGHTS_LOCK = threading.Lock()
_SLOTS: threading.BoundedSemaphore | None = None
# The files being downloaded in this process now: (store, model id, filename) -> Filling.
_FILLING: dict[tuple[str, str, str], Filling] = {}
# The final event of the last download each store's resolvers finished in this process.
_LAST_FINISHED: dict[str, ProgressEvent] = {}


# Installed models seen by any resolver in the process: (store, catalog), id -> (result, stamps).
_INSTALLED: dict[
    tuple[tuple[str, str], str], tuple[ResolvedModel, tuple[tuple[str, int, int], ...]]
]
_INSTALLED = {}
# Parsed catalogs by path, valid while the file's (mtime, size) stays the same.
_CATALOGS: dict[tuple[str, ...], tuple[tuple[tuple[int, int], ...], Catalog]] = {}


def _shared_catalog(paths: tuple[Path, ...]) -> Catalog:
    """The layered catalog of `paths`, parsed again only when one of the files changed."""
    try:
        stamps = tuple((st.st_mtime_ns, st.st_size) for st in map(os.stat, paths))
    except OSError:
        return load_catalogs(paths)  # raises CatalogError naming the file
    key = tuple(map(str, paths))
    cached = _CATALOGS.get(key)
    if cached is not None and cached[0] == stamps:
        return cached[1]
    catalog = load_catalogs(paths)
    _CATALOGS[key] = (stamps, catalog)
    return catalog


def architecture(path: Path) -> str | None:
    """``general.architecture`` from a GGUF's header (a read of its first kilobytes), or None."""
    from .gguf import GGUFError, read_header

    try:
        return read_header(path, tensors=False).architecture
    except (OSError, GGUFError):
        return None


def hub_id_prefix() -> str:
    """What every id a Hub reference installs under starts with (`hubref.ID_PREFIX`)."""
    return "hf--"


def _warn_other_platform(entry: ModelEntry) -> None:
    """One warning when the entry does not list this node's platform (installed anyway: none of
    llmlb's own entries lists a CPU platform, and a model may well run here)."""
    if not entry.platforms:
        return
    from .offload import node_platform

    here = node_platform()
    if here not in entry.platforms:
        log.warning(
            "%s: the catalog lists it for %s, not for this node (%s); installing it anyway: "
            "it may run slowly or not fit in memory here",
            entry.id,
            ", ".join(entry.platforms),
            here,
        )


def _slots(n: int) -> threading.BoundedSemaphore:
    global _SLOTS
    with _FLIGHTS_LOCK:
        if _SLOTS is None:
            _SLOTS = threading.BoundedSemaphore(n)
        return _SLOTS


class ModelResolver:
    """Resolve model ids to verified local files. `ModelResolver()` reads the environment."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        catalog: Catalog | None = None,
        sources: SourceFactory | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.store = ModelStore(self.settings.models_dir)
        self._catalog = catalog
        self._source_factory = sources
        self._downloader: Downloader | None = None
        self._init_lock = threading.Lock()
        layers = os.pathsep.join(str(p) for p in self.settings.catalog_layers)
        self._cache_key = (str(self.settings.models_dir), layers)

    # -- public API -----------------------------------------------------------------------
    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            with self._init_lock:
                if self._catalog is None:
                    self._catalog = _shared_catalog(self.settings.catalog_layers)
        return self._catalog

    def resolve(self, model_id: str, *, progress: ProgressCallback | None = None) -> ResolvedModel:
        """The model's local path, downloading and installing it first if needed.

        Raises `UnsupportedModelError` (unknown id), `ModelDownloadError` (every source failed,
        with each one's cause), `InsufficientDiskSpaceError`, or `CatalogError`. A Hub reference
        (``hf:ORG/REPO...``, with LLMLB_ALLOW_HF) installs under its derived id (`hubref`).
        """
        reference, model_id = model_id, self.canonical_id(model_id)
        found = self.installed(model_id)
        if found is not None:
            return found
        # UnsupportedModelError (UnrunnableModelError for a non-GGUF), before any network
        entry = self._entry(model_id, reference)
        key = (str(self.settings.models_dir), model_id)
        with _FLIGHTS_LOCK:
            flight = _FLIGHTS.get(key)
            owner = flight is None
            if flight is None:
                flight = _Flight(Monitor(model_id, self.store.status_path(model_id)))
                _FLIGHTS[key] = flight
        flight.monitor.subscribe(progress)
        if not owner:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            return flight.result
        try:
            flight.result = self._download(entry, flight.monitor)
            return flight.result
        except BaseException as exc:
            flight.error = exc
            if flight.monitor.event.stage not in FINAL_STAGES:  # not recorded under the lock
                self._record_failure(entry, flight.monitor, exc)
            raise
        finally:
            with _FLIGHTS_LOCK:
                _FLIGHTS.pop(key, None)
                _LAST_FINISHED[key[0]] = flight.monitor.event
            flight.monitor.close()
            flight.done.set()

    async def aresolve(
        self, model_id: str, *, progress: ProgressCallback | None = None
    ) -> ResolvedModel:
        """`resolve` in a worker thread, so an asyncio event loop keeps running meanwhile.

        Cancelling the awaiting task does not stop the download (other callers may share it).
        """
        import asyncio

        return await asyncio.to_thread(self.resolve, model_id, progress=progress)

    def models(self) -> list[ModelInfo]:
        """Every catalog entry (in catalog order) with its installed state. No network."""
        infos = []
        for entry in self.catalog:
            found = self.installed(entry.id)
            why = self.unusable(entry.id)
            infos.append(
                ModelInfo(
                    id=entry.id,
                    name=entry.name,
                    size_bytes=entry.total_size,
                    installed=found is not None,
                    path=str(found.path) if found else None,
                    catalog=entry.origin,
                    overrides=tuple(self.catalog.overridden.get(entry.id, ())),
                    runnable=entry.runnable and why is None,
                    format=entry.format,
                    engine=entry.engine,
                    platforms=entry.platforms,
                    architecture=architecture(found.path) if found else None,
                    unusable=why,
                )
            )
        return infos + self._hub_models()

    def _hub_models(self) -> list[ModelInfo]:
        """The installed models that Hub references brought (`hubref`), in id order."""
        infos = []
        for model_id in self.store.installed_ids():
            entry = None if model_id in self.catalog else self._hub_entry(model_id)
            found = self.installed(model_id) if entry is not None else None
            if entry is None or found is None:
                continue
            infos.append(
                ModelInfo(
                    id=model_id,
                    name=entry.name,
                    size_bytes=entry.total_size,
                    installed=True,
                    path=str(found.path),
                    catalog=str(entry.raw.get("reference") or entry.origin),
                    runnable=self.unusable(model_id) is None,
                    architecture=architecture(found.path),
                    unusable=self.unusable(model_id),
                )
            )
        return infos

    def installed(self, model_id: str) -> ResolvedModel | None:
        """The installed model, or None. Never touches the network: a few stat calls.

        A model seen installed before costs one stat per file: its files unchanged (same size
        and mtime as the verified install) is proof enough; any change goes back to the record.
        """
        model_id = self.canonical_id(model_id)
        key = (self._cache_key, model_id)
        hit = _INSTALLED.get(key)
        if hit is not None:
            resolved, stamps = hit
            for path, size, mtime_ns in stamps:
                try:
                    st = os.stat(path)
                except OSError:
                    break
                if st.st_size != size or st.st_mtime_ns != mtime_ns:
                    break
            else:
                return resolved
            _INSTALLED.pop(key, None)
        if not is_valid_id(model_id):
            raise InvalidModelIdError(model_id, str(self.settings.catalog_path))
        entry = self.catalog.find(model_id)
        if entry is not None and not entry.runnable:
            return None  # whatever lies on disk for it, this node cannot run it
        record = self.store.lookup(model_id, entry) or self.store.adopt_manual(model_id, entry)
        if record is None:
            return None
        resolved = self._resolved(record, entry, "local")
        stamps = tuple(
            (str(p), f.size, f.mtime_ns) for p, f in zip(resolved.paths, record.files, strict=True)
        )
        _INSTALLED[key] = (resolved, stamps)
        return resolved

    def path(self, model_id: str) -> Path:
        """The installed main file; `ModelNotInstalledError` if it is not installed."""
        model_id = self.canonical_id(model_id)
        found = self.installed(model_id)
        if found is None:
            if model_id in self.catalog:
                self.catalog.runnable(model_id)  # UnrunnableModelError for a non-GGUF entry
            elif not model_id.startswith(hub_id_prefix()):
                self.catalog.get(model_id)  # raises UnsupportedModelError with suggestions
            state = self._not_installed(model_id)
            raise ModelNotInstalledError(
                f"model {model_id!r} {state} in {self.settings.models_dir}; "
                f"run `llmlb-node pull {model_id}`"
            )
        return found.path

    def _not_installed(self, model_id: str) -> str:
        """Why `model_id` is not installed, for `path`'s message."""
        damage = self.store.damage(model_id)
        entry = self.catalog.find(model_id)
        other = self.store.foreign(model_id, entry) if entry is not None else None
        if other is not None:
            return f"is {FOREIGN} ({other})"
        return f"is damaged ({damage})" if damage else "is not installed"

    def remove(self, model_id: str) -> bool:
        """Delete an installed model (files, record, partial downloads).

        Takes the model's download lock first: while a download holds it, raises
        `ModelBusyError` naming the holder instead of pulling files from under it.
        """
        model_id = self.canonical_id(model_id)
        if not is_valid_id(model_id):
            raise InvalidModelIdError(model_id)
        from filelock import Timeout

        if (str(self.settings.models_dir), model_id) in _FLIGHTS:
            raise _busy(model_id, f"this process (pid {os.getpid()})")
        lock = None
        if self.store.meta_dir(model_id).is_dir():  # else no download ever started here
            lock = self._model_lock(model_id)
            try:
                lock.acquire(timeout=0.5)
            except Timeout:
                data = read_status_file(self.store.status_path(model_id))
                holder = f"pid {data.get('pid')} on {data.get('host')}" if data else "a process"
                raise _busy(model_id, holder) from None
        try:
            _INSTALLED.pop((self._cache_key, model_id), None)
            return self.store.remove(model_id)
        finally:
            if lock is not None:
                lock.release()

    def status(self, model_id: str | None = None) -> ModelStatus | list[ModelStatus]:
        """llmlb's ModelResolutionStatus for one model, or for every known model."""
        if model_id is None:
            ids = dict.fromkeys(self.catalog.ids)
            ids.update(dict.fromkeys(self.store.installed_ids()))
            meta_root = self.settings.models_dir / ".llmlb"
            if meta_root.is_dir():
                ids.update(
                    dict.fromkeys(p.name for p in meta_root.iterdir() if is_valid_id(p.name))
                )
            return [self._status(i) for i in ids]
        return self._status(self.canonical_id(model_id))

    def canonical_id(self, model_id: str) -> str:
        """`model_id` as the store knows it: a Hub reference (``hf:ORG/REPO...``) as the id it
        installs under (`HubReferencesDisabledError` without LLMLB_ALLOW_HF), else unchanged."""
        if model_id[:3].lower() != "hf:":
            return model_id
        from .hubref import parse

        return parse(model_id, self.settings).model_id

    def check_known(self, model_id: str) -> str:
        """The canonical id of a model this resolver can resolve: a catalog id, an installed
        model, or a Hub reference (with LLMLB_ALLOW_HF); else `UnsupportedModelError` naming up
        to three close ids. No network."""
        canonical = self.canonical_id(model_id)
        if canonical != model_id or canonical in self.catalog:
            return canonical
        if self.installed(canonical) is None and self._hub_entry(canonical) is None:
            self.catalog.get(canonical)
        return canonical

    def unusable(self, model_id: str) -> str | None:
        """Why this node cannot run `model_id` for its architecture (`archcheck`: the installed
        file's header, the catalog's ``architecture``, or what an earlier install read of its
        header), else None; WARNed once per process. No network."""
        entry = self.catalog.find(model_id)
        if entry is not None and not entry.runnable:
            return None  # refused for its format already
        found = self.installed(model_id)
        if entry is None and found is None:
            return None
        from .archcheck import why_unusable

        return why_unusable(entry, found.path if found else None, self.store)

    def unusable_models(self) -> dict[str, str]:
        """`unusable` of every catalog entry and installed model (each WARNed once)."""
        ids = dict.fromkeys([*self.catalog.ids, *self.store.installed_ids()])
        found = {i: self.unusable(i) for i in ids}
        return {i: why for i, why in found.items() if why is not None}

    def _entry(self, model_id: str, reference: str) -> ModelEntry:
        """The entry to install: the catalog's (`UnrunnableModelError` for a non-GGUF,
        `UnsupportedArchitectureError` for an architecture known to be unsupported), else a
        Hub model's (`hubref`: its note in the store, else one Hub API call)."""
        if model_id in self.catalog:
            entry = self.catalog.runnable(model_id)
        else:
            entry = self._hub_entry(model_id, reference) or self.catalog.get(model_id)
        if self.unusable(model_id) is not None:
            from .archcheck import entry_architecture, llama_cpp_version

            arch = entry_architecture(entry, self.store) or "unknown"
            raise UnsupportedArchitectureError(model_id, arch, llama_cpp_version())
        return entry

    def _hub_entry(self, model_id: str, reference: str | None = None) -> ModelEntry | None:
        if not model_id.startswith(hub_id_prefix()):
            return None
        from .hubref import entry_for

        return entry_for(model_id, reference, self.store, self.settings)

    def activity(self) -> DownloadActivity:
        """What this process is downloading into the store, from memory: never any I/O."""
        root = str(self.settings.models_dir)
        with _FLIGHTS_LOCK:
            running = tuple(f.monitor.event for (d, _), f in _FLIGHTS.items() if d == root)
            return DownloadActivity(running, _LAST_FINISHED.get(root))

    def filling(self, model_id: str, filename: str) -> Filling | None:
        """The file this process is downloading for `model_id` now, else None (memory only):
        what lets a node serve a file to another while it still arrives."""
        with _FLIGHTS_LOCK:
            return _FILLING.get((self._cache_key[0], model_id, filename))

    def close(self) -> None:
        if self._downloader is not None:
            self._downloader.close()
            self._downloader = None

    def __enter__(self) -> ModelResolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the download ---------------------------------------------------------------------
    def _record_failure(
        self, entry: ModelEntry, monitor: Monitor, exc: BaseException, locked: bool = False
    ) -> None:
        """Report how a resolve ended without a model (status file, callbacks). Under the
        model's lock, also leave no empty model directory behind (without it, another process
        may be about to write there). A partial file stays for the next resolve to resume."""
        if locked:
            with contextlib.suppress(OSError):
                self.store.prune_empty(entry.id)
        if not isinstance(exc, Exception):  # Ctrl-C (KeyboardInterrupt), SystemExit
            done = monitor.event.downloaded
            monitor.stage("interrupted", message=f"stopped at {done} bytes; resolve resumes it")
            return
        if isinstance(exc, ModelDownloadError):
            monitor.failures = [_failure_row(f) for f in exc.failures]
            causes = "; ".join(f"{f.source}: [{f.kind}] {f.message}" for f in exc.failures)
            message = f"could not download model {exc.model_id!r}; every source failed: {causes}"
        else:
            message = " ".join(str(exc).split()) or type(exc).__name__
        monitor.stage("failed", message=message)

    def _download(self, entry: ModelEntry, monitor: Monitor) -> ResolvedModel:
        _warn_other_platform(entry)
        slots = _slots(self.settings.max_concurrent_downloads)
        if not slots.acquire(blocking=False):
            monitor.stage("waiting", message="queued behind other downloads")
            slots.acquire()
        try:
            lock = self._lock_or_installed(entry, monitor)
            if isinstance(lock, InstallRecord):
                return self._finish(entry, lock, monitor, "local")
            try:
                record = self.store.lookup(entry.id, entry)
                if record is not None:  # finished by someone else while we queued
                    return self._finish(entry, record, monitor, "local")
                monitor.hold_status(heartbeat=min(5.0, self._stale_after() / 4))
                return self._fetch(entry, monitor)
            except BaseException as exc:
                # While we still own the status file (and the lock, when we got it).
                self._record_failure(entry, monitor, exc, locked=lock is not None)
                raise
            finally:
                monitor.release_status()  # before the lock: the next holder's status is its own
                if lock is not None:
                    lock.release()
        finally:
            slots.release()

    def _model_lock(self, model_id: str) -> Any:
        """The model's cross-process lock (a filelock.FileLock, not yet taken).

        Only arguments every filelock since 3.12 takes (pyproject's floor is tested in CI): the
        newer preserve_lock_file raised TypeError on older releases, and nothing here relies on
        the lock file outliving a release.
        """
        from filelock import FileLock

        path = self.store.lock_path(model_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path), thread_local=False)

    def _lock_or_installed(self, entry: ModelEntry, monitor: Monitor) -> Any:
        """Take the model's cross-process lock, or return the record another process installed.

        A waiter only reads the holder's status file (it never writes it). Returns None (go on
        without the lock) only when the holder is gone: its pid is dead on this host, or (on
        another host) its heartbeat has not moved for several stall windows. A holder alive on
        this host is never taken over, whatever its heartbeat says (a SIGSTOPped one would go on
        writing when continued): after a stale window without its progress the waiter gives up
        with `ModelBusyError`. Correctness never depends on the lock: every writer has its own
        temporary file and publishes with an atomic rename.
        """
        from filelock import Timeout

        lock = self._model_lock(entry.id)
        stale_after = self._stale_after()
        waiting_since = time.monotonic()
        watch = _Holder(entry.id, stale_after)
        announced = False
        while True:
            try:
                lock.acquire(timeout=0.1, poll_interval=0.01)
                return lock
            except Timeout:
                pass
            record = self.store.lookup(entry.id, entry)
            if record is not None:
                return record
            data = _others_status(read_status_file(self.store.status_path(entry.id)))
            if not announced:
                announced = True
                holder = (
                    f"pid {data.get('pid')} on {data.get('host')}" if data else "another process"
                )
                log.info("%s: %s is downloading it; waiting", entry.id, holder)
                monitor.stage("waiting", message=f"{holder} is downloading it")
            # The grace covers a new holder that has not written its first status yet.
            grace_over = time.monotonic() - waiting_since > min(stale_after, 1.0)
            watch.observe(data, monitor, self.settings.stall_timeout)
            if data is not None:
                other = event_from_status(data)
                if other.stage in ("downloading", "verifying") and not watch.quiet:
                    monitor.relay(other)
                why = _holder_gone(data, stale_after)
                if why is not None and grace_over:
                    log.warning(
                        "%s: the download held by pid %s on %s %s; taking over",
                        entry.id,
                        data.get("pid"),
                        data.get("host"),
                        why,
                    )
                    return None
            # The lock is held, so its holder lives (the kernel drops a dead one's lock): wait
            # for it, up to this waiter's own deadline.
            watch.check_deadline()

    def _stale_after(self) -> float:
        return self.settings.stall_timeout * (self.settings.max_stalls + 1)

    def _fetch(self, entry: ModelEntry, monitor: Monitor) -> ResolvedModel:
        store = self.store
        done = store.verified_files(entry.id, entry)
        todo = [f for f in entry.files if f.filename not in done]
        reused = self._reuse(entry, todo, monitor)
        if reused and len(reused) == len(todo):
            return self._install_reused(entry, todo, reused, monitor)
        todo = [f for f in todo if f.filename not in reused]
        needed = sum(
            max((f.expected_size or 0) - store.partial_bytes(entry.id, f.filename), 0) for f in todo
        )
        free = store.free_bytes(entry.id)
        if needed > free:
            raise InsufficientDiskSpaceError(store.model_dir(entry.id), needed, free)

        from .download import can_resume

        downloader = self._get_downloader()
        ready: dict[str, Fetched] = dict(reused)  # type: ignore[arg-type]
        failures: list[SourceFailure] = []
        disk_errors: list[InsufficientDiskSpaceError] = []
        stale_after = self._stale_after()
        checked = entry.filename in done or entry.filename in reused
        for source in self._sources(entry):
            monitor.failures = [_failure_row(f) for f in failures]  # shown while the next runs
            ready = _one_source(ready, reused)
            try:
                for i, f in enumerate(todo):
                    if f.filename in ready:
                        continue
                    monitor.stage("resolving", source=source.label, filename=f.filename)
                    remote = source.locate(entry, f)
                    if f.filename == entry.filename and not checked:
                        checked = self._check_architecture(entry, f, remote)
                    rest = sum((g.expected_size or 0) for g in todo[i + 1 :])
                    size = remote.size if remote.size is not None else f.expected_size
                    monitor.file_started(f.filename, remote.source, size, rest)
                    partial = store.claim_partial(
                        entry.id,
                        f.filename,
                        stale_after,
                        accept=lambda meta, r=remote, f=f: can_resume(meta, r, f),
                    )
                    exact = remote.size if remote.size is not None else f.size_bytes
                    filling = Filling(partial, exact, f.sha256 or remote.sha256)
                    with _filling(self._cache_key[0], entry.id, f.filename, filling):
                        ready[f.filename] = downloader.fetch(remote, partial, f, monitor.bytes)
                        filling.proven.set()
                    monitor.file_done(ready[f.filename].size)
            except SourceError as exc:
                # INFO: the next source may well succeed. If none does, ModelDownloadError
                # carries every cause to the caller, who decides how loud to be.
                failures.append(exc.failure)
                log.info("%s: %s [%s]", entry.id, exc.failure, exc.failure.kind)
                continue
            except DownloadStalledError as exc:
                failures.append(SourceFailure(exc.source, "stalled", str(exc)))
                log.info("%s: %s [stalled]", entry.id, exc)
                continue
            except InsufficientDiskSpaceError as exc:
                # The size behind this may be one only this server stated (a lying one can claim
                # a petabyte): it is this source's failure, and the next source may fit. When
                # no source succeeds, the disk error itself is raised below.
                disk_errors.append(exc)
                failures.append(SourceFailure(source.label, "disk", str(exc)))
                log.info("%s: %s: %s [disk]", entry.id, source.label, exc)
                continue
            problem = self._split_set_problem(entry, ready)
            if problem is not None:
                failures.append(SourceFailure(source.label, "integrity", problem))
                log.info("%s: %s: %s [integrity]", entry.id, source.label, problem)
                continue
            monitor.stage("verifying")
            if store.lookup(entry.id, entry) is None:  # else another writer won the race
                try:
                    store.publish(
                        entry.id,
                        [
                            (
                                Path(ready[f.filename].path),
                                f.filename,
                                ready[f.filename].size,
                                ready[f.filename].sha256,
                            )
                            for f in todo
                        ],
                        source.label,
                        order=[f.filename for f in entry.files],
                        revision=source.pinned,
                    )
                except FileNotFoundError as exc:  # removed by hand before the rename
                    message = f"downloaded files were removed before install ({exc.filename})"
                    failures.append(SourceFailure(source.label, "disk", message))
                    log.info("%s: %s: %s [disk]", entry.id, source.label, message)
                    ready.clear()
                    continue
            else:
                for fetched in ready.values():
                    Path(fetched.path).unlink(missing_ok=True)
            record = store.lookup(entry.id, entry)
            if record is None:
                raise ModelDownloadError(
                    entry.id,
                    [
                        SourceFailure(
                            source.label, "integrity", "installed files changed during install"
                        )
                    ],
                )
            log.info(
                "%s: installed from %s at %s%s",
                entry.id,
                source.label,
                store.file_path(entry.id, record.files[0].filename),
                _fallback_note(failures),
            )
            return self._finish(entry, record, monitor, source.label)
        if disk_errors:  # no source fitted: the disk is what the user must act on (exit 5)
            raise disk_errors[0]
        raise ModelDownloadError(entry.id, failures)

    def _split_set_problem(self, entry: ModelEntry, ready: dict[str, Any]) -> str | None:
        """Why the model's GGUF files, about to be installed together, are not one model (a
        shard of another split set, another architecture), or None."""
        names = [f.filename for f in entry.files if f.filename.lower().endswith(".gguf")]
        if len(names) < 2:
            return None
        from .gguf import GGUFError, check_split_set, read_header

        try:
            headers = [
                (n, read_header(_ready_path(self.store, entry, ready, n), tensors=False))
                for n in names
            ]
            check_split_set(headers)
        except (GGUFError, OSError) as exc:
            return str(exc)
        return None

    def _reuse(self, entry: ModelEntry, todo: list[ModelFile], monitor: Monitor) -> dict[str, Any]:
        """Files of `entry` that other tools downloaded (`reuse`), verified and placed in the
        store: filename -> `reuse.Reused`. Empty with LLMLB_REUSE=0. A main file whose
        architecture this llama.cpp does not know raises `UnsupportedArchitectureError`."""
        if not todo or not self.settings.reuse:
            return {}
        from .reuse import reuse_files

        monitor.stage("resolving", source="reuse", filename=todo[0].filename)
        found = reuse_files(self.store, entry, todo, self.settings)
        main = found.get(entry.filename)
        if main is not None:
            from .archcheck import check_local

            try:
                check_local(entry, Path(main.path), self.store)
            except BaseException:
                for reused in found.values():
                    Path(reused.path).unlink(missing_ok=True)
                raise
        return found

    def _check_architecture(self, entry: ModelEntry, file: ModelFile, remote: Any) -> bool:
        """Refuse (`UnsupportedArchitectureError`) before the weights a main file whose
        architecture this llama.cpp does not know; True once checked (`archcheck`)."""
        from .archcheck import check

        check(entry, file, remote, self.settings, self.store)
        return True

    def _install_reused(
        self, entry: ModelEntry, todo: list[ModelFile], reused: dict[str, Any], monitor: Monitor
    ) -> ResolvedModel:
        label = reused[todo[0].filename].source
        monitor.stage("verifying", source=label)
        files = [
            (
                Path(reused[f.filename].path),
                f.filename,
                reused[f.filename].size,
                reused[f.filename].sha256,
            )
            for f in todo
        ]
        if self.store.lookup(entry.id, entry) is None:
            self.store.publish(entry.id, files, label, order=[f.filename for f in entry.files])
        for path, *_ in files:
            path.unlink(missing_ok=True)  # left only when another writer won the race
        record = self.store.lookup(entry.id, entry)
        if record is None:
            failure = SourceFailure(label, "integrity", "installed files changed during install")
            raise ModelDownloadError(entry.id, [failure])
        log.info(
            "%s: installed from %s at %s",
            entry.id,
            label,
            self._resolved(record, entry, label).path,
        )
        return self._finish(entry, record, monitor, label)

    def _finish(
        self, entry: ModelEntry, record: InstallRecord, monitor: Monitor, source: str
    ) -> ResolvedModel:
        resolved = self._resolved(record, entry, source)
        event = monitor.event
        monitor.stage(
            "installed", downloaded=event.total or event.downloaded, message=str(resolved.path)
        )
        return resolved

    def _resolved(
        self, record: InstallRecord, entry: ModelEntry | None, source: str
    ) -> ResolvedModel:
        base = self.settings.models_dir / record.model_id
        paths = tuple(base / f.filename for f in record.files)
        return ResolvedModel(record.model_id, paths[0], paths, source, entry)

    def _sources(self, entry: ModelEntry) -> list[Source]:
        if self._source_factory is not None:
            return self._source_factory(entry, self.settings)
        from .sources import build_sources

        return build_sources(entry, self.settings)

    def _get_downloader(self) -> Downloader:
        if self._downloader is None:
            with self._init_lock:
                if self._downloader is None:
                    from .download import Downloader

                    self._downloader = Downloader(self.settings)
        return self._downloader

    # -- status ---------------------------------------------------------------------------
    def _status(self, model_id: str) -> ModelStatus:
        status = self._download_status(model_id)
        why = self.unusable(model_id) if status.status != "downloading" else None
        return status if why is None else replace(status, status="error", error_message=why)

    def _download_status(self, model_id: str) -> ModelStatus:
        if not is_valid_id(model_id):
            raise InvalidModelIdError(model_id)
        flight = _FLIGHTS.get((str(self.settings.models_dir), model_id))
        if flight is not None:
            live = _from_event(flight.monitor.event, None, os.getpid())
            return replace(live, failures=tuple(flight.monitor.failures))
        found = self.installed(model_id)
        data = read_status_file(self.store.status_path(model_id))
        if found is not None:
            completed = data is not None and data.get("stage") == "installed"
            size = sum(p.stat().st_size for p in found.paths if p.exists())
            return ModelStatus(
                model_id,
                "completed" if completed else "local",
                1.0,
                size,
                size,
                str(found.path),
                source=data.get("source") if data else "local",
                architecture=architecture(found.path),
            )
        damage = self.store.damage(model_id)
        if damage is not None:
            message = f"damaged: {damage}; `llmlb-node pull {model_id}` downloads it again"
            return ModelStatus(model_id, "error", 0.0, 0, None, None, error_message=message)
        entry = self.catalog.find(model_id)
        other = self.store.foreign(model_id, entry) if entry is not None else None
        if other is not None:
            message = f"{FOREIGN}: {other}; `llmlb-node pull {model_id}` replaces it"
            return ModelStatus(model_id, "error", 0.0, 0, None, None, error_message=message)
        if data is not None:
            event = event_from_status(data)
            pid = data.get("pid")
            alive = data.get("host") != hostname() or (isinstance(pid, int) and pid_alive(pid))
            fresh = time.time() - float(data.get("updated_at") or 0) < self._stale_after()
            if event.stage == "failed":
                failures = data.get("failures")
                status = _from_event(event, event.message or "download failed", pid)
                if isinstance(failures, list):
                    kept = tuple(_failure_dict(f) for f in failures if isinstance(f, dict))
                    status = replace(status, failures=kept)
                return status
            if event.stage not in ("installed", "interrupted") and not (alive and fresh):
                # The downloading process is gone (killed): its partial is resumable.
                event = replace(event, stage="interrupted")
            if event.stage != "installed":
                return _from_event(event, None, pid)
        total = None
        if model_id in self.catalog:
            total = self.catalog.get(model_id).total_size
        return ModelStatus(model_id, "missing", 0.0, 0, total, None)


def _failure_row(failure: SourceFailure) -> dict[str, str]:
    return {"source": failure.source, "kind": failure.kind, "message": failure.message}


def _one_source(ready: dict[str, Any], reused: dict[str, Any]) -> dict[str, Any]:
    """What the next source starts from: the files reused locally, never the files a failed
    source delivered (the files of one model come from one source, at one revision)."""
    for name, fetched in ready.items():
        if name not in reused:
            Path(fetched.path).unlink(missing_ok=True)
    return dict(reused)


def _ready_path(store: ModelStore, entry: ModelEntry, ready: dict[str, Any], name: str) -> Path:
    fetched = ready.get(name)
    return Path(fetched.path) if fetched is not None else store.file_path(entry.id, name)


def _failure_dict(data: dict[str, Any]) -> dict[str, str]:
    return {k: str(data.get(k) or "") for k in ("source", "kind", "message")}


def _fallback_note(failures: list[SourceFailure]) -> str:
    """`` (after huggingface:org/x failed: [dns] ...)`` naming the sources tried before the one
    that delivered; sources skipped by configuration are not news."""
    tried = [f for f in failures if f.kind not in NOT_TRIED]
    if not tried:
        return ""
    causes = "; ".join(f"{f.source} failed: [{f.kind}] {f.message}" for f in tried)
    return f" (after {causes})"


def _busy(model_id: str, holder: str) -> ModelBusyError:
    return ModelBusyError(
        f"model {model_id!r} is being downloaded by {holder}; wait for it to finish "
        "(or stop it), then run rm again"
    )


def _others_status(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """Another process's status; one naming this very process is a leftover of ours."""
    if data is None or (data.get("pid") == os.getpid() and data.get("host") == hostname()):
        return None
    return data


class _Holder:
    """What a waiter sees of the lock's holder: who it is and when it last made progress (a
    change in its status: stage, file, bytes). The waiter's deadline is one stale window of no
    progress: then it gives up, typed, rather than take over a holder that may be alive."""

    def __init__(self, model_id: str, stale_after: float) -> None:
        self.model_id = model_id
        self.stale_after = stale_after
        self.who = "another process"
        self.seen: tuple[Any, ...] | None = None
        self.changed_at = time.monotonic()
        self.quiet = False
        self.reported = -1

    def observe(self, data: dict[str, Any] | None, monitor: Monitor, report_after: float) -> None:
        if data is not None:
            self.who = f"pid {data.get('pid')}" + (
                "" if data.get("host") == hostname() else f" on {data.get('host')}"
            )
            keys = ("pid", "host", "stage", "filename", "downloaded", "source")
            seen = tuple(data.get(k) for k in keys)
            if seen != self.seen:
                self.seen, self.changed_at, self.quiet = seen, time.monotonic(), False
        idle = time.monotonic() - self.changed_at
        if idle >= report_after and int(idle) != self.reported:
            if not self.quiet:
                log.info("%s: waiting: %s", self.model_id, self.waiting(idle))
            self.quiet, self.reported = True, int(idle)
            monitor.stage("waiting", message=self.waiting(idle))

    def waiting(self, idle: float) -> str:
        return f"held by {self.who}, no progress for {idle:.0f} s"

    def check_deadline(self) -> None:
        idle = time.monotonic() - self.changed_at
        if idle > self.stale_after:
            raise ModelBusyError(
                f"model {self.model_id!r}: its download is {self.waiting(idle)}; a live holder "
                f"is never taken over (stopped? `kill -CONT` resumes it, or end it), so this "
                f"waiter gives up after {self.stale_after:.0f} s; run the command again later"
            )


def _holder_gone(data: dict[str, Any], stale_after: float) -> str | None:
    """Why the status file's writer cannot be holding the lock any more, or None if it may.

    On this host only a dead pid is gone: a live one (even SIGSTOPped, its heartbeat stale)
    would go on writing when continued. Another host's holder is gone when its heartbeat is."""
    pid = data.get("pid")
    if data.get("host") == hostname() and isinstance(pid, int):
        return None if pid_alive(pid) else "has exited"
    quiet = time.time() - (data.get("updated_at") or 0)
    if quiet > stale_after:
        return f"has not written a heartbeat for {quiet:.0f}s"
    return None


def _from_event(event: ProgressEvent, error: str | None, pid: int | None) -> ModelStatus:
    if error is not None:
        status = "error"
    elif event.stage in ("resolving", "waiting"):
        status = "waiting"
    elif event.stage == "installed":
        status = "completed"
    elif event.stage == "failed":
        status = "error"
        error = event.message
    elif event.stage == "interrupted":
        status = "interrupted"
    else:
        status = "downloading"
    return ModelStatus(
        model_id=event.model_id,
        status=status,
        progress=event.fraction or (1.0 if status == "completed" else 0.0),
        downloaded_bytes=event.downloaded,
        total_bytes=event.total,
        local_path=event.message if status == "completed" else None,
        error_message=error,
        source=event.source,
        bytes_per_s=event.bytes_per_s,
        pid=pid,
    )
