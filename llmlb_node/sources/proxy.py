"""The llmlb load balancer's proxy: the fallback after every external source failed.

``GET {LLMLB_URL}/v0/models/blob/{id}`` (``?file=`` for each file of a multi-file model), with the
API key as a bearer token sent only to LLMLB_URL's host.
"""

from __future__ import annotations

from urllib.parse import quote

from ..catalog import ModelEntry, ModelFile
from ..settings import Settings
from .base import Remote, Source, fail, host_of

LABEL = "llmlb-proxy"


class ProxySource(Source):
    """Fetch through the load balancer (not subject to the origin allowlist: it is the fallback)."""

    label = LABEL

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def locate(self, entry: ModelEntry, file: ModelFile) -> Remote:
        base = self.settings.llmlb_url
        if not base:
            raise fail(self.label, "skipped", "LLMLB_URL is not set, so the proxy was not tried")
        url = f"{base}/v0/models/blob/{quote(entry.id, safe='')}"
        if len(entry.files) > 1:
            url += f"?file={quote(file.filename, safe='')}"
        key = self.settings.llmlb_api_key
        return Remote(
            source=self.label,
            url=url,
            headers={"authorization": f"Bearer {key}"} if key else {},
            auth_host=host_of(base) if key else None,
            size=file.size_bytes,
            sha256=file.sha256,
        )
