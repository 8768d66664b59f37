"""Refuse a model whose architecture this llama.cpp does not know, before its weights arrive:
the GGUF's ``general.architecture`` from a bounded read of its first bytes, and llama.cpp's verdict.

The verdict: a name in the architecture table compiled into the llama.cpp library is known (no
import); any other is loaded by llama.cpp itself, in a GGUF of just that name and an empty
vocabulary, with ``vocab_only``: it loads if llama.cpp knows it, and is unknown only if llama.cpp
says "unknown model architecture". Verdicts are kept on disk per
(architecture, llama-cpp-python version). A header this cannot judge is never refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .catalog import ModelEntry, ModelFile
from .errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from .settings import Settings
    from .sources.base import Remote
    from .store import ModelStore

log = logging.getLogger(__name__)

CACHE = ".architectures.json"  # under <models>/.llmlb/ (ids never start with '.')
FIRST_READ = 64 * 1024  # general.architecture is the first key converters write
MAX_READ = 16 * 1024 * 1024
MIN_CHECKED = 64 * 1024 * 1024
"""Smaller files are downloaded whole without a header read first: a refusal would save little,
and the load reports the architecture as before."""
_MAX_REDIRECTS = 5
_UNKNOWN = "unknown model architecture"
_PROBE_LOCK = threading.Lock()
_WARNED: set[tuple[str, str]] = set()
_PARSED: dict[str, tuple[tuple[str, int, int], dict[str, Any]]] = {}
_FILE_ARCH: dict[tuple[str, int, int], str | None] = {}


class CannotJudge(Exception):
    """The header could not be read or judged: the check lets the model through."""


def check(
    entry: ModelEntry, file: ModelFile, remote: Remote, settings: Settings, store: ModelStore
) -> None:
    """Raise `UnsupportedArchitectureError` when `file` (the model's main GGUF, about to be
    fetched from `remote`) has an architecture this llama.cpp does not know."""
    if not file.filename.lower().endswith(".gguf"):
        return
    declared = entry.raw.get("architecture")
    if isinstance(declared, str) and declared:  # the catalog says: no header read
        check_name(entry, declared, store)
        return
    size = remote.size or file.expected_size
    if not remote.parts and (size is None or size < MIN_CHECKED):
        log.debug("%s: %s is small (or of unknown size): its load checks it", entry.id, size)
        return
    try:
        arch = remote_architecture(remote, file, settings)
        known = verdict(arch, store)
    except CannotJudge as exc:
        log.debug("%s: architecture not checked before the download: %s", entry.id, exc)
        return
    sha = file.sha256 or remote.sha256
    if sha:
        remember_file(store, sha, arch)
    if not known:
        raise UnsupportedArchitectureError(entry.id, arch, llama_cpp_version())


def check_name(entry: ModelEntry, arch: str, store: ModelStore) -> None:
    """`check` for an architecture already known by name."""
    try:
        known = verdict(arch, store)
    except CannotJudge as exc:
        log.debug("%s: architecture %r not checked: %s", entry.id, arch, exc)
        return
    if not known:
        raise UnsupportedArchitectureError(entry.id, arch, llama_cpp_version())


def check_local(entry: ModelEntry, path: Path, store: ModelStore) -> None:
    """`check` for a file already on disk (reused from another tool)."""
    try:
        size = os.path.getsize(path)
        arch = _architecture_in(os.open(path, os.O_RDONLY), size)
        known = verdict(arch, store)
    except (CannotJudge, OSError) as exc:
        log.debug("%s: architecture not checked: %s", entry.id, exc)
        return
    if not known:
        raise UnsupportedArchitectureError(entry.id, arch, llama_cpp_version())


# -- the header -------------------------------------------------------------------------------
def remote_architecture(remote: Remote, file: ModelFile, settings: Settings) -> str:
    """``general.architecture`` from the first bytes of the remote file: 64 KiB, then more
    while the key/values run on, never more than 1/16 of the file (nor 16 MiB)."""
    if remote.parts:
        fd = os.open(remote.parts[0], os.O_RDONLY)
        return _architecture_in(fd, os.fstat(fd).st_size)
    if remote.url is None:
        raise CannotJudge("no URL to read the header from")
    size = remote.size or file.size_bytes
    bound = min(MAX_READ, size // 16) if size else FIRST_READ
    want = min(FIRST_READ, bound)
    while True:
        data = _read_prefix(remote, want, settings)
        with tempfile.TemporaryFile() as fh:
            fh.write(data)
            fh.flush()
            try:
                return _architecture_in(os.dup(fh.fileno()), len(data))
            except _Truncated:
                if len(data) < want or want >= bound:
                    raise CannotJudge(f"no architecture in the first {len(data)} bytes") from None
        want = min(want * 8, bound)


class _Truncated(CannotJudge):
    """The bytes read end before the architecture key."""


def _architecture_in(fd: int, available: int) -> str:
    """The architecture in the first `available` bytes at `fd` (closed here)."""
    from .gguf import GGUFError, read_architecture

    try:
        arch = read_architecture(fd, available)
    except GGUFError as exc:
        if "truncated" in str(exc):
            raise _Truncated(str(exc)) from None
        raise CannotJudge(str(exc)) from None
    finally:
        os.close(fd)
    if arch is None:
        raise CannotJudge("the header names no general.architecture")
    return arch


def _read_prefix(remote: Remote, n: int, settings: Settings) -> bytes:
    """Bytes [0, n) of the remote file (``Range``; a server ignoring it is cut off at n).
    Redirects are followed by hand, the credentials riding only where `may_carry_secret`
    allows, and plain http builds no TLS context (tens of milliseconds)."""
    import httpx

    from .origin import may_carry_secret

    url = remote.url
    assert url is not None
    timeout = httpx.Timeout(settings.connect_timeout, read=settings.stall_timeout)
    for _ in range(_MAX_REDIRECTS + 1):
        headers = _headers(n)
        if remote.auth_origin and may_carry_secret(url, remote.auth_origin):
            headers.update(remote.headers)
        try:
            with (
                httpx.Client(timeout=timeout, verify=url.startswith("https:")) as client,
                client.stream("GET", url, headers=headers) as response,
            ):
                location = response.headers.get("location")
                if response.status_code in (301, 302, 303, 307, 308) and location:
                    url = str(httpx.URL(url).join(location))
                    continue
                if response.status_code not in (200, 206):
                    raise CannotJudge(f"HTTP {response.status_code} for the header")
                return _first_bytes(response, n)
        except httpx.HTTPError as exc:
            raise CannotJudge(f"reading the header failed: {exc}") from exc
    raise CannotJudge("too many redirects for the header")


def _headers(n: int) -> dict[str, str]:
    from . import __version__

    return {
        "range": f"bytes=0-{n - 1}",
        "accept-encoding": "identity",
        "user-agent": f"llmlb-node/{__version__}",
    }


def _first_bytes(response: Any, n: int) -> bytes:
    buf = bytearray()
    for chunk in response.iter_raw():
        buf += chunk
        if len(buf) >= n:
            break
    return bytes(buf[:n])


# -- the verdict ------------------------------------------------------------------------------
def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version (its metadata: no import)."""
    from .backend import installed_version

    return installed_version() or "unknown"


def verdict(arch: str, store: ModelStore) -> bool:
    """Whether this llama.cpp knows `arch`: from the on-disk cache, else the library's table
    (a name in it is known), else llama.cpp's own load. `CannotJudge` when neither can run."""
    version = llama_cpp_version()
    cache = _read_cache(store)
    known = cache.get("verdicts", {}).get(version, {}).get(arch)
    if isinstance(known, bool):
        return known
    known = library_knows(arch) or probe(arch)
    cache.setdefault("verdicts", {}).setdefault(version, {})[arch] = known
    _write_cache(store, cache)
    return known


def cached_verdict(arch: str, store: ModelStore) -> bool | None:
    """`verdict` when it costs no llama.cpp load (cache or library table), else None."""
    known = _read_cache(store).get("verdicts", {}).get(llama_cpp_version(), {}).get(arch)
    if isinstance(known, bool):
        return known
    return True if library_knows(arch) else None


def library_knows(arch: str) -> bool:
    """True when `arch` is a C string of the llama.cpp library: every architecture llama.cpp
    supports is named in its table there (a name found there may still be another string, so
    only its presence is taken as an answer)."""
    library = _llama_library()
    if library is None:
        return False
    try:
        return arch.encode() + b"\0" in library.read_bytes()
    except OSError:
        return False


def _llama_library() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    for location in (spec.submodule_search_locations or ()) if spec else ():
        for folder in (Path(location) / "lib", Path(location)):
            found = sorted(folder.glob("libllama.*")) + sorted(folder.glob("llama.*"))
            if found:
                return found[0]
    return None


def probe(arch: str) -> bool:
    """llama.cpp's own answer: load, with ``vocab_only``, a GGUF holding only
    ``general.architecture = arch`` and an empty vocabulary (``no_vocab``). A known
    architecture loads; an unknown one fails, llama.cpp saying "unknown model architecture".
    Any other failure cannot be judged."""
    try:
        from .llamacpp import import_llama_cpp, native_errors

        llama_cpp = import_llama_cpp()
    except ImportError as exc:
        raise CannotJudge(f"llama-cpp-python cannot be imported: {exc}") from None
    load = getattr(llama_cpp, "llama_model_load_from_file", None) or getattr(
        llama_cpp, "llama_load_model_from_file", None
    )
    free = getattr(llama_cpp, "llama_model_free", None) or getattr(
        llama_cpp, "llama_free_model", None
    )
    if load is None or free is None:
        raise CannotJudge("this llama-cpp-python has no model loading function known here")
    with _PROBE_LOCK, tempfile.TemporaryDirectory(prefix="llmlb-arch-") as tmp:
        path = os.path.join(tmp, "probe.gguf")
        with open(path, "wb") as fh:
            fh.write(_probe_gguf(arch))
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        native_errors()  # earlier errors are not this probe's
        model = load(path.encode(), params)
        if model:
            free(model)
            return True
        why = native_errors()
    log.debug("probe of architecture %r: %s", arch, why or "no error line")
    if _UNKNOWN not in why:
        raise CannotJudge(f"llama.cpp failed to load the probe for another reason: {why!r}")
    return False


def _probe_gguf(arch: str) -> bytes:
    def text(key: str, value: str) -> bytes:
        raw_key, raw = key.encode(), value.encode()
        return b"".join(
            (struct.pack("<Q", len(raw_key)), raw_key, struct.pack("<IQ", 8, len(raw)), raw)
        )

    pairs = text("general.architecture", arch) + text("tokenizer.ggml.model", "no_vocab")
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + pairs


# -- what is known of catalog entries ----------------------------------------------------------
def remember_file(store: ModelStore, sha256: str, arch: str) -> None:
    """Note the architecture of the file with this sha256 (read from its header)."""
    cache = _read_cache(store)
    files = cache.setdefault("files", {})
    if files.get(sha256) != arch:
        files[sha256] = arch
        _write_cache(store, cache)


def entry_architecture(entry: ModelEntry, store: ModelStore) -> str | None:
    """The entry's architecture when known without the network: the catalog's
    ``architecture`` field, else the one noted for its main file's sha256."""
    declared = entry.raw.get("architecture")
    if isinstance(declared, str) and declared:
        return declared
    return _read_cache(store).get("files", {}).get(entry.sha256) if entry.sha256 else None


def file_architecture(path: Path) -> str | None:
    """An installed GGUF's ``general.architecture`` (its header read once per size and mtime)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_ARCH:
        try:
            _FILE_ARCH[key] = _architecture_in(os.open(path, os.O_RDONLY), st.st_size)
        except (CannotJudge, OSError):
            _FILE_ARCH[key] = None
    return _FILE_ARCH[key]


def why_unusable(entry: ModelEntry | None, installed: Path | None, store: ModelStore) -> str | None:
    """Why this llama.cpp cannot load the model (its installed file's architecture, else what
    is known of the entry's), or None; WARNed once per process and model."""
    arch = file_architecture(installed) if installed is not None else None
    if arch is None and entry is not None:
        arch = entry_architecture(entry, store)
    if arch is None:
        return None
    try:
        known = verdict(arch, store)
    except CannotJudge:
        return None
    if known:
        return None
    why = _why(arch)
    model_id = entry.id if entry is not None else str(installed)
    if (model_id, arch) not in _WARNED:
        _WARNED.add((model_id, arch))
        log.warning("%s: unusable on this node: %s", model_id, why)
    return why


def _why(arch: str) -> str:
    return f"architecture {arch!r} is not supported by llama-cpp-python {llama_cpp_version()}"


def _cache_path(store: ModelStore) -> Path:
    return store.root / ".llmlb" / CACHE


def _read_cache(store: ModelStore) -> dict[str, Any]:
    """The cache file, parsed again only when it changed; malformed parts read as empty."""
    path = _cache_path(store)
    try:
        st = path.stat()
    except OSError:
        return {"verdicts": {}, "files": {}}
    stamp = (str(path), st.st_mtime_ns, st.st_size)
    hit = _PARSED.get(stamp[0])
    if hit is not None and hit[0] == stamp:
        return json.loads(json.dumps(hit[1]))  # a copy: callers add to it
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        data = {}
    data = data if isinstance(data, dict) else {}
    verdicts = data.get("verdicts") if isinstance(data.get("verdicts"), dict) else {}
    clean = {
        "verdicts": {v: d for v, d in verdicts.items() if isinstance(d, dict)},
        "files": data.get("files") if isinstance(data.get("files"), dict) else {},
    }
    _PARSED[stamp[0]] = (stamp, clean)
    return json.loads(json.dumps(clean))


def _write_cache(store: ModelStore, data: dict[str, Any]) -> None:
    from .store import write_atomic

    path = _cache_path(store)
    with contextlib.suppress(OSError):  # a read-only store only loses the shortcut
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=1).encode(), fsync=False)
