"""The Hugging Face Hub as a source: URLs built as huggingface_hub's `hf_hub_url` builds them and
the token it finds, without importing its HTTP client unless needed (an unusual repo id for its
validator, a token to look up); the file metadata request (HEAD /resolve) is our own, so the token
obeys `may_carry_secret` on every hop.

The bytes themselves stream through our downloader from the location the Hub redirects to; the
token goes only to HF_ENDPOINT's origin (scheme, host, port), never to the CDN it redirects to.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from urllib.parse import quote

import httpx

from .. import __version__
from ..catalog import ModelEntry, ModelFile
from ..errors import CatalogError
from ..origin import Origin, may_carry_secret
from ..redact import remember
from ..settings import Settings
from .base import Remote, Source, check_origin, fail
from .http_errors import describe_exception

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# A repo id every huggingface_hub version accepts (1-96 ASCII word, '.', '-' characters, at most
# one '/', word characters at both ends of each part); any other goes to hf_hub_url's validator.
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_PLAIN_REPO = re.compile(rf"(?:{_NAME}/)?{_NAME}")
_BAD_REPO = re.compile(r"--|\.\.|\.git$|^.{97,}$")
_RETRYABLE = {408, 429, 500, 502, 503, 504}
_REDIRECTS = {301, 302, 303, 307, 308}
_MAX_REDIRECTS = 10


class HuggingFaceSource(Source):
    """Files of one Hub repo at one revision (``{"type": "huggingface", "repo": ...}``).

    The first answer's ``X-Repo-Commit`` pins the revision: every later request of this source
    (the other files or shards, a resume of any of them) names that commit, so a branch that
    moves mid-download cannot mix two commits in one install.
    """

    def __init__(self, settings: Settings, repo: str, revision: str = "main") -> None:
        self.settings = settings
        self.repo = repo
        self.revision = revision
        self.pinned: str | None = None
        self.label = f"huggingface:{repo}"

    def locate(self, entry: ModelEntry, file: ModelFile) -> Remote:
        settings = self.settings
        if settings.hf_offline:
            raise fail(self.label, "offline", "HF_HUB_OFFLINE is set: the Hub is not contacted")
        url = self._url(entry, file, self.pinned or self.revision)
        check_origin(self.label, url, settings.origin_allowlist)
        token = self._token() if may_carry_secret(url, settings.hf_endpoint) else None
        meta = self._metadata(url, token)
        if not meta.commit_hash and not meta.etag:
            # A 200 HTML page (a portal, a proxy's error page) has none of the Hub's
            # headers: that is not the Hub.
            raise fail(
                self.label,
                "http",
                f"{settings.hf_endpoint} did not answer like the Hub (no X-Repo-Commit or ETag); "
                "check HF_ENDPOINT",
                url,
            )

        location = self._pin(entry, file, meta, url)
        etag = (meta.etag or "").lower()
        sha256 = etag if _SHA256.fullmatch(etag) else None
        if file.sha256 and sha256 and file.sha256 != sha256:
            raise fail(
                self.label,
                "integrity",
                f"the Hub reports sha256 {sha256} for {file.filename} at revision "
                f"{self.pinned or self.revision}, the catalog expects {file.sha256}",
                url,
            )
        return Remote(
            source=self.label,
            url=location,
            # The downloader sends it only where `may_carry_secret` allows: not to the CDN.
            headers={"authorization": f"Bearer {token}"} if token else {},
            auth_origin=settings.hf_endpoint if token else None,
            size=meta.size,
            sha256=sha256,
            validator=etag or meta.commit_hash,
        )

    def _url(self, entry: ModelEntry, file: ModelFile, revision: str) -> str:
        endpoint = self.settings.hf_endpoint
        if _PLAIN_REPO.fullmatch(self.repo) and not _BAD_REPO.search(self.repo):
            # what hf_hub_url builds, without importing its client (~0.2 s of a pull)
            path = f"{quote(revision, safe='')}/{quote(file.filename)}"
            return f"{endpoint}/{self.repo}/resolve/{path}"
        from huggingface_hub import hf_hub_url  # its validator words the refusal

        try:
            return hf_hub_url(
                self.repo, file.filename, revision=revision, endpoint=self.settings.hf_endpoint
            )
        except ValueError as exc:  # HFValidationError: not a repo id the Hub accepts
            raise CatalogError(f"model {entry.id!r}: {exc}") from exc

    def _pin(self, entry: ModelEntry, file: ModelFile, meta: _FileMetadata, url: str) -> str:
        """Pin the revision to the first answer's commit; the URL the bytes come from, at it."""
        commit = meta.commit_hash
        if self.pinned is not None and commit is not None and commit != self.pinned:
            raise fail(
                self.label,
                "integrity",
                f"asked for {file.filename} at commit {self.pinned}, the Hub answered for "
                f"commit {commit}: not mixing two commits in one install",
                url,
            )
        if self.pinned is None and commit is not None and _COMMIT.fullmatch(commit):
            self.pinned = commit
            if Origin.of(meta.location) == Origin.of(url):  # the Hub itself serves the bytes:
                # a resume of them must name the commit too (a CDN URL names the content)
                return self._url(entry, file, commit)
        return meta.location or url

    def _token(self) -> str | None:
        if self.settings.hf_token:
            return self.settings.hf_token
        try:
            token = login_token()  # also reads the token file `hf auth login` writes
        except Exception:  # noqa: BLE001 - a broken token file must not break anonymous access
            return None
        remember(token)  # a secret like HF_TOKEN: no message may quote it
        return token

    def _metadata(self, url: str, token: str | None) -> _FileMetadata:
        """The Hub's HEAD /resolve answer, retried on 429/5xx and transport errors."""
        attempts = self.settings.max_retries
        for attempt in range(1, attempts + 1):
            try:
                return self._head(url, token)
            except _RetryableHub as exc:
                if attempt == attempts:
                    raise fail(self.label, "http", f"HTTP {exc.status} from the Hub", url) from exc
                self._backoff(attempt, exc, exc.retry_after)
            except httpx.HTTPError as exc:
                kind, message = describe_exception(exc)
                if kind not in ("network", "timeout", "stalled") or attempt == attempts:
                    raise fail(self.label, kind, message, url) from exc
                self._backoff(attempt, exc, None)
        raise AssertionError("unreachable")

    def _head(self, url: str, token: str | None) -> _FileMetadata:
        """HEAD `url` the way huggingface_hub's `get_hf_file_metadata` does, with our own client:
        a redirect within the same origin is followed, one elsewhere (the CDN) carries the
        metadata itself and is not. The token rides each hop only if `may_carry_secret` allows
        it for that hop's exact URL, so no redirect (to huggingface.co, another port, http)
        takes it anywhere but HF_ENDPOINT's origin."""
        from ..download import send_with_deadline

        settings = self.settings
        deadline = settings.connect_timeout + settings.stall_timeout
        with httpx.Client(
            timeout=httpx.Timeout(settings.connect_timeout, read=settings.stall_timeout),
            follow_redirects=False,
            headers={"user-agent": f"llmlb-node/{__version__}", "accept-encoding": "identity"},
            # Only a same-origin redirect is followed, so the scheme never changes: plain http
            # skips building a TLS context (tens of milliseconds loading the CA bundle).
            verify=url.startswith("https:"),
        ) as client:
            for _ in range(_MAX_REDIRECTS + 1):
                headers = {}
                if token and may_carry_secret(url, settings.hf_endpoint):
                    headers["authorization"] = f"Bearer {token}"
                request = client.build_request("HEAD", url, headers=headers)
                response = send_with_deadline(client, request, deadline)
                response.close()
                self._raise_for_status(response, url, token)
                location = response.headers.get("location")
                if response.status_code in _REDIRECTS and location:
                    try:
                        target = str(httpx.URL(url).join(location))
                    except httpx.InvalidURL as exc:
                        raise fail(self.label, "http", f"bad Location: {exc}", url) from exc
                    if Origin.of(target) is not None and Origin.of(target) == Origin.of(url):
                        url = target  # a rename or a revision redirect on the Hub itself
                        continue
                    return _FileMetadata.of(response, target)
                return _FileMetadata.of(response, url)
        raise fail(self.label, "http", "too many redirects", url)

    def _raise_for_status(self, response: httpx.Response, url: str, token: str | None) -> None:
        """The Hub's errors, told apart by status and X-Error-Code as huggingface_hub does."""
        status = response.status_code
        if status < 400:
            return
        code = response.headers.get("x-error-code", "")
        message = response.headers.get("x-error-message", "")
        if code == "GatedRepo":
            raise fail(
                self.label,
                "forbidden",
                f"{self.repo} is gated: accept its license at "
                f"{self.settings.hf_endpoint}/{self.repo} and set HF_TOKEN",
                url,
            )
        if code == "RepoNotFound":
            advice = (
                "set HF_TOKEN if it is private"
                if not token
                else "check the repo name and that HF_TOKEN can read it"
            )
            raise fail(
                self.label,
                "not_found",
                f"repository {self.repo} not found or not accessible (HTTP {status}): {advice}",
                url,
            )
        if code in ("EntryNotFound", "RevisionNotFound"):
            raise fail(
                self.label,
                "not_found",
                f"{_file_of(url)} not found in {self.repo} at revision {self.revision} "
                f"(HTTP {status})",
                url,
            )
        if status in (401, 403):
            raise fail(
                self.label,
                "unauthorized" if status == 401 else "forbidden",
                f"HTTP {status} for {self.repo}: set HF_TOKEN, or accept the model's "
                f"license at {self.settings.hf_endpoint}/{self.repo}",
                url,
            )
        if status in _RETRYABLE:
            raise _RetryableHub(status, _parse_seconds(response.headers.get("retry-after")))
        detail = f": {message}" if message else ""
        raise fail(self.label, "http", f"HTTP {status} from the Hub{detail}", url)

    def _backoff(self, attempt: int, exc: BaseException, retry_after: float | None) -> None:
        delay = min(self.settings.retry_backoff * 2 ** (attempt - 1), 8.0)
        if retry_after is not None:
            delay = min(retry_after, 60.0)
        log.info("%s: %s; retrying in %.1fs (attempt %d)", self.label, exc, delay, attempt + 1)
        time.sleep(delay)


class _RetryableHub(Exception):
    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class _FileMetadata:
    """What the Hub's HEAD /resolve says of a file (huggingface_hub's `HfFileMetadata`)."""

    commit_hash: str | None
    etag: str | None
    location: str
    size: int | None

    @classmethod
    def of(cls, response: httpx.Response, location: str) -> _FileMetadata:
        h = response.headers
        etag = h.get("x-linked-etag") or h.get("etag")
        size = h.get("x-linked-size") or (
            None if response.status_code in _REDIRECTS else h.get("content-length")
        )
        return cls(
            commit_hash=h.get("x-repo-commit"),
            etag=etag.strip().removeprefix("W/").strip('"') if etag else None,
            location=location,
            size=int(size) if size and size.strip().isdigit() else None,
        )


def _parse_seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def login_token() -> str | None:
    """huggingface_hub's `get_token()`, without importing its client (~0.2 s) when it would
    find nothing: no OIDC resource, no token variable, no token file, not in Colab."""
    from huggingface_hub import constants  # light: paths and variables only

    if (
        any(os.environ.get(v) for v in ("HF_OIDC_RESOURCE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"))
        or os.path.exists(constants.HF_TOKEN_PATH)
        or "google.colab" in sys.modules
    ):
        from huggingface_hub import get_token

        return get_token()
    return None


def _file_of(url: str) -> str:
    return url.split("/resolve/", 1)[-1].split("/", 1)[-1]
