"""A plain HTTP(S) URL per file: a mirror, an object store, an internal artifact server.

``{"type": "url", "url": "https://..."}`` (single file) or ``"urls": {filename: url}``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..catalog import ModelEntry, ModelFile
from ..settings import Settings
from .base import Remote, Source, check_origin, host_of


class UrlSource(Source):
    """Files at fixed URLs; subject to the origin allowlist like every external source."""

    def __init__(
        self, settings: Settings, url: str | None = None, urls: Mapping[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.urls = dict(urls or {})
        self.url = url
        first = url or next(iter(self.urls.values()), "")
        self.label = f"url:{host_of(first)}"

    def locate(self, entry: ModelEntry, file: ModelFile) -> Remote:
        url = self.url if self.url else self.urls[file.filename]
        check_origin(self.label, url, self.settings.origin_allowlist)
        return Remote(source=self.label, url=url, size=file.size_bytes, sha256=file.sha256)
