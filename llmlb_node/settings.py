"""Settings from the environment: every LLMLB_* variable and the HF_* ones we honour.

Read once into a frozen `Settings`; `Settings.from_env()` is what `ModelResolver()` uses.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .catalog import catalog_paths_from_env
from .errors import ConfigurationError
from .redact import remember, remember_userinfo

log = logging.getLogger(__name__)

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Everything the resolver needs to know about its surroundings."""

    home: Path
    models_dir: Path
    catalog_path: Path
    """The top catalog layer (the only one unless `catalog_paths` lists more)."""
    catalog_paths: tuple[Path, ...] = ()
    """Every catalog layer, lowest first; empty means just `catalog_path`."""
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
    allow_hf: bool = False
    """LLMLB_ALLOW_HF: whether ``hf:ORG/REPO...`` references resolve (see `hubref`)."""
    reuse: bool = True
    """LLMLB_REUSE: whether files other tools downloaded are looked for first (see `reuse`)."""
    hf_cache: Path | None = None
    """huggingface_hub's cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    ollama_models: Path | None = None
    """Ollama's model store (OLLAMA_MODELS, else ~/.ollama/models)."""
    lmstudio_dirs: tuple[Path, ...] = ()
    """LM Studio's model folders (~/.lmstudio/models, ~/.cache/lm-studio/models)."""

    def without_secrets(self) -> Settings:
        """These settings with every secret blanked (for pickles and anything stored)."""
        return replace(self, hf_token=None, llmlb_api_key=None, llmlb_userinfo=None)

    def with_secrets_of(self, other: Settings) -> Settings:
        """These settings with `other`'s secrets (a pickle restored in this environment)."""
        return replace(
            self,
            hf_token=other.hf_token,
            llmlb_api_key=other.llmlb_api_key,
            llmlb_userinfo=other.llmlb_userinfo,
        )

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
        allow = _allowlist(env)
        llmlb_url, userinfo = _split_userinfo(_url(env, "LLMLB_URL") or "")
        if userinfo is not None:
            for part in userinfo:
                _check_secret("LLMLB_URL", part, "its user:password@")
            remember_userinfo(*userinfo)
        catalogs = catalog_paths_from_env(env)
        settings = cls(
            home=home,
            models_dir=models,
            catalog_path=catalogs[-1],
            catalog_paths=catalogs,
            llmlb_url=llmlb_url or None,
            llmlb_userinfo=userinfo,
            llmlb_api_key=read_secret(env, "LLMLB_API_KEY"),
            origin_allowlist=allow,
            stall_timeout=_float(env, "LLMLB_STALL_TIMEOUT", 30.0),
            max_concurrent_downloads=_int(env, "LLMLB_MAX_CONCURRENT_DOWNLOADS", 2),
            download_connections=_int(env, "LLMLB_DOWNLOAD_CONNECTIONS", 4, most=64),
            hf_endpoint=_url(env, "HF_ENDPOINT") or DEFAULT_HF_ENDPOINT,
            hf_token=read_secret(env, "HF_TOKEN"),
            hf_offline=env.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE,
            allow_hf=_flag(env, "LLMLB_ALLOW_HF", False),
            reuse=_flag(env, "LLMLB_REUSE", True),
            **_foreign_stores(env),  # type: ignore[arg-type]
        )
        _check_gpu_layers(env)
        if "catalog_path" in overrides and "catalog_paths" not in overrides:
            overrides["catalog_paths"] = (Path(overrides["catalog_path"]),)  # type: ignore[arg-type]
        return replace(settings, **overrides) if overrides else settings  # type: ignore[arg-type]

    @property
    def catalog_layers(self) -> tuple[Path, ...]:
        """The catalog files to read, lowest layer first."""
        return self.catalog_paths or (self.catalog_path,)


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
    "LLMLB_N_GPU_LAYERS",
    "LLMLB_ALLOW_HF",
    "LLMLB_REUSE",
    "HF_HUB_CACHE",
    "HF_HOME",
    "XDG_CACHE_HOME",
    "OLLAMA_MODELS",
    "HOME",
)
_FROM_ENV: dict[tuple[object, ...], Settings] = {}


# Each reader raises ConfigurationError naming the variable: a typo is reported when the settings
# are read, not retried later as a network failure.
def _float(env: Mapping[str, str], key: str, default: float) -> float:
    value = env.get(key)
    if not value:
        return default
    try:
        parsed = float(value)
    except ValueError:
        raise ConfigurationError(f"{key}={value!r} is not a number (seconds, e.g. 30)") from None
    if not math.isfinite(parsed) or parsed <= 0:
        raise ConfigurationError(f"{key}={value!r} must be a positive, finite number of seconds")
    return parsed


def _int(env: Mapping[str, str], key: str, default: int, most: int | None = None) -> int:
    value = env.get(key)
    if not value:
        return default
    try:
        parsed = int(value)
    except ValueError:
        raise ConfigurationError(f"{key}={value!r} is not a whole number") from None
    if parsed < 1 or (most is not None and parsed > most):
        bound = f"between 1 and {most}" if most is not None else "at least 1"
        raise ConfigurationError(f"{key}={value!r} must be {bound}")
    return parsed


def _flag(env: Mapping[str, str], key: str, default: bool) -> bool:
    value = (env.get(key) or "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(f"{key}={env.get(key)!r} must be 1 or 0 (true/false, yes/no, on/off)")


def _foreign_stores(env: Mapping[str, str]) -> dict[str, object]:
    """Where other tools keep the models they downloaded, found as each tool finds it."""
    user = Path(env.get("HOME") or Path.home())
    cache = Path(env.get("XDG_CACHE_HOME") or user / ".cache")
    hf_home = Path(env.get("HF_HOME") or cache / "huggingface").expanduser()
    return {
        "hf_cache": Path(env.get("HF_HUB_CACHE") or hf_home / "hub").expanduser(),
        "ollama_models": Path(env.get("OLLAMA_MODELS") or user / ".ollama" / "models").expanduser(),
        "lmstudio_dirs": (user / ".lmstudio" / "models", cache / "lm-studio" / "models"),
    }


def _url(env: Mapping[str, str], key: str) -> str | None:
    """An http(s) base URL without a trailing slash, or None when unset."""
    value = (env.get(key) or "").strip()
    if not value:
        return None
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ConfigurationError(f"{key}: not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = value if "@" not in value else "<URL with credentials>"  # never print secrets
        raise ConfigurationError(
            f"{key}={shown!r} is not an http(s) URL; expected e.g. http://host:port"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(f"{key}: a base URL takes no '?query' or '#fragment'")
    return value.rstrip("/")


def read_secret(env: Mapping[str, str], key: str) -> str | None:
    """A secret from `env`, checked now and remembered by the scrubber; None when unset.

    Surrounding whitespace (a CRLF ``.env`` file) is stripped with a warning; a control or
    non-ASCII character left inside cannot go in an HTTP header: `ConfigurationError` naming
    the variable, never its value.
    """
    value = env.get(key) or ""
    stripped = value.strip()
    if stripped != value:
        remember(value)
        log.warning("%s has whitespace around its value; using it without", key)
    if not stripped:
        return None
    _check_secret(key, stripped, "its value")
    remember(stripped)
    return stripped


def _check_secret(key: str, value: str, what: str) -> None:
    bad = next((i for i, c in enumerate(value) if not " " <= c <= "~"), None)
    if bad is not None:
        remember(value)  # refused, but never echoed by anything that reports the refusal
        kind = "a non-ASCII" if ord(value[bad]) > 127 else "a control"
        raise ConfigurationError(
            f"{key}: {what} holds {kind} character (position {bad + 1}), which an HTTP header "
            f"cannot carry; set {key} again without it (the value is not shown)"
        )


def _allowlist(env: Mapping[str, str]) -> tuple[str, ...]:
    patterns = [p.strip().lower() for p in env.get("LLMLB_ORIGIN_ALLOWLIST", "").split(",")]
    for pattern in patterns:
        if "/" in pattern or "@" in pattern:
            raise ConfigurationError(
                f"LLMLB_ORIGIN_ALLOWLIST: {pattern!r} is not a host pattern; list host names "
                "such as huggingface.co,*.example.org (no scheme or path)"
            )
    return tuple(p for p in patterns if p)


def _check_gpu_layers(env: Mapping[str, str]) -> None:
    value = (env.get("LLMLB_N_GPU_LAYERS") or "").strip()
    if value and value.lower() != "auto":
        try:
            int(value)
        except ValueError:
            raise ConfigurationError(
                f"LLMLB_N_GPU_LAYERS={value!r} must be an integer (-1: all layers) or 'auto'"
            ) from None


def _split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    if not url:
        return "", None
    from .origin import split_userinfo  # ipaddress and friends: only with a proxy configured

    return split_userinfo(url)
