"""Reuse model files other tools already downloaded, before any network: the huggingface_hub
cache, Ollama's blobs and LM Studio's folders, matched by sha256 (or by repo and name).

A match is installed by hard link (same file system), else reflink, else copy, and always
verified first: the GGUF's structural check and our own sha256 (both remembered per inode, size
and mtime, so a second install of the same file costs a stat). An odd or unreadable foreign
folder is skipped with a DEBUG line, never an error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .catalog import ModelEntry, ModelFile

if TYPE_CHECKING:
    from .settings import Settings
    from .store import ModelStore

log = logging.getLogger(__name__)

HUGGINGFACE_CACHE, OLLAMA, LM_STUDIO = "huggingface-cache", "ollama", "lm-studio"
_MEMO = ".reuse-verified.json"  # under <models>/.llmlb/ (ids never start with '.')
_MEMO_MAX = 512
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_LMSTUDIO_DEPTH = 3  # folders descended: <models>/<publisher>/<repo>/, one level to spare


@dataclass(frozen=True)
class Candidate:
    """A foreign file that may be the one wanted."""

    path: Path
    kind: str
    """Which tool's store: ``huggingface-cache``, ``ollama`` or ``lm-studio``."""
    sha256: str | None
    """The sha256 the foreign tool's own record gives it (its blob name), if any."""


@dataclass(frozen=True)
class Reused:
    """A verified foreign file placed at a temporary path in the store, ready to publish."""

    path: str
    size: int
    sha256: str
    source: str
    """``reused:<kind>``: what the install record says the file came from."""
    how: str
    """``hardlink``, ``reflink`` or ``copy``."""


def reuse_files(
    store: ModelStore, entry: ModelEntry, files: list[ModelFile], settings: Settings
) -> dict[str, Reused]:
    """The files of `entry` found on disk elsewhere, verified and placed (filename -> Reused)."""
    found: dict[str, Reused] = {}
    if not settings.reuse:
        return found
    for file in files:
        reused = reuse_file(store, entry, file, settings)
        if reused is not None:
            found[file.filename] = reused
    return found


def reuse_file(
    store: ModelStore, entry: ModelEntry, file: ModelFile, settings: Settings
) -> Reused | None:
    """The first candidate for `file` that verifies, placed in the store; else None."""
    for candidate in candidates(entry, file, settings):
        reused = _try(store, entry, file, candidate)
        if reused is not None:
            log.info(
                "%s: %s reused from %s (%s, %s)",
                entry.id,
                file.filename,
                candidate.path,
                candidate.kind,
                reused.how,
            )
            return reused
    return None


# -- finding ------------------------------------------------------------------------------
def candidates(entry: ModelEntry, file: ModelFile, settings: Settings) -> Iterator[Candidate]:
    """Foreign files that may be `file`, in the documented order: the HF cache by sha256,
    Ollama by sha256, LM Studio by size (hashed later), the HF cache by repo and name."""
    sha = file.sha256
    if sha:
        yield from _guarded(HUGGINGFACE_CACHE, _hf_by_sha(settings.hf_cache, sha))
        yield from _guarded(OLLAMA, _ollama_by_sha(settings.ollama_models, sha))
        if file.expected_size:
            for root in settings.lmstudio_dirs:
                yield from _guarded(LM_STUDIO, _lmstudio_by_size(root, file.expected_size))
    for repo, revision in _hub_repos(entry):
        yield from _guarded(HUGGINGFACE_CACHE, _hf_by_name(settings.hf_cache, repo, revision, file))


def _guarded(kind: str, found: Iterator[Candidate]) -> Iterator[Candidate]:
    """`found`, stopping quietly (DEBUG) at the first error reading a foreign folder."""
    try:
        yield from found
    except (OSError, ValueError) as exc:
        log.debug("reuse: skipping the %s folder: %s", kind, exc)


def _hf_by_sha(cache: Path | None, sha: str) -> Iterator[Candidate]:
    if cache is None or not cache.is_dir():
        return
    for repo_dir in sorted(cache.iterdir()):
        if repo_dir.name.startswith("models--"):
            blob = repo_dir / "blobs" / sha
            if blob.is_file():
                yield Candidate(blob, HUGGINGFACE_CACHE, sha)


def _ollama_by_sha(models: Path | None, sha: str) -> Iterator[Candidate]:
    blob = models / "blobs" / f"sha256-{sha}" if models is not None else None
    if blob is not None and blob.is_file():
        yield Candidate(blob, OLLAMA, sha)


def _lmstudio_by_size(root: Path, size: int) -> Iterator[Candidate]:
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root, onerror=_skip_dir):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = (
            sorted(d for d in dirnames if not d.startswith(".")) if depth < _LMSTUDIO_DEPTH else []
        )
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.lower().endswith(".gguf") and _size(path) == size:
                yield Candidate(path, LM_STUDIO, None)


def _skip_dir(exc: OSError) -> None:
    log.debug("reuse: skipping %s: %s", exc.filename, exc.strerror or exc)


def _hf_by_name(
    cache: Path | None, repo: str, revision: str, file: ModelFile
) -> Iterator[Candidate]:
    """The file in the snapshot of `repo` at `revision` (a commit, or a ref the cache's
    ``refs/`` names); its blob's name is the sha256 huggingface_hub recorded."""
    if cache is None:
        return
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    commit = revision
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    snapshot = repo_dir / "snapshots" / commit / file.filename
    if not snapshot.is_file():
        return
    target = Path(os.path.realpath(snapshot))
    named = target.name if len(target.name) == 64 else None
    yield Candidate(target, HUGGINGFACE_CACHE, named)


def _hub_repos(entry: ModelEntry) -> list[tuple[str, str]]:
    """The (repo, revision) pairs the entry's Hub sources name, the entry's own first."""
    pairs = [(entry.repo, entry.revision)]
    for spec in entry.sources:
        if spec.type == "huggingface":
            pairs.append(
                (
                    spec.options.get("repo") or entry.repo,
                    spec.options.get("revision") or entry.revision,
                )
            )
    return list(dict.fromkeys(pairs))


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


# -- placing and verifying ------------------------------------------------------------------
def _try(store: ModelStore, entry: ModelEntry, file: ModelFile, found: Candidate) -> Reused | None:
    want = file.sha256 or found.sha256
    if want is None:
        log.debug("reuse: %s has no sha256 to verify against; not used", found.path)
        return None
    size = _size(found.path)
    if size is None or (file.size_bytes is not None and size != file.size_bytes):
        return None
    final = store.file_path(entry.id, file.filename)
    tmp = final.parent / f".{final.name}.{os.urandom(6).hex()}.reuse"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        how = place(found.path, tmp)
        digest = verified_sha256(store, tmp, file.filename)
    except (OSError, ValueError) as exc:
        log.debug("reuse: %s not used: %s", found.path, exc)
        tmp.unlink(missing_ok=True)
        return None
    if digest != want:
        log.debug("reuse: %s has sha256 %s, not %s; not used", found.path, digest, want)
        tmp.unlink(missing_ok=True)
        return None
    return Reused(str(tmp), size, digest, f"reused:{found.kind}", how)


def place(source: Path, dest: Path) -> str:
    """Put `source`'s bytes at `dest`: a hard link (the other tool deleting its copy leaves
    ours), else a reflink, else a copy; returns which."""
    try:
        os.link(source, dest)
        return "hardlink"
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP):
            raise
    if _reflink(source, dest):
        return "reflink"
    shutil.copyfile(source, dest)
    return "copy"


def _reflink(source: Path, dest: Path) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        return False
    with open(source, "rb") as src, open(dest, "wb") as out:
        try:
            fcntl.ioctl(out.fileno(), _FICLONE, src.fileno())
            return True
        except OSError:
            pass
    dest.unlink(missing_ok=True)
    return False


def verified_sha256(store: ModelStore, path: Path, filename: str) -> str:
    """`path`'s sha256 once it passes the structural check (a GGUF's header and extent): both
    done now, or remembered from an earlier pass over the same inode, size and mtime (the
    memo is written only after both passed)."""
    st = path.stat()
    key = f"{st.st_dev}:{st.st_ino}"
    memo = _read_memo(store)
    hit = memo.get(key)
    if isinstance(hit, list) and hit[:2] == [st.st_size, st.st_mtime_ns]:
        return str(hit[2])
    from .gguf import GGUFError, check_complete
    from .store import sha256_file

    if filename.lower().endswith(".gguf"):
        try:
            check_complete(path, name=filename)
        except GGUFError as exc:
            raise ValueError(str(exc)) from None
    digest = sha256_file(path)
    memo[key] = [st.st_size, st.st_mtime_ns, digest]
    _write_memo(store, dict(list(memo.items())[-_MEMO_MAX:]))
    return digest


def _memo_path(store: ModelStore) -> Path:
    return store.root / ".llmlb" / _MEMO


def _read_memo(store: ModelStore) -> dict[str, object]:
    from .store import read_json

    return read_json(_memo_path(store)) or {}


def _write_memo(store: ModelStore, memo: dict[str, object]) -> None:
    from .store import write_atomic

    path = _memo_path(store)
    with contextlib.suppress(OSError):  # a read-only store only loses the shortcut
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(memo).encode(), fsync=False)
