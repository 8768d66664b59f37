"""Shared fixtures: loopback Hub/CDN and llmlb proxy servers, and an isolated environment.

Servers are real sockets (see tests/servers.py); every fixture closes what it starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `from servers import ...` / `from gguf import ...`

from servers import (  # noqa: E402
    HubServer,
    ProxyServer,
    RecordedRequest,
    Reply,
    ScriptedServer,
    refused_url,
)

PROXY_API_KEY = "test-key"

_CLEARED = (
    "LLMLB_MODELS_DIR",
    "LLMLB_URL",
    "LLMLB_API_KEY",
    "LLMLB_ORIGIN_ALLOWLIST",
    "LLMLB_SUPPORTED_MODELS",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN_PATH",
    "HF_OIDC_RESOURCE",
)


@dataclass(frozen=True)
class LlmlbEnv:
    """Where the isolated environment points."""

    home: Path  # LLMLB_HOME
    hf_home: Path  # HF_HOME (empty: no token file, no cache)
    hf_endpoint: str  # HF_ENDPOINT (a refused port unless a test sets it)


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """A HubServer on 127.0.0.1 with its CDN on 127.0.0.2, closed after the test."""
    server = HubServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def proxy() -> Iterator[ProxyServer]:
    """A ProxyServer requiring `Authorization: Bearer test-key`, closed after the test."""
    server = ProxyServer(api_key=PROXY_API_KEY)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def llmlb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LlmlbEnv:
    """LLMLB_HOME under tmp_path, no LLMLB_*/HF token/offline settings, HF_ENDPOINT refused."""
    for name in list(os.environ):
        if name.startswith("LLMLB_"):
            monkeypatch.delenv(name)
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    env = LlmlbEnv(home=tmp_path / "home", hf_home=tmp_path / "hf", hf_endpoint=refused_url())
    monkeypatch.setenv("LLMLB_HOME", str(env.home))
    monkeypatch.setenv("HF_HOME", str(env.hf_home))
    monkeypatch.setenv("HF_ENDPOINT", env.hf_endpoint)
    # huggingface_hub reads these at import time: repoint the already-imported values too.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(env.hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(env.hf_home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return env


from world import world  # noqa: E402, F401  (the `world` fixture, for every test module)


@pytest.fixture
def chromium() -> Iterator[object]:
    """Headless Debian Chromium driven by Playwright (tests/browser.py), one per test (Playwright's
    sync API holds an event loop while it runs: asyncio.run fails in the tests after it); the tests
    that use it are skipped, naming the install command, where it is not installed."""
    from browser import launch

    yield from launch()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[RecordedRequest], Reply]], ScriptedServer]]:
    """Start scripted loopback servers (one `respond` function each); all closed at the end."""
    started: list[ScriptedServer] = []

    def start(respond: Callable[[RecordedRequest], Reply]) -> ScriptedServer:
        started.append(ScriptedServer(respond))
        return started[-1]

    yield start
    for server in started:
        server.close()
