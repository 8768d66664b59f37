"""Hub references: ``hf:ORG/REPO[:QUANT | /FILE.gguf][@REVISION]`` as a stable model id, and as
a catalog entry built from one Hub API call (the repo's file list, with each file's LFS sha256).

Parsing never uses the network (a resolve of an installed reference costs what a catalog id
does); only `hub_entry` asks the Hub, and what it learns is kept beside the install.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .catalog import MAX_ID_LENGTH, ModelEntry, ModelFile, SourceSpec
from .errors import (
    HubAccessError,
    HubReferenceError,
    HubReferencesDisabledError,
    HubRepoNotFoundError,
    InvalidModelIdError,
    ModelDownloadError,
    NoGGUFError,
    QuantNotFoundError,
    SourceFailure,
)

if TYPE_CHECKING:
    from .settings import Settings
    from .store import ModelStore

log = logging.getLogger(__name__)

PREFIX = "hf:"
ID_PREFIX = "hf--"
REFERENCE_FILE = "reference.json"
QUANT_PREFERENCE = (
    "Q4_K_M",
    "Q4_K_S",
    "Q4_0",
    "IQ4_XS",
    "IQ4_NL",
    "Q5_K_M",
    "Q5_K_S",
    "Q5_0",
    "Q6_K",
    "Q8_0",
    "Q3_K_M",
    "Q3_K_L",
    "Q3_K_S",
    "IQ3_M",
    "IQ3_XXS",
    "Q2_K",
    "BF16",
    "F16",
    "F32",
)
"""The quantization `hf:ORG/REPO` picks: the first of these the repo has (Q4_K_M first, as
llama.cpp's ``-hf`` does); none of them: the first GGUF in name order."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_REVISION = re.compile(r"[A-Za-z0-9._-][A-Za-z0-9._/-]{0,199}")
_QUANT_TOKEN = re.compile(r"I?Q[1-8](?:_[A-Z0-9]+)*|BF16|F16|F32|FP16|MXFP4", re.I)
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.I)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RETRYABLE = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class HubReference:
    """A parsed ``hf:`` reference."""

    text: str
    repo: str
    quant: str | None = None
    """Upper-cased quantization tag (``Q4_K_M``), or None."""
    filename: str | None = None
    """A file path in the repo (``sub/model.gguf``), or None."""
    revision: str | None = None

    @property
    def model_id(self) -> str:
        """The id it installs under: ``hf--ORG--REPO`` plus ``--QUANT`` or ``--FILE`` (``/`` as
        ``--``), plus ``--at-REVISION`` when pinned; characters an id cannot hold become ``_``, and
        an id past 128 characters keeps its first 111 plus a hash of the whole reference."""
        parts = [*self.repo.split("/")]
        if self.quant:
            parts.append(self.quant)
        if self.filename:
            parts.extend(self.filename.split("/"))
        if self.revision:
            parts.append("at-" + self.revision.replace("/", "-"))
        model_id = ID_PREFIX + "--".join(_UNSAFE.sub("_", p) for p in parts)
        if len(model_id) > MAX_ID_LENGTH:
            digest = hashlib.sha256(self.canonical.encode()).hexdigest()[:16]
            model_id = f"{model_id[:111]}-{digest}"
        return model_id

    @property
    def canonical(self) -> str:
        """The reference written the one way (quant upper-cased)."""
        text = PREFIX + self.repo
        text += f":{self.quant}" if self.quant else ""
        text += f"/{self.filename}" if self.filename else ""
        return text + (f"@{self.revision}" if self.revision else "")


def is_reference(model_id: object) -> bool:
    """True for a string that starts with ``hf:`` (well formed or not)."""
    return isinstance(model_id, str) and model_id[:3].lower() == PREFIX


def parse(text: str, settings: Settings) -> HubReference:
    """`text` as a `HubReference`; `HubReferencesDisabledError` unless LLMLB_ALLOW_HF is set,
    `InvalidModelIdError` when it is not a reference this syntax allows. No network."""
    if not settings.allow_hf:
        raise HubReferencesDisabledError(
            text,
            f"model {text!r} is a Hugging Face reference, and this node resolves only catalog "
            "ids: set LLMLB_ALLOW_HF=1 to install any GGUF from the Hub by reference",
        )
    return parse_reference(text)


def parse_reference(text: str) -> HubReference:
    """The syntax alone (see `parse`)."""
    body, revision = text[len(PREFIX) :], None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        if not _REVISION.fullmatch(revision) or ".." in revision:
            raise _invalid(text, f"revision {revision!r} is not a branch, tag or commit")
    parts = body.split("/")
    if len(parts) < 2:
        raise _invalid(text, "expected hf:ORG/REPO")
    org, name, rest = parts[0], parts[1], parts[2:]
    quant = None
    if not rest and ":" in name:
        name, quant = name.split(":", 1)
        if not _QUANT.fullmatch(quant):
            raise _invalid(text, f"quantization {quant!r} is not a tag such as Q4_K_M")
        quant = quant.upper()
    for part in (org, name):
        if not _NAME.fullmatch(part) or "--" in part or ".." in part:
            raise _invalid(text, f"{part!r} is not a Hub organization or repository name")
    filename = "/".join(rest) or None
    bad_path = any(p in ("", ".", "..") for p in rest)
    if filename is not None and (bad_path or not filename.lower().endswith(".gguf")):
        raise _invalid(text, f"{filename!r} is not a path to a .gguf file in the repo")
    return HubReference(text, f"{org}/{name}", quant, filename, revision)


def _invalid(text: str, why: str) -> InvalidModelIdError:
    exc = InvalidModelIdError(text)
    exc.args = (
        f"invalid Hub reference {text!r}: {why} "
        "(hf:ORG/REPO, hf:ORG/REPO:QUANT or hf:ORG/REPO/FILE.gguf, "
        "each with an optional @REVISION)",
    )
    return exc


# -- the entry: from the store's note, else from the Hub --------------------------------------
def entry_for(
    model_id: str, reference: str | None, store: ModelStore, settings: Settings
) -> ModelEntry | None:
    """The entry of a Hub model: the note kept beside its install (no network), else, for a
    reference, what the Hub lists now (then kept). None when `model_id` is no Hub model."""
    saved = read_entry(store, model_id)
    if saved is not None:
        return saved
    if reference is None or not is_reference(reference):
        return None
    entry = hub_entry(parse(reference, settings), settings)
    save_entry(store, entry)
    return entry


def read_entry(store: ModelStore, model_id: str) -> ModelEntry | None:
    """The entry noted when the model was first resolved, or None (also when malformed)."""
    if not model_id.startswith(ID_PREFIX):
        return None
    from .store import read_json

    data = read_json(store.meta_dir(model_id) / REFERENCE_FILE)
    try:
        return _entry_from_json(data) if data else None
    except (KeyError, TypeError, ValueError) as exc:
        log.debug("%s: ignoring its malformed %s (%s)", model_id, REFERENCE_FILE, exc)
        return None


def save_entry(store: ModelStore, entry: ModelEntry) -> None:
    from .store import write_atomic

    path = store.meta_dir(entry.id) / REFERENCE_FILE
    data = {
        "reference": entry.raw.get("reference"),
        "id": entry.id,
        "name": entry.name,
        "repo": entry.repo,
        "revision": entry.revision,
        "quantization": entry.raw.get("quantization"),
        "files": [
            {"filename": f.filename, "size_bytes": f.size_bytes, "sha256": f.sha256}
            for f in entry.files
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1).encode(), fsync=False)


def _entry_from_json(data: dict[str, Any]) -> ModelEntry:
    files = tuple(
        ModelFile(str(f["filename"]), f.get("size_bytes"), f.get("sha256")) for f in data["files"]
    )
    if not files or not all(isinstance(f.size_bytes, (int, type(None))) for f in files):
        raise ValueError("files")
    return _entry(
        str(data["id"]),
        str(data["reference"]),
        str(data["repo"]),
        str(data["revision"]),
        files,
        data.get("quantization"),
    )


def _entry(
    model_id: str,
    reference: str,
    repo: str,
    commit: str,
    files: tuple[ModelFile, ...],
    quant: str | None,
) -> ModelEntry:
    return ModelEntry(
        id=model_id,
        name=f"{repo} {quant or files[0].filename.rsplit('/', 1)[-1]}",
        repo=repo,
        files=files,
        sources=(SourceSpec("huggingface", {"repo": repo, "revision": commit}),),
        description=f"{reference} from the Hugging Face Hub",
        revision=commit,
        size_bytes=sum(f.size_bytes or 0 for f in files) or None,
        raw={"reference": reference, "quantization": quant},
        origin="hf",
    )


# -- asking the Hub -----------------------------------------------------------------------
@dataclass(frozen=True)
class HubFile:
    """One file of a repo, as the Hub's API lists it."""

    path: str
    size: int | None
    sha256: str | None


def hub_entry(ref: HubReference, settings: Settings) -> ModelEntry:
    """The entry for `ref`: the repo's files at its revision (pinned to the commit the Hub
    names), the GGUF(s) the reference picks, each with its size and LFS sha256."""
    commit, files = list_files(ref, settings)
    chosen, quant = choose(ref, files)
    model_files = tuple(ModelFile(f.path, f.size, f.sha256) for f in chosen)
    entry = _entry(ref.model_id, ref.canonical, ref.repo, commit, model_files, quant)
    log.info(
        "%s: %s at %s is %s", ref.text, ref.repo, commit[:12], ", ".join(f.path for f in chosen)
    )
    return entry


def list_files(ref: HubReference, settings: Settings) -> tuple[str, list[HubFile]]:
    """(commit, files) from ``GET /api/models/{repo}/revision/{rev}?blobs=true`` on HF_ENDPOINT,
    with HF_TOKEN; errors typed as the Hub's X-Error-Code says."""
    label = f"huggingface:{ref.repo}"
    if settings.hf_offline:
        raise ModelDownloadError(
            ref.text, [SourceFailure(label, "offline", "HF_HUB_OFFLINE is set")]
        )
    revision = ref.revision or "main"
    url = (
        f"{settings.hf_endpoint}/api/models/{ref.repo}/revision/{quote(revision, safe='')}"
        "?blobs=true"
    )
    from .sources.base import origin_allowed

    if not origin_allowed(url, settings.origin_allowlist):
        message = "the Hub's host is not in LLMLB_ORIGIN_ALLOWLIST"
        raise ModelDownloadError(ref.text, [SourceFailure(label, "blocked", message, url)])
    token = _token(settings)
    data = _get_json(ref, url, settings, token)
    if isinstance(data, dict) and data.get("gated") and not token:
        # The Hub lists a gated repo's files to anyone; their bytes need a granted token.
        page = f"{settings.hf_endpoint}/{ref.repo}"
        message = f"{ref.repo} is gated: set HF_TOKEN and accept the model's terms at {page}"
        raise HubAccessError(ref.text, [SourceFailure(label, "unauthorized", message, url)])
    commit = data.get("sha") if isinstance(data, dict) else None
    siblings = data.get("siblings") if isinstance(data, dict) else None
    if not isinstance(commit, str) or not isinstance(siblings, list):
        message = (
            f"{settings.hf_endpoint} did not answer like the Hub's model API; check HF_ENDPOINT"
        )
        raise ModelDownloadError(ref.text, [SourceFailure(label, "http", message, url)])
    return commit, [f for f in map(_hub_file, siblings) if f is not None]


def _hub_file(item: object) -> HubFile | None:
    if not isinstance(item, dict) or not isinstance(item.get("rfilename"), str):
        return None
    lfs = item.get("lfs") if isinstance(item.get("lfs"), dict) else {}
    sha = lfs.get("sha256") or lfs.get("oid")
    size = item.get("size", lfs.get("size"))
    valid_sha = isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)
    return HubFile(
        item["rfilename"],
        size if isinstance(size, int) and not isinstance(size, bool) else None,
        sha if valid_sha else None,
    )


def _get_json(ref: HubReference, url: str, settings: Settings, token: str | None) -> Any:
    import httpx

    from .sources.http_errors import describe_exception

    label = f"huggingface:{ref.repo}"
    headers = {"authorization": f"Bearer {token}"} if token else {}
    timeout = httpx.Timeout(settings.connect_timeout, read=settings.stall_timeout)
    for attempt in range(1, settings.max_retries + 1):
        try:
            # httpx drops the Authorization header on a redirect to another origin.
            response = httpx.get(url, headers=headers, timeout=timeout, follow_redirects=True)
        except httpx.HTTPError as exc:
            kind, message = describe_exception(exc)
            if attempt < settings.max_retries and kind in ("network", "timeout"):
                time.sleep(min(settings.retry_backoff * 2 ** (attempt - 1), 8.0))
                continue
            raise ModelDownloadError(ref.text, [SourceFailure(label, kind, message, url)]) from exc
        if response.status_code in _RETRYABLE and attempt < settings.max_retries:
            time.sleep(min(settings.retry_backoff * 2 ** (attempt - 1), 8.0))
            continue
        _raise_for_status(ref, response, settings, token is not None)
        try:
            return response.json()
        except ValueError:
            message = (
                f"{settings.hf_endpoint} answered something other than JSON; check HF_ENDPOINT"
            )
            raise ModelDownloadError(
                ref.text, [SourceFailure(label, "http", message, url)]
            ) from None
    raise AssertionError("unreachable")


def _token(settings: Settings) -> str | None:
    if settings.hf_token:
        return settings.hf_token
    try:
        from .sources.huggingface import login_token

        return login_token()  # the token file `hf auth login` writes
    except Exception:  # noqa: BLE001 - a broken token file must not break anonymous access
        return None


def _raise_for_status(ref: HubReference, response: Any, settings: Settings, token: bool) -> None:
    status = response.status_code
    if status < 400:
        return
    code = response.headers.get("x-error-code", "")
    page = f"{settings.hf_endpoint}/{ref.repo}"
    label = f"huggingface:{ref.repo}"
    if code == "GatedRepo" or (status in (401, 403) and code != "RepoNotFound"):
        kind = "forbidden" if status == 403 else "unauthorized"
        why = f"{ref.repo} is gated" if code == "GatedRepo" else f"the Hub refused {ref.repo}"
        message = f"{why} (HTTP {status}): set HF_TOKEN and accept the model's terms at {page}"
        raise HubAccessError(ref.text, [SourceFailure(label, kind, message, str(response.url))])
    if code == "RevisionNotFound":
        raise HubRepoNotFoundError(
            ref.text, f"{ref.text}: {ref.repo} has no revision {ref.revision!r} on the Hub"
        )
    if status in (401, 404) or code == "RepoNotFound":
        advice = (
            "check the name, or set HF_TOKEN if it is private"
            if not token
            else ("check the name and that HF_TOKEN can read it")
        )
        raise HubRepoNotFoundError(
            ref.text, f"{ref.text}: repository {ref.repo} not found on the Hub ({advice})"
        )
    message = f"HTTP {status} from the Hub's model API"
    raise ModelDownloadError(ref.text, [SourceFailure(label, "http", message, str(response.url))])


# -- choosing the file(s) -----------------------------------------------------------------
def quant_of(path: str) -> str | None:
    """The quantization tag a GGUF's path names (``Q4_K_M`` in ``org-q4_k_m.gguf``, the folder
    ``Q8_0/`` of a split, unsloth's ``UD-Q4_K_XL``), or None: the last such token wins."""
    stem = _SPLIT.sub("", path)
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    tokens = re.split(r"[/.-]", stem)
    found = None
    for before, token in zip(["", *tokens], tokens, strict=False):
        if _QUANT_TOKEN.fullmatch(token):
            found = ("UD-" if before.upper() == "UD" else "") + token.upper()
    return found


def models_in(files: list[HubFile]) -> dict[str, list[HubFile]]:
    """The repo's GGUF models by main file: a single file, or every shard of a split GGUF
    (``-00001-of-0000N``, in order; a split with shards missing is left out). Projector files
    (``mmproj``) are not models."""
    singles: dict[str, list[HubFile]] = {}
    splits: dict[tuple[str, int], dict[int, HubFile]] = {}
    for f in files:
        base = f.path.rsplit("/", 1)[-1].lower()
        if not base.endswith(".gguf") or base.startswith("mmproj") or f.path.startswith("."):
            continue
        match = _SPLIT.search(f.path)
        if match is None:
            singles[f.path] = [f]
        else:
            key = (f.path[: match.start()], int(match.group(2)))
            splits.setdefault(key, {})[int(match.group(1))] = f
    for (prefix, total), shards in splits.items():
        if sorted(shards) != list(range(1, total + 1)):
            log.debug("%s: split GGUF with shards missing (%s of %d)", prefix, len(shards), total)
            continue
        ordered = [shards[i] for i in range(1, total + 1)]
        singles[ordered[0].path] = ordered
    return dict(sorted(singles.items()))


def choose(ref: HubReference, files: list[HubFile]) -> tuple[list[HubFile], str | None]:
    """The files the reference names, and their quantization; typed errors when none fits."""
    models = models_in(files)
    if not models:
        raise _no_gguf(ref, files)
    if ref.filename is not None:
        return _by_filename(ref, models)
    by_quant: dict[str, list[str]] = {}
    for main in models:
        by_quant.setdefault(quant_of(main) or "", []).append(main)
    if ref.quant is not None:
        mains = by_quant.get(ref.quant)
        if not mains:
            raise _no_quant(ref, by_quant)
        return models[_shallowest(mains)], ref.quant
    for quant in QUANT_PREFERENCE:
        if quant in by_quant:
            return models[_shallowest(by_quant[quant])], quant
    main = next(iter(models))
    return models[main], quant_of(main)


def _shallowest(mains: list[str]) -> str:
    return min(mains, key=lambda m: (m.count("/"), m))


def _by_filename(
    ref: HubReference, models: dict[str, list[HubFile]]
) -> tuple[list[HubFile], str | None]:
    wanted = (ref.filename or "").lower()
    for main, shards in models.items():
        if any(s.path.lower() == wanted for s in shards):
            return shards, quant_of(main)
    listed = ", ".join(list(models)[:20])
    raise HubReferenceError(
        ref.text, f"{ref.text}: {ref.repo} has no GGUF named {ref.filename!r}; its GGUFs: {listed}"
    )


def _no_gguf(ref: HubReference, files: list[HubFile]) -> NoGGUFError:
    names = [f.path for f in files]
    kinds = sorted({n.rsplit(".", 1)[-1].lower() for n in names if "." in n.rsplit("/", 1)[-1]})
    only = "safetensors only" if "safetensors" in kinds else f"files: {', '.join(kinds) or 'none'}"
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    return NoGGUFError(
        ref.text,
        f"{ref.text}: {ref.repo} holds no GGUF file that llama.cpp could run ({only}: {shown}); "
        "look for a GGUF conversion of it on the Hub",
        names,
    )


def _no_quant(ref: HubReference, by_quant: dict[str, list[str]]) -> QuantNotFoundError:
    rank = {q: i for i, q in enumerate(QUANT_PREFERENCE)}
    quants = sorted((q for q in by_quant if q), key=lambda q: (rank.get(q, len(rank)), q))
    untagged = by_quant.get("", [])
    have = ", ".join(quants) + (f" (and untagged: {', '.join(untagged)})" if untagged else "")
    return QuantNotFoundError(
        ref.text,
        f"{ref.text}: {ref.repo} has no {ref.quant} GGUF; its quantizations: {have}",
        quants,
    )
