"""The Hugging Face Hub as a source: huggingface_hub for URLs, auth and file metadata.

The bytes themselves stream through our downloader from the location the Hub redirects to; the
token goes only to HF_ENDPOINT's origin (scheme, host, port), never to the CDN it redirects to.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from .. import __version__
from ..catalog import ModelEntry, ModelFile
from ..errors import CatalogError, SourceError
from ..origin import may_carry_secret
from ..settings import Settings
from .base import Remote, Source, check_origin, fail
from .http_errors import describe_exception

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_RETRYABLE = {429, 500, 502, 503, 504}


class HuggingFaceSource(Source):
    """Files of one Hub repo at one revision (``{"type": "huggingface", "repo": ...}``)."""

    def __init__(self, settings: Settings, repo: str, revision: str = "main") -> None:
        self.settings = settings
        self.repo = repo
        self.revision = revision
        self.label = f"huggingface:{repo}"

    def locate(self, entry: ModelEntry, file: ModelFile) -> Remote:
        settings = self.settings
        if settings.hf_offline:
            raise fail(self.label, "offline", "HF_HUB_OFFLINE is set: the Hub is not contacted")
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        try:
            url = hf_hub_url(
                self.repo, file.filename, revision=self.revision, endpoint=settings.hf_endpoint
            )
        except ValueError as exc:  # HFValidationError: not a repo id the Hub accepts
            raise CatalogError(f"model {entry.id!r}: {exc}") from exc
        check_origin(self.label, url, settings.origin_allowlist)
        token = self._token() if may_carry_secret(url, settings.hf_endpoint) else None
        meta = self._metadata(get_hf_file_metadata, url, token)
        if not meta.commit_hash and not meta.etag:
            # huggingface_hub returns empty metadata for a 200 HTML page (a portal, a proxy's
            # error page) instead of raising: that is not the Hub.
            raise fail(
                self.label,
                "http",
                f"{settings.hf_endpoint} did not answer like the Hub (no X-Repo-Commit or ETag); "
                "check HF_ENDPOINT",
                url,
            )

        location = meta.location or url
        etag = (meta.etag or "").lower()
        sha256 = etag if _SHA256.fullmatch(etag) else None
        if file.sha256 and sha256 and file.sha256 != sha256:
            raise fail(
                self.label,
                "integrity",
                f"the Hub reports sha256 {sha256} for {file.filename} at revision "
                f"{self.revision}, the catalog expects {file.sha256}",
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

    def _token(self) -> str | None:
        if self.settings.hf_token:
            return self.settings.hf_token
        try:
            from huggingface_hub import get_token

            return get_token()  # also reads the token file `hf auth login` writes
        except Exception:  # noqa: BLE001 - a broken token file must not break anonymous access
            return None

    def _metadata(self, get_metadata: Any, url: str, token: str | None) -> Any:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        attempts = self.settings.max_retries
        for attempt in range(1, attempts + 1):
            try:
                return get_metadata(
                    url,
                    token=token or False,
                    timeout=self.settings.connect_timeout,
                    library_name="llmlb-node",
                    library_version=__version__,
                )
            except GatedRepoError as exc:
                raise fail(
                    self.label,
                    "forbidden",
                    f"{self.repo} is gated: accept its license at "
                    f"{self.settings.hf_endpoint}/{self.repo} and set HF_TOKEN",
                    url,
                ) from exc
            except RepositoryNotFoundError as exc:
                status = _status(exc)
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
                ) from exc
            except (EntryNotFoundError, RevisionNotFoundError) as exc:
                raise fail(
                    self.label,
                    "not_found",
                    f"{_file_of(url)} not found in {self.repo} at revision {self.revision} "
                    f"(HTTP {_status(exc)})",
                    url,
                ) from exc
            except HfHubHTTPError as exc:
                status = _status(exc)
                if status in (401, 403):
                    raise fail(
                        self.label,
                        "unauthorized" if status == 401 else "forbidden",
                        f"HTTP {status} for {self.repo}: set HF_TOKEN, or accept the model's "
                        f"license at {self.settings.hf_endpoint}/{self.repo}",
                        url,
                    ) from exc
                if status not in _RETRYABLE or attempt == attempts:
                    raise fail(self.label, "http", f"HTTP {status} from the Hub", url) from exc
                self._backoff(attempt, exc)
            except SourceError:
                raise
            except Exception as exc:  # noqa: BLE001 - transport errors of huggingface_hub's client
                kind, message = describe_exception(exc)
                if kind not in ("network", "timeout") or attempt == attempts:
                    raise fail(self.label, kind, message, url) from exc
                self._backoff(attempt, exc)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, exc: BaseException) -> None:
        delay = min(self.settings.retry_backoff * 2 ** (attempt - 1), 8.0)
        retry_after = _retry_after(exc)
        if retry_after is not None:
            delay = min(retry_after, 60.0)
        log.info("%s: %s; retrying in %.1fs (attempt %d)", self.label, exc, delay, attempt + 1)
        time.sleep(delay)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _file_of(url: str) -> str:
    return url.split("/resolve/", 1)[-1].split("/", 1)[-1]
