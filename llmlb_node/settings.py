"""Settings from the environment: every LLMLB_* variable and the HF_* ones we honour.

Read once into a frozen `Settings`; `Settings.from_env()` is what `ModelResolver()` uses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .catalog import catalog_path_from_env
from .origin import split_userinfo

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Everything the resolver needs to know about its surroundings."""

    home: Path
    models_dir: Path
    catalog_path: Path
    llmlb_url: str | None = None
    """LLMLB_URL without its userinfo (safe to log and show)."""
    llmlb_userinfo: tuple[str, str] | None = field(default=None, repr=False)
    """LLMLB_URL's ``user:password@``, sent as Basic auth to that origin only."""
    llmlb_api_key: str | None = field(default=None, repr=False)
    origin_allowlist: tuple[str, ...] = ()
    stall_timeout: float = 30.0
    connect_timeout: float = 10.0
    max_concurrent_downloads: int = 2
    download_connections: int = 4
    parallel_threshold: int = 64 * 1024 * 1024
    split_below: float = 128 * 1024 * 1024
    """Bytes/s: a first connection slower than this has the rest of the file split over more."""
    hf_endpoint: str = DEFAULT_HF_ENDPOINT
    hf_token: str | None = field(default=None, repr=False)
    hf_offline: bool = False
    max_retries: int = 5
    max_stalls: int = 3
    retry_backoff: float = 0.5

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from `env` (default: os.environ); keyword overrides win."""
        if env is None and not overrides:
            # `ModelResolver()` on every request must stay cheap: reuse the settings built for
            # the same environment (and the same answer to "is there a home catalog?").
            values = tuple(os.environ.get(k) for k in _ENV_KEYS)
            home = os.path.expanduser(values[0] or "~/.llmlb")
            key = (values, os.path.isfile(os.path.join(home, "supported_models.json")))
            cached = _FROM_ENV.get(key)
            if cached is None:
                cached = _FROM_ENV[key] = cls.from_env(dict(os.environ))
            return cached
        env = os.environ if env is None else env
        home = Path(env.get("LLMLB_HOME") or Path.home() / ".llmlb").expanduser()
        models = Path(env.get("LLMLB_MODELS_DIR") or home / "models").expanduser()
        allow = tuple(
            p.strip().lower() for p in env.get("LLMLB_ORIGIN_ALLOWLIST", "").split(",") if p.strip()
        )
        llmlb_url, userinfo = split_userinfo((env.get("LLMLB_URL") or "").strip().rstrip("/"))
        settings = cls(
            home=home,
            models_dir=models,
            catalog_path=catalog_path_from_env(env),
            llmlb_url=llmlb_url or None,
            llmlb_userinfo=userinfo,
            llmlb_api_key=env.get("LLMLB_API_KEY") or None,
            origin_allowlist=allow,
            stall_timeout=_float(env, "LLMLB_STALL_TIMEOUT", 30.0),
            max_concurrent_downloads=max(1, _int(env, "LLMLB_MAX_CONCURRENT_DOWNLOADS", 2)),
            download_connections=max(1, _int(env, "LLMLB_DOWNLOAD_CONNECTIONS", 4)),
            hf_endpoint=(env.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/"),
            hf_token=env.get("HF_TOKEN") or None,
            hf_offline=env.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE,
        )
        return replace(settings, **overrides) if overrides else settings  # type: ignore[arg-type]


_ENV_KEYS = (  # LLMLB_HOME first: the cache key above reads it by position
    "LLMLB_HOME",
    "LLMLB_MODELS_DIR",
    "LLMLB_SUPPORTED_MODELS",
    "LLMLB_URL",
    "LLMLB_API_KEY",
    "LLMLB_ORIGIN_ALLOWLIST",
    "LLMLB_STALL_TIMEOUT",
    "LLMLB_MAX_CONCURRENT_DOWNLOADS",
    "LLMLB_DOWNLOAD_CONNECTIONS",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HF_HUB_OFFLINE",
    "HOME",
)
_FROM_ENV: dict[tuple[object, ...], Settings] = {}


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    value = env.get(key)
    if not value:
        return default
    try:
        parsed = float(value)
    except ValueError as exc:
        raise ValueError(f"{key}={value!r} is not a number") from exc
    if parsed <= 0:
        raise ValueError(f"{key}={value!r} must be positive")
    return parsed


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key)
    if not value:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"{key}={value!r} is not a whole number") from exc
