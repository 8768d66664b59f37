"""The resolution chain: local store -> catalog -> external sources -> llmlb proxy.

Decides what happens in which order (installed? which sources, in turn; who holds the model's
lock; publish) and makes sure that any number of threads and processes asking for one model
download it once. The bytes themselves are `download`'s, the files `store`'s, the status texts
`status`'s and the state shared across resolvers `registry`'s.
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
from .registry import REGISTRY, StoreState
from .settings import Settings
from .store import FOREIGN, InstallRecord, ModelStore, Partial, hostname, pid_alive

if TYPE_CHECKING:
    # Not at import: resolving an installed model needs none of these (downloads, progress and
    # status import them when they start).
    from .download import Downloader, Fetched
    from .progress import Monitor, ProgressCallback, ProgressEvent
    from .sources import Source
    from .status import ModelStatus

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
def _filling(state: StoreState, model_id: str, filename: str, filling: Filling) -> Iterator[None]:
    key = (model_id, filename)
    with REGISTRY.lock:
        state.filling[key] = filling
    try:
        yield
    finally:
        with REGISTRY.lock:
            if state.filling.get(key) is filling:
                del state.filling[key]


@dataclass(frozen=True)
class DownloadActivity:
    """This process's downloads into one store: those running now, and how the last one ended."""

    running: tuple[ProgressEvent, ...]
    """The live event of each download in flight, oldest first."""
    last: ProgressEvent | None
    """The final event (stage installed, failed or interrupted) of the last one to finish."""


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


@dataclass
class _Tried:
    """What the sources tried so far for one install said."""

    failures: list[SourceFailure] = field(default_factory=list)
    disk_errors: list[InsufficientDiskSpaceError] = field(default_factory=list)
    arch_checked: bool = False
    """Whether the main file's architecture was checked (once, whichever source gives it)."""


class _Flight:
    """One in-process download that every thread asking for the same model shares."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.done = threading.Event()
        self.result: ResolvedModel | None = None
        self.error: BaseException | None = None


@dataclass(frozen=True)
class _Locked:
    """The model's cross-process lock is ours."""

    lock: Any


@dataclass(frozen=True)
class _InstalledMeanwhile:
    """Another process installed the model while we waited for its lock."""

    record: InstallRecord


@dataclass(frozen=True)
class _HolderGone:
    """The lock's holder is gone (exited, or silent for several stall windows): go on without."""

    why: str


def _shared_catalog(state: StoreState, paths: tuple[Path, ...]) -> Catalog:
    """The layered catalog of `paths`, parsed again only when one of the files changed."""
    try:
        stamps = tuple((st.st_mtime_ns, st.st_size) for st in map(os.stat, paths))
    except OSError:
        return load_catalogs(paths)  # raises CatalogError naming the file
    key = os.pathsep.join(map(str, paths))
    cached = state.catalogs.get(key)
    if cached is not None and cached[0] == stamps:
        return cached[1]
    catalog = load_catalogs(paths)
    state.catalogs[key] = (stamps, catalog)
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
        self._layers = os.pathsep.join(str(p) for p in self.settings.catalog_layers)
        self._shared = REGISTRY.store(str(self.settings.models_dir))
        """What every resolver on this store shares (downloads in flight, installs seen, ...)."""

    # -- public API -----------------------------------------------------------------------
    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            with self._init_lock:
                if self._catalog is None:
                    self._catalog = _shared_catalog(self._shared, self.settings.catalog_layers)
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
        flight, owner = self._board(model_id)
        flight.monitor.subscribe(progress)
        if not owner:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            return flight.result
        return self._fly(entry, flight)

    def _board(self, model_id: str) -> tuple[_Flight, bool]:
        """The model's in-process download, and whether this caller starts (owns) it."""
        with REGISTRY.lock:
            flight = self._shared.flights.get(model_id)
            if flight is not None:
                return flight, False
            from .progress import Monitor

            flight = _Flight(Monitor(model_id, self.store.status_path(model_id)))
            self._shared.flights[model_id] = flight
            return flight, True

    def _fly(self, entry: ModelEntry, flight: _Flight) -> ResolvedModel:
        """Run the download `flight` stands for; every caller sharing it gets its outcome."""
        try:
            flight.result = self._download(entry, flight.monitor)
            return flight.result
        except BaseException as exc:
            flight.error = exc
            from .progress import FINAL_STAGES

            if flight.monitor.event.stage not in FINAL_STAGES:  # not recorded under the lock
                self._record_failure(entry, flight.monitor, exc)
            raise
        finally:
            with REGISTRY.lock:
                self._shared.flights.pop(entry.id, None)
                self._shared.last_finished = flight.monitor.event
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
            why = self.unusable(model_id)
            infos.append(
                ModelInfo(
                    id=model_id,
                    name=entry.name,
                    size_bytes=entry.total_size,
                    installed=True,
                    path=str(found.path),
                    catalog=str(entry.raw.get("reference") or entry.origin),
                    runnable=why is None,
                    architecture=architecture(found.path),
                    unusable=why,
                )
            )
        return infos

    def installed(self, model_id: str) -> ResolvedModel | None:
        """The installed model, or None. Never touches the network: a few stat calls.

        A model seen installed before costs one stat per file: its files unchanged (same size
        and mtime as the verified install) is proof enough; any change goes back to the record.
        """
        model_id = self.canonical_id(model_id)
        key = (self._layers, model_id)
        hit = self._shared.installed.get(key)
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
            self._shared.installed.pop(key, None)
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
        self._shared.installed[key] = (resolved, stamps)
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

        if model_id in self._shared.flights:
            raise _busy(model_id, f"this process (pid {os.getpid()})")
        lock = None
        if self.store.meta_dir(model_id).is_dir():  # else no download ever started here
            lock = self._model_lock(model_id)
            try:
                lock.acquire(timeout=0.5)
            except Timeout:
                from .progress import read_status_file

                data = read_status_file(self.store.status_path(model_id))
                holder = f"pid {data.get('pid')} on {data.get('host')}" if data else "a process"
                raise _busy(model_id, holder) from None
        try:
            self._shared.installed.pop((self._layers, model_id), None)
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
        from .archcheck import entry_architecture, llama_cpp_version, why_unusable

        if why_unusable(entry, None, self.store) is not None:  # known before any network
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
        with REGISTRY.lock:
            running = tuple(f.monitor.event for f in self._shared.flights.values())
            return DownloadActivity(running, self._shared.last_finished)

    def filling(self, model_id: str, filename: str) -> Filling | None:
        """The file this process is downloading for `model_id` now, else None (memory only):
        what lets a node serve a file to another while it still arrives."""
        with REGISTRY.lock:
            return self._shared.filling.get((model_id, filename))

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
        slots, limit = REGISTRY.slots, self.settings.max_concurrent_downloads
        if not slots.try_acquire(limit):
            monitor.stage("waiting", message="queued behind other downloads")
            slots.acquire(limit)
        try:
            outcome = self._wait_for_lock(entry, monitor)
            if isinstance(outcome, _InstalledMeanwhile):
                return self._finish(entry, outcome.record, monitor, "local")
            return self._download_locked(entry, monitor, outcome)
        finally:
            slots.release()

    def _download_locked(
        self, entry: ModelEntry, monitor: Monitor, outcome: _Locked | _HolderGone
    ) -> ResolvedModel:
        """Download under the model's lock (or without it, its holder gone), owning the status
        file meanwhile."""
        lock = outcome.lock if isinstance(outcome, _Locked) else None
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

    def _wait_for_lock(
        self, entry: ModelEntry, monitor: Monitor
    ) -> _Locked | _InstalledMeanwhile | _HolderGone:
        """Take the model's cross-process lock; or learn that another process installed it, or
        that the lock's holder is gone (its pid is dead on this host, or, on another host, its
        heartbeat has not moved for several stall windows).

        A waiter only reads the holder's status file (it never writes it). A holder alive on
        this host is never taken over, whatever its heartbeat says (a SIGSTOPped one would go on
        writing when continued): after a stale window without its progress the waiter gives up
        with `ModelBusyError`. Correctness never depends on the lock: every writer has its own
        temporary file and publishes with an atomic rename.
        """
        from filelock import Timeout

        from .progress import read_status_file

        lock = self._model_lock(entry.id)
        waiting_since = time.monotonic()
        watch = _Holder(entry.id, self._stale_after())
        announced = False
        while True:
            try:
                lock.acquire(timeout=0.1, poll_interval=0.01)
                return _Locked(lock)
            except Timeout:
                pass
            record = self.store.lookup(entry.id, entry)
            if record is not None:
                return _InstalledMeanwhile(record)
            data = _others_status(read_status_file(self.store.status_path(entry.id)))
            if not announced:
                announced = True
                self._announce_wait(entry, monitor, data)
            gone = self._holder_gone(entry, monitor, data, time.monotonic() - waiting_since, watch)
            if gone is not None:
                return gone

    def _announce_wait(
        self, entry: ModelEntry, monitor: Monitor, data: dict[str, Any] | None
    ) -> None:
        holder = f"pid {data.get('pid')} on {data.get('host')}" if data else "another process"
        log.info("%s: %s is downloading it; waiting", entry.id, holder)
        monitor.stage("waiting", message=f"{holder} is downloading it")

    def _holder_gone(
        self,
        entry: ModelEntry,
        monitor: Monitor,
        data: dict[str, Any] | None,
        waited: float,
        watch: _Holder,
    ) -> _HolderGone | None:
        """Relay the holder's progress; `_HolderGone` once it cannot be holding the lock, or
        `ModelBusyError` at this waiter's own deadline (`_Holder`)."""
        stale_after = self._stale_after()
        watch.observe(data, monitor, self.settings.stall_timeout)
        if data is not None:
            from .progress import event_from_status

            other = event_from_status(data)
            if other.stage in ("downloading", "verifying") and not watch.quiet:
                monitor.relay(other)
            why = _why_gone(data, stale_after)
            # The grace covers a new holder that has not written its first status yet.
            if why is not None and waited > min(stale_after, 1.0):
                log.warning(
                    "%s: the download held by pid %s on %s %s; taking over",
                    entry.id,
                    data.get("pid"),
                    data.get("host"),
                    why,
                )
                return _HolderGone(why)
        # The lock is held, so its holder lives (the kernel drops a dead one's lock): wait
        # for it, up to this waiter's own deadline.
        watch.check_deadline()
        return None

    def _stale_after(self) -> float:
        return self.settings.stall_timeout * (self.settings.max_stalls + 1)

    def _fetch(self, entry: ModelEntry, monitor: Monitor) -> ResolvedModel:
        """Install `entry` from files other tools hold, else from each source in turn."""
        done = self.store.verified_files(entry.id, entry)
        todo = [f for f in entry.files if f.filename not in done]
        reused = self._reuse(entry, todo, monitor)
        if reused and len(reused) == len(todo):
            return self._install_reused(entry, todo, reused, monitor)
        todo = [f for f in todo if f.filename not in reused]
        self._check_space(entry, todo)
        ready: dict[str, Any] = dict(reused)  # filename -> Fetched (or reuse.Reused)
        tried = _Tried(arch_checked=entry.filename in done or entry.filename in reused)
        for source in self._sources(entry):
            monitor.failures = [_failure_row(f) for f in tried.failures]  # shown meanwhile
            ready = _one_source(ready, reused)
            if not self._fetch_from(source, entry, todo, ready, monitor, tried):
                continue
            problem = self._split_set_problem(entry, ready)
            if problem is not None:
                tried.failures.append(SourceFailure(source.label, "integrity", problem))
                log.info("%s: %s: %s [integrity]", entry.id, source.label, problem)
                continue
            record = self._publish(entry, todo, ready, source, monitor, tried)
            if record is None:
                continue
            log.info(
                "%s: installed from %s at %s%s",
                entry.id,
                source.label,
                self.store.file_path(entry.id, record.files[0].filename),
                _fallback_note(tried.failures),
            )
            return self._finish(entry, record, monitor, source.label)
        if tried.disk_errors:  # no source fitted: the disk is what the user must act on (exit 5)
            raise tried.disk_errors[0]
        raise ModelDownloadError(entry.id, tried.failures)

    def _check_space(self, entry: ModelEntry, todo: list[ModelFile]) -> None:
        store = self.store
        needed = sum(
            max((f.expected_size or 0) - store.partial_bytes(entry.id, f.filename), 0) for f in todo
        )
        free = store.free_bytes(entry.id)
        if needed > free:
            raise InsufficientDiskSpaceError(store.model_dir(entry.id), needed, free)

    def _fetch_from(
        self,
        source: Source,
        entry: ModelEntry,
        todo: list[ModelFile],
        ready: dict[str, Any],
        monitor: Monitor,
        tried: _Tried,
    ) -> bool:
        """Fetch every file not yet `ready` from `source`; False (the cause noted) if it fails."""
        try:
            for i, f in enumerate(todo):
                if f.filename not in ready:
                    rest = sum((g.expected_size or 0) for g in todo[i + 1 :])
                    ready[f.filename] = self._fetch_file(source, entry, f, rest, monitor, tried)
            return True
        except SourceError as exc:
            # INFO: the next source may well succeed. If none does, ModelDownloadError
            # carries every cause to the caller, who decides how loud to be.
            tried.failures.append(exc.failure)
            log.info("%s: %s [%s]", entry.id, exc.failure, exc.failure.kind)
        except DownloadStalledError as exc:
            tried.failures.append(SourceFailure(exc.source, "stalled", str(exc)))
            log.info("%s: %s [stalled]", entry.id, exc)
        except InsufficientDiskSpaceError as exc:
            # The size behind this may be one only this server stated (a lying one can claim
            # a petabyte): it is this source's failure, and the next source may fit. When
            # no source succeeds, the disk error itself is raised.
            tried.disk_errors.append(exc)
            tried.failures.append(SourceFailure(source.label, "disk", str(exc)))
            log.info("%s: %s: %s [disk]", entry.id, source.label, exc)
        return False

    def _fetch_file(
        self,
        source: Source,
        entry: ModelEntry,
        f: ModelFile,
        rest: int,
        monitor: Monitor,
        tried: _Tried,
    ) -> Fetched:
        """One file from `source` into a partial of its own (resuming one the rules allow); the
        main file's architecture is checked before its weights (`archcheck`)."""
        from .download import can_resume

        monitor.stage("resolving", source=source.label, filename=f.filename)
        remote = source.locate(entry, f)
        if f.filename == entry.filename and not tried.arch_checked:
            tried.arch_checked = self._check_architecture(entry, f, remote)
        size = remote.size if remote.size is not None else f.expected_size
        monitor.file_started(f.filename, remote.source, size, rest)
        partial = self.store.claim_partial(
            entry.id,
            f.filename,
            self._stale_after(),
            accept=lambda meta: can_resume(meta, remote, f),
        )
        exact = remote.size if remote.size is not None else f.size_bytes
        filling = Filling(partial, exact, f.sha256 or remote.sha256)
        with _filling(self._shared, entry.id, f.filename, filling):
            fetched = self._get_downloader().fetch(remote, partial, f, monitor.bytes)
            filling.proven.set()
        monitor.file_done(fetched.size)
        return fetched

    def _publish(
        self,
        entry: ModelEntry,
        todo: list[ModelFile],
        ready: dict[str, Any],
        source: Source,
        monitor: Monitor,
        tried: _Tried,
    ) -> InstallRecord | None:
        """Install the verified files (with the revision `source` pinned); None (the cause
        noted, `ready` emptied) when they were removed before the rename."""
        monitor.stage("verifying")
        store, label = self.store, source.label
        if store.lookup(entry.id, entry) is None:  # else another writer won the race
            picked = [(f.filename, ready[f.filename]) for f in todo]
            files = [(Path(r.path), name, r.size, r.sha256) for name, r in picked]
            try:
                order = [f.filename for f in entry.files]
                store.publish(entry.id, files, label, order=order, revision=source.pinned)
            except FileNotFoundError as exc:  # removed by hand before the rename
                message = f"downloaded files were removed before install ({exc.filename})"
                tried.failures.append(SourceFailure(label, "disk", message))
                log.info("%s: %s: %s [disk]", entry.id, label, message)
                ready.clear()
                return None
        else:
            for fetched in ready.values():
                Path(fetched.path).unlink(missing_ok=True)
        record = store.lookup(entry.id, entry)
        if record is None:
            failure = SourceFailure(label, "integrity", "installed files changed during install")
            raise ModelDownloadError(entry.id, [failure])
        return record

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
        """One model's status (`_download_status`); an architecture this llama.cpp cannot load
        shows as an error."""
        shown = self._download_status(model_id)
        why = self.unusable(model_id) if shown.status != "downloading" else None
        return shown if why is None else replace(shown, status="error", error_message=why)

    def _download_status(self, model_id: str) -> ModelStatus:
        """A download of it in this process, else what the store and the status file left by
        the last download say (`status`)."""
        from . import status
        from .progress import read_status_file

        if not is_valid_id(model_id):
            raise InvalidModelIdError(model_id)
        flight = self._shared.flights.get(model_id)
        if flight is not None:
            return status.from_event(
                flight.monitor.event, os.getpid(), tuple(flight.monitor.failures)
            )
        found = self.installed(model_id)
        data = read_status_file(self.store.status_path(model_id))
        if found is not None:
            return status.installed(model_id, found.paths, data, architecture(found.path))
        damage = self.store.damage(model_id)
        if damage is not None:
            return status.error(
                model_id, f"damaged: {damage}; `llmlb-node pull {model_id}` downloads it again"
            )
        entry = self.catalog.find(model_id)
        other = self.store.foreign(model_id, entry) if entry is not None else None
        if other is not None:
            return status.error(
                model_id, f"{FOREIGN}: {other}; `llmlb-node pull {model_id}` replaces it"
            )
        recorded = status.from_status_file(data, self._stale_after()) if data else None
        if recorded is not None:
            return recorded
        return status.missing(model_id, entry.total_size if entry is not None else None)


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


def _why_gone(data: dict[str, Any], stale_after: float) -> str | None:
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


def __getattr__(name: str) -> Any:
    """`ModelStatus` lives in `status`, imported only when asked for (the installed path never
    does): ``from llmlb_node.resolver import ModelStatus`` keeps working."""
    if name == "ModelStatus":
        from .status import ModelStatus

        return ModelStatus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
