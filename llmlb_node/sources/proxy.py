"""The llmlb load balancer's proxy: the fallback after every external source failed.

``GET {LLMLB_URL}/v0/models/blob/{id}`` (``?file=`` for each file of a multi-file model), with the
API key as a bearer token (or LLMLB_URL's ``user:password@`` as Basic auth) sent only to
LLMLB_URL's origin.
"""

from __future__ import annotations

import base64
from urllib.parse import quote

from ..catalog import ModelEntry, ModelFile
from ..settings import Settings
from .base import Remote, Source, fail

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
        auth = self._authorization()
        return Remote(
            source=self.label,
            url=url,
            headers={"authorization": auth} if auth else {},
            auth_origin=base if auth else None,
            size=file.size_bytes,
            sha256=file.sha256,
            # A node serving a file while it arrives sends the sha256 it expects as its ETag:
            # what it sent is proven only if it hashes to that here.
            etag_is_sha256=True,
        )

    def _authorization(self) -> str | None:
        """Bearer LLMLB_API_KEY; without a key, Basic from LLMLB_URL's userinfo."""
        key, userinfo = self.settings.llmlb_api_key, self.settings.llmlb_userinfo
        if key:
            return f"Bearer {key}"
        if userinfo:
            pair = f"{userinfo[0]}:{userinfo[1]}".encode()
            return f"Basic {base64.b64encode(pair).decode('ascii')}"
        return None
