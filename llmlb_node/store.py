"""The local model store: layout, install records, partial files and the atomic install.

Layout (ids never start with '.', so bookkeeping cannot collide with a model)::

    <models>/<id>/<filename>                       the model files, under their own names
    <models>/<id>/.<name>.<token>.partial          a download in progress (or interrupted)
    <models>/.llmlb/<id>/install.json              the install record: what was verified
    <models>/.llmlb/<id>/lock, status.json         cross-process lock and live download status
    <models>/.llmlb/<id>/partials/<partial>.json   how far each partial file got, and against what
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .catalog import ModelEntry, check_id, is_valid_id
from .errors import CatalogError
from .gguf import MAGIC as GGUF_MAGIC

log = logging.getLogger(__name__)

META_DIR = ".llmlb"
RECORD = "install.json"
MANUAL_FILENAME = "model.gguf"  # the llmlb convention for a model placed by hand


@dataclass(frozen=True)
class InstalledFile:
    filename: str
    size: int
    sha256: str | None
    mtime_ns: int


@dataclass(frozen=True)
class InstallRecord:
    """What the store knows about an installed model: the files it verified and where from."""

    model_id: str
    files: tuple[InstalledFile, ...]
    source: str
    installed_at: float

    def to_json(self) -> str:
        data = asdict(self)
        data["version"] = 1
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> InstallRecord:
        data = json.loads(text)
        return cls(
            model_id=data["model_id"],
            files=tuple(InstalledFile(**f) for f in data["files"]),
            source=data.get("source", "unknown"),
            installed_at=data.get("installed_at", 0.0),
        )


@dataclass
class Partial:
    """A temporary file being (or having been) downloaded, with its progress sidecar."""

    path: Path
    meta_path: Path
    meta: dict[str, Any]

    def save(self) -> None:
        self.meta.update(pid=os.getpid(), host=hostname(), updated_at=time.time())
        write_atomic(self.meta_path, json.dumps(self.meta).encode(), fsync=False)

    def discard(self) -> None:
        for p in (self.path, self.meta_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


class ModelStore:
    """The directory tree of installed models (``LLMLB_MODELS_DIR``)."""

    def __init__(self, models_dir: str | os.PathLike[str]) -> None:
        self.root = Path(models_dir)
        self._root = str(self.root)

    # -- layout ---------------------------------------------------------------------------
    def model_dir(self, model_id: str) -> Path:
        check_id(model_id)
        return self.root / model_id

    def meta_dir(self, model_id: str) -> Path:
        check_id(model_id)
        return self.root / META_DIR / model_id

    def lock_path(self, model_id: str) -> Path:
        return self.meta_dir(model_id) / "lock"

    def status_path(self, model_id: str) -> Path:
        return self.meta_dir(model_id) / "status.json"

    def record_path(self, model_id: str) -> Path:
        return self.meta_dir(model_id) / RECORD

    def file_path(self, model_id: str, filename: str) -> Path:
        """Where `filename` of `model_id` is installed; never outside the model's directory."""
        base = self.model_dir(model_id)
        path = base / filename
        resolved = os.path.normpath(path)
        if not resolved.startswith(os.path.normpath(base) + os.sep):
            raise CatalogError(f"file {filename!r} of {model_id!r} would leave {base}")
        return path

    # -- the fast path --------------------------------------------------------------------
    def lookup(self, model_id: str, entry: ModelEntry | None = None) -> InstallRecord | None:
        """The install record if every file it lists is on disk unchanged, else None.

        This is the cached-resolve path: one small read and one stat per file, no hashing.
        """
        record = self.read_record(model_id)
        if record is None or not record.files:
            return None
        if entry is not None and not _record_matches_entry(record, entry):
            return None
        base = os.path.join(self._root, model_id)
        for f in record.files:
            try:
                st = os.stat(os.path.join(base, f.filename))
            except OSError:
                return None
            if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
                return None
        return record

    def read_record(self, model_id: str) -> InstallRecord | None:
        try:
            with open(os.path.join(self._root, META_DIR, model_id, RECORD), "rb") as fh:
                return InstallRecord.from_json(fh.read())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def verified_files(self, model_id: str, entry: ModelEntry) -> set[str]:
        """Files of `entry` already on disk as the last record says (an install cut short)."""
        record = self.read_record(model_id)
        if record is None:
            return set()
        wanted = {f.filename: f for f in entry.files}
        done = set()
        for f in record.files:
            spec = wanted.get(f.filename)
            if spec is None or (spec.sha256 and spec.sha256 != f.sha256):
                continue
            try:
                st = self.file_path(model_id, f.filename).stat()
            except OSError:
                continue
            if st.st_size == f.size and st.st_mtime_ns == f.mtime_ns:
                done.add(f.filename)
        return done

    def adopt_manual(self, model_id: str) -> InstallRecord | None:
        """Accept ``<models>/<id>/model.gguf`` placed by hand, once it passes the magic check."""
        path = os.path.join(self._root, model_id, MANUAL_FILENAME)
        try:
            with open(path, "rb") as fh:
                magic = fh.read(4)
            st = os.stat(path)
        except OSError:
            return None
        if magic != GGUF_MAGIC:
            log.warning("%s does not start with the GGUF magic; ignoring it", path)
            return None
        record = InstallRecord(
            model_id=model_id,
            files=(InstalledFile(MANUAL_FILENAME, st.st_size, None, st.st_mtime_ns),),
            source="manual",
            installed_at=time.time(),
        )
        try:
            self._write_record(record)
        except OSError as exc:  # a read-only store still serves the file
            log.debug("could not record the manual install of %s: %s", model_id, exc)
        return record

    # -- partial files --------------------------------------------------------------------
    def new_partial(self, model_id: str, filename: str) -> Partial:
        final = self.file_path(model_id, filename)
        final.parent.mkdir(parents=True, exist_ok=True)
        name = f".{final.name}.{os.urandom(6).hex()}.partial"
        path = final.parent / name
        meta_path = self._partials_dir(model_id) / f"{_flat(filename)}.{name}.json"
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        partial = Partial(path, meta_path, {"filename": filename})
        # The writer's mark (pid, host, time) exists before the file does, so no other process
        # ever sees this partial unowned and claims it (or clears it) from under us.
        partial.save()
        path.touch()
        return partial

    def claim_partial(
        self,
        model_id: str,
        filename: str,
        stale_after: float,
        accept: Callable[[dict[str, Any]], bool] = lambda meta: True,
    ) -> Partial:
        """Take over the most advanced interrupted partial of `filename` that `accept`s, or
        start a new one.

        Claiming is an atomic rename, so two processes can never write into the same partial
        even where file locks silently do nothing. Partials not accepted are left alone (another
        source may resume them); `publish` clears them once the file is installed.
        """
        final = self.file_path(model_id, filename)
        pdir = self._partials_dir(model_id)
        candidates: list[tuple[int, Path, Path, dict[str, Any]]] = []
        if final.parent.is_dir():
            for path in final.parent.glob(_partial_glob(final.name)):
                meta_path = pdir / f"{_flat(filename)}.{path.name}.json"
                meta = read_json(meta_path) or {}
                if _owned_by_live_writer(meta, stale_after) or not accept(meta):
                    continue
                done = sum(int(s[2]) - int(s[0]) for s in meta.get("segments", []))
                candidates.append((done, path, meta_path, meta))
        candidates.sort(key=lambda c: c[0], reverse=True)
        fresh = self.new_partial(model_id, filename)
        for _, path, meta_path, meta in candidates:
            try:
                os.replace(path, fresh.path)
            except FileNotFoundError:
                continue  # another process claimed it first
            with contextlib.suppress(FileNotFoundError):
                meta_path.unlink()
            fresh.meta = {**meta, "filename": filename}
            fresh.save()  # the progress travels with the bytes, under our name
            return fresh
        return fresh

    def partial_bytes(self, model_id: str, filename: str) -> int:
        """Bytes already downloaded into resumable partials of `filename` (for the disk check)."""
        pdir = self._partials_dir(model_id)
        best = 0
        for meta_path in pdir.glob(_sidecar_glob(filename)) if pdir.is_dir() else ():
            meta = read_json(meta_path) or {}
            best = max(best, sum(int(s[2]) - int(s[0]) for s in meta.get("segments", [])))
        return best

    def _partials_dir(self, model_id: str) -> Path:
        return self.meta_dir(model_id) / "partials"

    # -- installing -----------------------------------------------------------------------
    def publish(
        self,
        model_id: str,
        files: Sequence[tuple[Path, str, int, str | None]],
        source: str,
        order: Sequence[str] = (),
    ) -> InstallRecord:
        """Move verified temporary files into place and record them.

        `files` holds (temporary path, filename, size, sha256). The record is written before the
        renames and names each file's mtime (a rename keeps it), so a process killed at any
        moment leaves either no file at the final path or one the record vouches for.
        """
        previous = self.read_record(model_id)
        kept = {f.filename: f for f in previous.files} if previous else {}
        entries: list[InstalledFile] = []
        for tmp, filename, _size, sha in files:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            entries.append(InstalledFile(filename, st.st_size, sha, st.st_mtime_ns))
        fresh = {e.filename for e in entries}
        all_files = tuple(entries) + tuple(f for n, f in kept.items() if n not in fresh)
        rank = {name: i for i, name in enumerate(order or [name for _, name, _, _ in files])}
        record = InstallRecord(
            model_id=model_id,
            files=tuple(sorted(all_files, key=lambda f: rank.get(f.filename, len(rank)))),
            source=source,
            installed_at=time.time(),
        )
        self._write_record(record)
        for tmp, filename, _, _ in files:
            final = self.file_path(model_id, filename)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            self._clear_partials(model_id, filename)
        return record

    def _clear_partials(self, model_id: str, filename: str) -> None:
        """Remove leftover partials of an installed file: they can never be needed again."""
        final = self.file_path(model_id, filename)
        pdir = self._partials_dir(model_id)
        for path in final.parent.glob(_partial_glob(final.name)):
            meta = read_json(pdir / f"{_flat(filename)}.{path.name}.json") or {}
            if not _owned_by_live_writer(meta, stale_after=float("inf")):
                path.unlink(missing_ok=True)
        for sidecar in pdir.glob(_sidecar_glob(filename)) if pdir.is_dir() else ():
            if not (final.parent / sidecar.name[len(_flat(filename)) + 1 : -5]).exists():
                sidecar.unlink(missing_ok=True)

    def _write_record(self, record: InstallRecord) -> None:
        path = self.record_path(record.model_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, record.to_json().encode(), fsync=True)

    # -- listing and removal --------------------------------------------------------------
    def installed_ids(self) -> list[str]:
        ids = set()
        meta_root = self.root / META_DIR
        for base in (self.root, meta_root):
            if base.is_dir():
                ids.update(p.name for p in base.iterdir() if not p.name.startswith("."))
        # A directory whose name is not a valid id (e.g. "My Model") is not a model of ours.
        return sorted(i for i in ids if is_valid_id(i) and (self.lookup(i) or self.adopt_manual(i)))

    def remove(self, model_id: str) -> bool:
        """Delete the model's files, record and partials. True if anything was there."""
        found = False
        model_dir = self.model_dir(model_id)
        if model_dir.exists():
            shutil.rmtree(model_dir)
            found = True
        meta = self.meta_dir(model_id)
        if meta.is_dir():
            for child in meta.iterdir():
                if child.name == "lock":  # others may hold it; removing it would break exclusion
                    continue
                found = found or child.name == RECORD
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        return found

    def free_bytes(self, model_id: str) -> int:
        """Free bytes on the filesystem that holds (or will hold) the model."""
        path = self.model_dir(model_id)
        while not path.exists() and path != path.parent:
            path = path.parent
        return shutil.disk_usage(path).free


def _record_matches_entry(record: InstallRecord, entry: ModelEntry) -> bool:
    if record.source == "manual":
        return True
    by_name = {f.filename: f for f in record.files}
    for spec in entry.files:
        got = by_name.get(spec.filename)
        if got is None or (spec.sha256 and got.sha256 and spec.sha256 != got.sha256):
            return False
    return record.files[0].filename == entry.files[0].filename


def _owned_by_live_writer(meta: dict[str, Any], stale_after: float) -> bool:
    pid, host, updated = meta.get("pid"), meta.get("host"), meta.get("updated_at", 0)
    if not pid or pid == os.getpid():
        return False
    if host == hostname() and not pid_alive(int(pid)):
        return False
    return time.time() - float(updated) < stale_after


def hostname() -> str:
    """This machine's name, as status files and partial sidecars record it."""
    try:
        return os.uname().nodename
    except AttributeError:  # Windows
        import socket

        return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flat(filename: str) -> str:
    return filename.replace("/", "__")


def _partial_glob(name: str) -> str:
    """Glob for the partials of the file `name` (escaped: names may hold '[', '*' or '?')."""
    return f".{glob.escape(name)}.*.partial"


def _sidecar_glob(filename: str) -> str:
    return f"{glob.escape(_flat(filename))}.*.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON object from `path`, or None if it is missing, torn or not an object."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_atomic(path: Path, data: bytes, *, fsync: bool) -> None:
    """Replace `path` with `data` in one step: readers see the old or the new, never a part."""
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
