"""Turn transport exceptions (httpx's, or huggingface_hub's client's) into a kind and a sentence.

Shared by the sources and the downloader so every failure reads the same way in errors and logs.
"""

from __future__ import annotations

import errno


def describe_exception(exc: BaseException) -> tuple[str, str]:
    """Classify a transport error: (kind, message) with kind in refused, dns, timeout, stalled,
    network, disk."""
    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    codes = {getattr(e, "errno", None) for e in chain}
    if errno.ENOSPC in codes:
        return "disk", "no space left on the device"
    if "ConnectTimeout" in names:
        return "timeout", "timed out while connecting"
    if "ReadTimeout" in names or "WriteTimeout" in names or "PoolTimeout" in names:
        return "stalled", "no data arrived within the stall timeout"
    if errno.ECONNREFUSED in codes or "refused" in text:
        return "refused", "connection refused (is the server up?)"
    if any(
        marker in text
        for marker in (
            "name or service not known",
            "nodename nor servname",
            "getaddrinfo",
            "name resolution",
            "no address associated",
        )
    ):
        return "dns", "could not resolve the host name (DNS)"
    if "TimeoutException" in names or isinstance(exc, TimeoutError):
        return "timeout", "timed out"
    if names & {
        "RemoteProtocolError",
        "ReadError",
        "WriteError",
        "ConnectError",
        "NetworkError",
        "ProtocolError",
        "IncompleteRead",
        "ConnectionResetError",
    }:
        return "network", f"connection dropped: {exc}"
    return "network", f"{type(exc).__name__}: {exc}"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen
