"""Which requests may carry a secret: the one rule every source and the downloader follow.

A secret (HF_TOKEN, LLMLB_API_KEY, LLMLB_URL's userinfo) belongs to one origin, scheme + host +
port as browsers define it, and goes to no other: not another port, not http after https.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Origin:
    """A normalised (scheme, host, port): lowercase, IDNA-encoded, no trailing dot, IP literals
    in canonical form, default ports filled in."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str | None) -> Origin | None:
        """The origin of an http(s) URL, or None when it has none we could trust (other
        schemes, no host, a bad port, a name IDNA cannot encode)."""
        if not url:
            return None
        try:
            parts = urlsplit(url.strip())
            scheme = parts.scheme.lower()
            port = parts.port
        except ValueError:
            return None
        if scheme not in _DEFAULT_PORTS:
            return None
        host = _normal_host(parts.hostname or "")
        if host is None:
            return None
        return cls(scheme, host, _DEFAULT_PORTS[scheme] if port is None else port)


def may_carry_secret(url: str | None, secret_origin: str | Origin | None) -> bool:
    """True only if a request to `url` goes to exactly the origin the secret belongs to.

    `secret_origin` is that origin or any URL on it (the Hub endpoint, LLMLB_URL). A scheme
    change (https -> http), another port, another host or anything unparsable is False.
    """
    target = Origin.of(url)
    own = secret_origin if isinstance(secret_origin, Origin) else Origin.of(secret_origin)
    return target is not None and own is not None and target == own


def split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """(`url` without its ``user:password@``, the percent-decoded credentials or None).

    The URL without credentials is the one that may be logged and shown.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
    return clean, (unquote(user), unquote(password))


def _normal_host(host: str) -> str | None:
    # urlsplit already lowercased the name and removed an IPv6 literal's brackets.
    host = host.rstrip(".")  # "example.org." is the same name as "example.org"
    if not host:
        return None
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        pass
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
