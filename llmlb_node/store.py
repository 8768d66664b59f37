"""The local model store: layout, install records, partial files and the atomic install.

Layout (ids never start with '.', so bookkeeping cannot collide with a model)::

    <models>/<id>/<filename>                       the model files, under their own names
    <models>/<id>/.<name>.<token>.partial          a download in progress (or interrupted)
    <models>/.llmlb/<id>/install.json              the install record: what was verified
    <models>/.llmlb/<id>/lock, status.json         cross-process lock and live download status
    <models>/.llmlb/<id>/partials/<key>.<token>.json   how far each partial got, against what
                                                   (key: a hash of the filename: short names)

Bookkeeping files are checked field by field when read: a malformed one is treated as absent.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .catalog import ModelEntry, ModelFile, check_id, is_valid_id
from .errors import CatalogError

log = logging.getLogger(__name__)

META_DIR = ".llmlb"
RECORD = "install.json"
MANUAL_FILENAME = "model.gguf"  # the llmlb convention for a model placed by hand
FOREIGN = "installed for another catalog entry"  # what status says of `ModelStore.foreign`


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
    revision: str | None = None
    """The commit every file came from, when the source pinned one (the Hub's X-Repo-Commit)."""

    def to_json(self) -> str:
        data = asdict(self)
        data["version"] = 1
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> InstallRecord:
        """Parse a record; ValueError saying what is wrong unless every field has its type."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        files = data.get("files")
        if not isinstance(data.get("model_id"), str):
            raise ValueError(f"model_id is {data.get('model_id')!r}")
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            raise ValueError(f"files is {files!r}")
        source, installed_at = data.get("source", "unknown"), data.get("installed_at", 0.0)
        if not isinstance(source, str) or not is_number(installed_at):
            raise ValueError(f"source {source!r} or installed_at {installed_at!r}")
        revision = data.get("revision")
        if not (revision is None or isinstance(revision, str)):
            raise ValueError(f"revision is {revision!r}")
        files_ = tuple(_installed_file(f) for f in files)
        return cls(data["model_id"], files_, source, installed_at, revision)


def _installed_file(data: dict[str, Any]) -> InstalledFile:
    name, size, sha, mtime = (data.get(k) for k in ("filename", "size", "sha256", "mtime_ns"))
    if not (isinstance(name, str) and name and is_count(size) and _is_int(mtime)):
        raise ValueError(f"file entry {data!r}")
    if not (sha is None or isinstance(sha, str)):
        raise ValueError(f"sha256 is {sha!r}")
    return InstalledFile(name, size, sha, mtime)


@dataclass
class Partial:
    """A temporary file being (or having been) downloaded, with its progress sidecar."""

    path: Path
    meta_path: Path
    meta: dict[str, Any]
    verified: int = field(default=0, compare=False)
    """Bytes at the start of the file written and hashed in order, kept in memory by the
    downloader while it runs: what a reader may serve before the download ends (a node feeding
    another); the whole file is checked against its sha256 only at the end."""
    generation: int = field(default=0, compare=False)
    """Bumped before the downloader overwrites bytes it held (a restart, a server that ignored
    Range) or the file is discarded: a reader that served bytes of an older generation must
    not go on with this one's (that would splice two versions)."""

    def save(self, durable: bool = False) -> None:
        """Write the sidecar; `durable` waits until it is on disk (it vouches for bytes)."""
        self.meta.update(pid=os.getpid(), host=hostname(), updated_at=time.time())
        data = json.dumps(self.meta).encode()
        try:
            write_atomic(self.meta_path, data, fsync=durable)
        except FileNotFoundError:  # its directory was removed under us (by hand)
            self.meta_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.meta_path, data, fsync=durable)

    @property
    def done(self) -> int:
        """Bytes the sidecar says are downloaded."""
        return sum(s[2] - s[0] for s in self.meta.get("segments", []))

    def discard(self) -> None:
        self.generation += 1
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
        if entry is not None and entry_mismatch(record, entry) is not None:
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
        """The install record, or None if there is none or it is malformed (logged once)."""
        path = os.path.join(self._root, META_DIR, model_id, RECORD)
        try:
            with open(path, "rb") as fh:
                text = fh.read()
        except OSError:
            return None
        try:
            return InstallRecord.from_json(text)
        except ValueError as exc:  # json's errors included
            report_malformed(path, str(exc))
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
            if spec is None or _file_mismatch(spec, f) is not None:
                continue
            try:
                st = self.file_path(model_id, f.filename).stat()
            except OSError:
                continue
            if st.st_size == f.size and st.st_mtime_ns == f.mtime_ns:
                done.add(f.filename)
        return done

    def adopt_manual(self, model_id: str, entry: ModelEntry | None = None) -> InstallRecord | None:
        """Accept ``<models>/<id>/model.gguf`` placed by hand once it is a whole GGUF (its header
        parses and the file holds the data it declares) and, when the catalog gives this file a
        sha256, hashes to it. Costs a header read, plus a hash when there is a sha256: it runs
        only when no install record vouches for the file as it is on disk."""
        path = os.path.join(self._root, model_id, MANUAL_FILENAME)
        try:
            st = os.stat(path)
        except OSError:
            return None
        from .gguf import GGUFError, check_complete  # not at import: the cached resolve needs none

        try:
            check_complete(path, name=f"{model_id}/{MANUAL_FILENAME}")
            want = _manual_sha256(entry)
            digest = sha256_file(path) if want else None
        except OSError:
            return None
        except GGUFError as exc:
            log.warning("%s; not using it (`llmlb-node pull %s` replaces it)", exc, model_id)
            return None
        if want and digest != want:
            log.warning(
                "%s: sha256 %s does not match the catalog's %s; not using it "
                "(`llmlb-node pull %s` replaces it)",
                path,
                digest,
                want,
                model_id,
            )
            return None
        record = InstallRecord(
            model_id=model_id,
            files=(InstalledFile(MANUAL_FILENAME, st.st_size, digest, st.st_mtime_ns),),
            source="manual",
            installed_at=time.time(),
        )
        try:
            self._write_record(record)
        except OSError as exc:  # a read-only store still serves the file
            log.debug("could not record the manual install of %s: %s", model_id, exc)
        return record

    def damage(self, model_id: str) -> str | None:
        """What changed under an install record whose files no longer match it, or None."""
        record = self.read_record(model_id)
        for f in record.files if record else ():
            try:
                st = os.stat(os.path.join(self._root, model_id, f.filename))
            except OSError:
                return f"{f.filename} is missing"
            if st.st_size != f.size:
                return f"{f.filename} is {st.st_size} bytes, {f.size} when it was verified"
            if st.st_mtime_ns != f.mtime_ns:
                return f"{f.filename} was modified after it was verified"
        return None

    def foreign(self, model_id: str, entry: ModelEntry) -> str | None:
        """Why the intact install on disk is not one of `entry` (it was made for another catalog
        entry of that id: another sha256, size or file), or None."""
        record = self.read_record(model_id)
        if record is None or not record.files or self.damage(model_id) is not None:
            return None
        return entry_mismatch(record, entry)

    # -- partial files --------------------------------------------------------------------
    def new_partial(self, model_id: str, filename: str) -> Partial:
        final = self.file_path(model_id, filename)
        final.parent.mkdir(parents=True, exist_ok=True)
        name = f".{final.name}.{os.urandom(6).hex()}.partial"
        path = final.parent / name
        meta_path = self._sidecar_path(model_id, filename, name)
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
        candidates: list[tuple[int, Path, Path, dict[str, Any]]] = []
        if final.parent.is_dir():
            for path in final.parent.glob(_partial_glob(final.name)):
                meta_path = self._sidecar_path(model_id, filename, path.name)
                meta = read_sidecar(meta_path) or {}
                if _owned_by_live_writer(meta, stale_after) or not accept(meta):
                    continue
                candidates.append((_done(meta), path, meta_path, meta))
        candidates.sort(key=lambda c: c[0], reverse=True)
        fresh = self.new_partial(model_id, filename)
        for _, path, meta_path, meta in candidates:
            if not _take_over(path, fresh.path, meta):
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
            best = max(best, _done(read_sidecar(meta_path) or {}))
        return best

    def _partials_dir(self, model_id: str) -> Path:
        return self.meta_dir(model_id) / "partials"

    def _sidecar_path(self, model_id: str, filename: str, partial_name: str) -> Path:
        """The sidecar of a partial: named by a hash of the filename and the partial's token,
        so a 200-character filename still gives a name well under 255 bytes."""
        token = partial_name.removesuffix(".partial").rpartition(".")[2]
        return self._partials_dir(model_id) / f"{_file_key(filename)}.{token}.json"

    # -- installing -----------------------------------------------------------------------
    def publish(
        self,
        model_id: str,
        files: Sequence[tuple[Path, str, int, str | None]],
        source: str,
        order: Sequence[str] = (),
        revision: str | None = None,
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
            revision=revision,
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
            meta = read_sidecar(self._sidecar_path(model_id, filename, path.name)) or {}
            if not _owned_by_live_writer(meta, stale_after=float("inf")):
                path.unlink(missing_ok=True)
        key = _file_key(filename)
        for sidecar in pdir.glob(_sidecar_glob(filename)) if pdir.is_dir() else ():
            token = sidecar.name[len(key) + 1 : -len(".json")]
            if not (final.parent / f".{final.name}.{token}.partial").exists():
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
        import shutil  # not at import: it loads bz2 and lzma

        found = False
        model_dir = self.model_dir(model_id)
        if model_dir.is_symlink():  # a directory kept elsewhere: remove the link, not its target
            model_dir.unlink()
            found = True
        elif model_dir.exists():
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

    def prune_empty(self, model_id: str) -> None:
        """Remove the model's directory (and empty subfolders) if it holds no file at all:
        a failed download leaves nothing behind but its partials, which are kept."""
        model_dir = self.model_dir(model_id)
        if not model_dir.is_dir() or model_dir.is_symlink():
            return
        for sub in sorted(model_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if sub.is_dir() and not sub.is_symlink():
                with contextlib.suppress(OSError):
                    sub.rmdir()  # only if empty
        with contextlib.suppress(OSError):
            model_dir.rmdir()

    def free_bytes(self, model_id: str) -> int:
        """Free bytes on the filesystem that holds (or will hold) the model."""
        import shutil  # not at import: it loads bz2 and lzma

        path = self.model_dir(model_id)
        while not path.exists() and path != path.parent:
            path = path.parent
        return shutil.disk_usage(path).free


def entry_mismatch(record: InstallRecord, entry: ModelEntry) -> str | None:
    """Why `record` is not an install of `entry`, or None. Every identity the entry states must
    agree with what was verified: its main file's name, and each file's exact size and sha256
    (a store shared by two catalogs holds one model under one id: the other's is not it)."""
    if record.source == "manual":
        spec = next((f for f in entry.files if f.filename == MANUAL_FILENAME), None)
        return None if spec is None else _file_mismatch(spec, record.files[0])
    if record.files[0].filename != entry.files[0].filename:
        return f"its main file is {record.files[0].filename}, not {entry.files[0].filename}"
    by_name = {f.filename: f for f in record.files}
    for spec in entry.files:
        got = by_name.get(spec.filename)
        problem = f"{spec.filename} is not part of it" if got is None else _file_mismatch(spec, got)
        if problem is not None:
            return problem
    return None


def _file_mismatch(spec: ModelFile, got: InstalledFile) -> str | None:
    if spec.size_bytes is not None and spec.size_bytes != got.size:
        return f"{got.filename} is {got.size} bytes, this entry says {spec.size_bytes}"
    if spec.sha256 and spec.sha256 != got.sha256:
        held = got.sha256 or "(not recorded)"
        return f"{got.filename} has sha256 {held}, this entry says {spec.sha256}"
    return None


def _manual_sha256(entry: ModelEntry | None) -> str | None:
    """The sha256 the catalog gives a file named like the hand-placed convention, if any."""
    for f in entry.files if entry is not None else ():
        if f.filename == MANUAL_FILENAME:
            return f.sha256
    return None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read 4 MiB at a time."""
    import hashlib  # not at import: a cached resolve never hashes

    digest = hashlib.sha256()
    buf = bytearray(4 * 1024 * 1024)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _owned_by_live_writer(meta: dict[str, Any], stale_after: float) -> bool:
    """Whether another process may still write into the partial: on this host, while its pid
    lives, whatever its heartbeat (a SIGSTOPped writer goes on when continued); on another
    host, while its heartbeat is fresh."""
    pid, host, updated = meta.get("pid"), meta.get("host"), meta.get("updated_at") or 0
    if not pid or (pid == os.getpid() and host == hostname()):
        return False
    if host == hostname():
        return pid_alive(pid)
    return time.time() - updated < stale_after


def _take_over(path: Path, into: Path, meta: dict[str, Any]) -> bool:
    """Put an unowned partial's bytes under our own name; False if another claimed it first.

    Renamed when its writer was of this host (provably gone); copied when it was another
    host's, which may live on and write into the file it holds: never into ours."""
    import shutil  # not at import: it loads bz2 and lzma

    try:
        if meta.get("host") not in (None, hostname()):
            shutil.copyfile(path, into)
            path.unlink()
        else:
            os.replace(path, into)
    except FileNotFoundError:
        return False
    return True


def _done(meta: dict[str, Any]) -> int:
    return sum(s[2] - s[0] for s in meta.get("segments", []))


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


def _file_key(filename: str) -> str:
    import hashlib

    return hashlib.sha256(filename.encode()).hexdigest()[:24]


def _partial_glob(name: str) -> str:
    """Glob for the partials of the file `name` (escaped: names may hold '[', '*' or '?')."""
    return f".{glob.escape(name)}.*.partial"


def _sidecar_glob(filename: str) -> str:
    return f"{_file_key(filename)}.*.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON object from `path`, or None if it is missing, torn or not an object."""
    try:
        text = path.read_bytes()
    except OSError:
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        report_malformed(path, f"not JSON: {exc}")
        return None
    if not isinstance(data, dict):
        report_malformed(path, "not a JSON object")
        return None
    return data


_REPORTED: set[str] = set()


def report_malformed(path: os.PathLike[str] | str, problem: str) -> None:
    """Log, once per path and process, that a bookkeeping file is ignored and why."""
    key = os.fspath(path)
    if key not in _REPORTED:
        _REPORTED.add(key)
        log.warning("ignoring malformed %s (%s); treating it as absent", key, problem)


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """A partial's progress sidecar, or None if missing or malformed (never trusted half-way)."""
    meta = read_json(path)
    if meta is None:
        return None
    problem = sidecar_problem(meta)
    if problem is not None:
        report_malformed(path, problem)
        return None
    return meta


def sidecar_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a sidecar's known fields, or None (unknown fields are left alone)."""
    for key, ok in (
        ("filename", _opt(str)),
        ("size", _opt_count),
        ("validator", _opt(str)),
        ("source", _opt(str)),
        ("url_host", _opt(str)),
        ("host", _opt(str)),
        ("pid", optional_pid),
        ("updated_at", optional_time),
    ):
        if key in meta and not ok(meta[key]):
            return f"{key} is {meta[key]!r}"
    segments = meta.get("segments", [])
    if not isinstance(segments, list):
        return f"segments is {segments!r}"
    size = meta.get("size")
    for seg in segments:
        if not (isinstance(seg, list) and len(seg) == 3 and all(_is_int(x) for x in seg)):
            return f"segment {seg!r} is not [start, end, done]"
        start, end, done = seg
        if not (0 <= start <= done and (end == -1 or done <= end)):
            return f"segment {seg!r} is out of order"
        if size is not None and max(end, done) > size:
            return f"segment {seg!r} lies beyond size {size}"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value: object) -> bool:
    """A non-negative int (not a bool)."""
    return _is_int(value) and value >= 0  # type: ignore[operator]


def is_number(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _opt(kind: type) -> Callable[[object], bool]:
    return lambda value: value is None or isinstance(value, kind)


def _opt_count(value: object) -> bool:
    return value is None or is_count(value)


def optional_pid(value: object) -> bool:
    """None or a positive int."""
    return value is None or (_is_int(value) and value > 0)  # type: ignore[operator]


def optional_time(value: object) -> bool:
    """None, or a time not in the future (5 minutes of clock skew allowed): a status claiming
    to be fresh forever would keep others waiting forever."""
    return value is None or (is_number(value) and value < time.time() + 300)  # type: ignore[operator]


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
