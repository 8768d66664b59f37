"""supported_models.json: parse, validate, look up.

Loads the public llmlb format unchanged (a JSON list, or ``{"models": [...]}``) plus our optional
extensions: ``sha256``, ``revision``, ``files`` and ``sources``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from .errors import CatalogError, InvalidModelIdError, UnrunnableModelError, UnsupportedModelError

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
PACKAGED_CATALOG = Path(__file__).with_name("supported_models.json")
SOURCE_TYPES = ("huggingface", "url", "python-package")


MAX_ID_LENGTH = 128  # ids name directories: well inside every filesystem's 255-byte limit


def is_valid_id(model_id: str) -> bool:
    """True when `model_id` can name a directory safely (no separators, no '..', not too long)."""
    return (
        isinstance(model_id, str)
        and len(model_id) <= MAX_ID_LENGTH
        and ID_PATTERN.fullmatch(model_id) is not None
    )


def check_id(model_id: str) -> None:
    """Raise `InvalidModelIdError` unless `model_id` is a valid id."""
    if not is_valid_id(model_id):
        raise InvalidModelIdError(model_id)


@dataclass(frozen=True)
class ModelFile:
    """One file of a model, as the catalog describes it."""

    filename: str
    """Path relative to the model's directory (Hub subfolders allowed, never '..')."""
    size_bytes: int | None = None
    """Exact size, when the catalog knows it (``files[].size_bytes``)."""
    sha256: str | None = None
    """Exact sha256 of the file, lowercase hex, when the catalog knows it."""
    approx_size: int | None = None
    """Approximate size (llmlb's ``size_bytes``): for disk precheck and progress only."""

    @property
    def expected_size(self) -> int | None:
        """Best size estimate before the source tells the exact one."""
        return self.size_bytes if self.size_bytes is not None else self.approx_size


@dataclass(frozen=True)
class SourceSpec:
    """One external source of a model, in the order the catalog lists them."""

    type: str
    """``huggingface``, ``url`` or ``python-package``."""
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelEntry:
    """A catalog entry: what the model is and where its bytes come from."""

    id: str
    name: str
    repo: str
    files: tuple[ModelFile, ...]
    sources: tuple[SourceSpec, ...]
    description: str = ""
    revision: str = "main"
    size_bytes: int | None = None
    required_memory_bytes: int | None = None
    format: str = "gguf"
    """llmlb's ``format`` (``gguf`` when the entry does not say)."""
    engine: str = "llama_cpp"
    """llmlb's ``engine`` (``llama_cpp`` when the entry does not say)."""
    platforms: tuple[str, ...] = ()
    """llmlb's ``platforms`` (``linux-cuda``, ``macos-metal``, ...); empty: not stated."""
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    origin: str = field(default="", compare=False)
    """The catalog file this entry was read from."""

    @property
    def runnable(self) -> bool:
        """Whether this node can run it at all: a GGUF for the llama_cpp engine."""
        return self.format == "gguf" and self.engine == "llama_cpp"

    @property
    def filename(self) -> str:
        """The model's main file (the first of `files`): the path handed to llama.cpp."""
        return self.files[0].filename

    @property
    def sha256(self) -> str | None:
        return self.files[0].sha256

    @property
    def total_size(self) -> int | None:
        """Sum of the best known sizes of all files, or None if any is unknown."""
        sizes = [f.expected_size for f in self.files]
        if any(s is None for s in sizes):
            return self.size_bytes
        return sum(s for s in sizes if s is not None)


class Catalog:
    """The parsed catalog: entries by id, plus where they came from.

    A catalog may be layered from several files (`merge_catalogs`): `path` then names them all
    (``a.json + b.json``), each entry's ``origin`` names its own file, and `overridden` the
    lower layers' files that defined the same id.
    """

    def __init__(
        self,
        entries: list[ModelEntry],
        path: str,
        overridden: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.path = path
        self._entries = {e.id: e for e in entries}
        self.overridden: Mapping[str, tuple[str, ...]] = dict(overridden or {})

    def __iter__(self):  # noqa: ANN204 - plain iterator over entries, in file order
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    @property
    def ids(self) -> list[str]:
        return list(self._entries)

    def find(self, model_id: str) -> ModelEntry | None:
        """The entry for `model_id`, or None."""
        return self._entries.get(model_id)

    def runnable(self, model_id: str) -> ModelEntry:
        """`get`, then `UnrunnableModelError` unless this node can run the entry."""
        entry = self.get(model_id)
        if not entry.runnable:
            raise UnrunnableModelError(model_id, self.path, entry.format, entry.engine)
        return entry

    def get(self, model_id: str) -> ModelEntry:
        """The entry for `model_id`, or `UnsupportedModelError` with up to three similar ids."""
        entry = self._entries.get(model_id)
        if entry is not None:
            return entry
        check_id(model_id)
        raise UnsupportedModelError(model_id, self.path, self.suggest(model_id))

    def suggest(self, model_id: str, n: int = 3) -> list[str]:
        import difflib  # only an unknown id pays for it

        lowered = {i.lower(): i for i in self._entries}
        close = difflib.get_close_matches(model_id.lower(), list(lowered), n=n, cutoff=0.6)
        found = [lowered[c] for c in close]
        if len(found) < n:
            # Prefix/substring matches catch "qwen2.5" -> "qwen2.5-0.5b-instruct".
            needle = model_id.lower()
            for low, real in lowered.items():
                if real not in found and (needle in low or low in needle):
                    found.append(real)
                if len(found) == n:
                    break
        return found


def catalog_paths_from_env(env: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """The catalog files to layer, lowest first (a later file's entry wins for the same id).

    By default: the packaged catalog, then ``$LLMLB_HOME/supported_models.json`` if it exists.
    ``LLMLB_SUPPORTED_MODELS`` (paths separated by `os.pathsep`) replaces that list, so one path
    there means exactly that one file; an empty element stands for the default list
    (``:/srv/extra.json`` adds a file on top of the defaults).
    """
    env = os.environ if env is None else env
    home = Path(env.get("LLMLB_HOME") or Path.home() / ".llmlb").expanduser()
    candidate = home / "supported_models.json"
    defaults = [PACKAGED_CATALOG, candidate] if candidate.is_file() else [PACKAGED_CATALOG]
    explicit = env.get("LLMLB_SUPPORTED_MODELS")
    if not explicit:
        return tuple(defaults)
    paths: list[Path] = []
    for part in explicit.split(os.pathsep):
        paths.extend(defaults if not part.strip() else [Path(part.strip()).expanduser()])
    return tuple(dict.fromkeys(paths))


def catalog_path_from_env(env: Mapping[str, str] | None = None) -> Path:
    """The top catalog layer: the last of `catalog_paths_from_env`."""
    return catalog_paths_from_env(env)[-1]


def merge_catalogs(catalogs: list[Catalog]) -> Catalog:
    """Layer catalogs in order: a later catalog's entry replaces an earlier one's (same id)."""
    if len(catalogs) == 1:
        return catalogs[0]
    entries: dict[str, ModelEntry] = {}
    overridden: dict[str, tuple[str, ...]] = {}
    for catalog in catalogs:
        for entry in catalog:
            below = entries.get(entry.id)
            if below is not None:
                overridden[entry.id] = (*overridden.get(entry.id, ()), below.origin)
            entries[entry.id] = entry  # keeps the position the id first had
    return Catalog(list(entries.values()), " + ".join(c.path for c in catalogs), overridden)


def load_catalogs(paths: tuple[Path, ...] | list[Path]) -> Catalog:
    """Read, validate and layer catalog files (see `catalog_paths_from_env`)."""
    return merge_catalogs([load_catalog(p) for p in paths])


def load_catalog(path: str | os.PathLike[str] | None = None) -> Catalog:
    """Read and validate a catalog file; `CatalogError` names the file, entry and field.

    Without `path`: the layered catalog the environment selects (`catalog_paths_from_env`).
    """
    if path is None:
        return load_catalogs(catalog_paths_from_env())
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {p}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise CatalogError(
            f"catalog {p} is not valid UTF-8: byte {exc.start} ({exc.reason})"
        ) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(
            f"catalog {p} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    return parse_catalog(data, str(p))


def parse_catalog(data: Any, path: str = "<catalog>") -> Catalog:
    """Validate already-decoded catalog JSON."""
    if isinstance(data, dict) and "models" in data:
        data = data["models"]
    if not isinstance(data, list):
        raise CatalogError(
            f'catalog {path}: expected a JSON list of models or {{"models": [...]}}, '
            f"got {type(data).__name__}"
        )
    entries: list[ModelEntry] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(data):
        entry = _parse_entry(raw, index, path)
        if entry.id in seen:
            raise CatalogError(
                f"catalog {path}: entry {index} (id {entry.id!r}): duplicate id, "
                f"already defined by entry {seen[entry.id]}"
            )
        seen[entry.id] = index
        entries.append(entry)
    return Catalog(entries, path)


class _EntryErrors:
    """Builds CatalogErrors that name the file, the entry and the field."""

    def __init__(self, path: str, index: int, model_id: object) -> None:
        self.where = f"catalog {path}: entry {index}" + (
            f" (id {model_id!r})" if isinstance(model_id, str) else ""
        )

    def __call__(self, field_name: str, problem: str) -> CatalogError:
        return CatalogError(f"{self.where}: field {field_name!r}: {problem}")


def _parse_entry(raw: Any, index: int, path: str) -> ModelEntry:
    if not isinstance(raw, dict):
        raise CatalogError(f"catalog {path}: entry {index}: expected an object")
    err = _EntryErrors(path, index, raw.get("id"))

    model_id = _required_str(raw, "id", err)
    if not is_valid_id(model_id):
        raise err("id", f"{model_id!r} is not a valid id ([A-Za-z0-9][A-Za-z0-9._-]*)")
    name = _required_str(raw, "name", err)
    repo = _required_str(raw, "repo", err)
    revision = _optional_str(raw, "revision", err) or "main"
    size_bytes = _optional_int(raw, "size_bytes", err)
    required_memory = _optional_int(raw, "required_memory_bytes", err)
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise err("description", "must be a string")

    if "files" in raw:
        files = _parse_files(raw["files"], err)
    else:
        filename = _required_str(raw, "recommended_filename", err)
        _check_filename(filename, "recommended_filename", err)
        files = (
            ModelFile(
                filename=filename,
                sha256=_optional_sha(raw, "sha256", err),
                approx_size=size_bytes,
            ),
        )
    if "sources" in raw:
        sources = _parse_sources(raw["sources"], err, files)
    else:
        sources = (SourceSpec("huggingface", {"repo": repo, "revision": revision}),)

    return ModelEntry(
        id=model_id,
        name=name,
        repo=repo,
        files=files,
        sources=sources,
        description=description,
        revision=revision,
        size_bytes=size_bytes,
        required_memory_bytes=required_memory,
        format=(_optional_str(raw, "format", err) or "gguf").strip().lower(),
        engine=(_optional_str(raw, "engine", err) or "llama_cpp").strip().lower(),
        platforms=_platforms(raw, err),
        raw=raw,
        origin=path,
    )


def _platforms(raw: dict, err: _EntryErrors) -> tuple[str, ...]:
    value = raw.get("platforms")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise err("platforms", "must be a list of strings such as 'linux-cuda'")
    return tuple(p.strip().lower() for p in value)


def _parse_files(value: Any, err: _EntryErrors) -> tuple[ModelFile, ...]:
    if not isinstance(value, list) or not value:
        raise err("files", "must be a non-empty list of {filename, size_bytes, sha256}")
    files: list[ModelFile] = []
    names: set[str] = set()
    for i, item in enumerate(value):
        label = f"files[{i}]"
        if not isinstance(item, dict):
            raise err(label, "must be an object")
        filename = item.get("filename")
        if not isinstance(filename, str) or not filename:
            raise err(f"{label}.filename", "is required and must be a non-empty string")
        _check_filename(filename, f"{label}.filename", err)
        if filename in names:
            raise err(f"{label}.filename", f"{filename!r} is listed twice")
        names.add(filename)
        files.append(
            ModelFile(
                filename=filename,
                size_bytes=_optional_int(item, "size_bytes", err, label),
                sha256=_optional_sha(item, "sha256", err, label),
            )
        )
    return tuple(files)


def _parse_sources(
    value: Any, err: _EntryErrors, files: tuple[ModelFile, ...]
) -> tuple[SourceSpec, ...]:
    if not isinstance(value, list):
        raise err("sources", "must be a list of source objects")
    specs: list[SourceSpec] = []
    filenames = {f.filename for f in files}
    for i, item in enumerate(value):
        label = f"sources[{i}]"
        if not isinstance(item, dict):
            raise err(label, "must be an object with a 'type'")
        kind = item.get("type")
        if kind not in SOURCE_TYPES:
            raise err(f"{label}.type", f"{kind!r} is not one of {', '.join(SOURCE_TYPES)}")
        options = {k: v for k, v in item.items() if k != "type"}
        if kind == "huggingface":
            if not isinstance(options.get("repo", ""), str):
                raise err(f"{label}.repo", "must be a string")
        elif kind == "url":
            urls = options.get("urls")
            if isinstance(options.get("url"), str):
                if len(files) != 1:
                    raise err(f"{label}.url", "a multi-file model needs 'urls': {filename: url}")
            elif (
                not isinstance(urls, dict)
                or set(urls) != filenames
                or not all(isinstance(u, str) and u for u in urls.values())
            ):
                raise err(f"{label}.urls", "must map every filename of the model to a URL")
            for where, url in _source_urls(label, options):
                if not _is_http_url(url):
                    raise err(where, f"{url!r} is not an http:// or https:// URL with a host")
        elif kind == "python-package":
            parts = options.get("files")
            if parts is None and isinstance(options.get("parts"), list) and len(files) == 1:
                parts = {files[0].filename: options["parts"]}
            if not isinstance(parts, dict) or set(parts) != filenames:
                raise err(f"{label}.files", "must map every filename of the model to its parts")
            for fname, plist in parts.items():
                if not isinstance(plist, list) or not plist:
                    raise err(f"{label}.files[{fname!r}]", "must be a non-empty list of parts")
                for j, part in enumerate(plist):
                    if not (
                        isinstance(part, dict)
                        and isinstance(part.get("distribution"), str)
                        and isinstance(part.get("path"), str)
                    ):
                        raise err(
                            f"{label}.files[{fname!r}][{j}]",
                            'must be {"distribution": ..., "path": ...}',
                        )
                    _check_filename(part["path"], f"{label}.files[{fname!r}][{j}].path", err)
            options = {"files": parts}
        specs.append(SourceSpec(kind, options))
    return tuple(specs)


def _check_filename(filename: str, field_name: str, err: _EntryErrors) -> None:
    pure = PurePosixPath(filename)
    if (
        "\\" in filename
        or pure.is_absolute()
        or filename.startswith("~")
        or any(part in ("..", ".", "") for part in filename.split("/"))
        or (len(filename) > 1 and filename[1] == ":")
    ):
        raise err(field_name, f"{filename!r} must be a relative path without '..'")


def _required_str(raw: dict, key: str, err: _EntryErrors) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise err(key, "is required and must be a non-empty string")
    return value


def _optional_str(raw: dict, key: str, err: _EntryErrors) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise err(key, "must be a string")
    return value


def _optional_int(raw: dict, key: str, err: _EntryErrors, prefix: str = "") -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise err(f"{prefix}.{key}" if prefix else key, "must be a non-negative integer")
    return value


def _optional_sha(raw: dict, key: str, err: _EntryErrors, prefix: str = "") -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not SHA256_PATTERN.fullmatch(value.lower()):
        raise err(f"{prefix}.{key}" if prefix else key, "must be 64 hex digits")
    return value.lower()


def _source_urls(label: str, options: dict[str, Any]) -> list[tuple[str, str]]:
    if isinstance(options.get("url"), str):
        return [(f"{label}.url", options["url"])]
    return [(f"{label}.urls[{name!r}]", url) for name, url in options["urls"].items()]


def _is_http_url(url: str) -> bool:
    """Only http(s) with a host: a URL without a scheme, or file:, must not reach the network
    code (it would be retried as a network error, or read a local file)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
