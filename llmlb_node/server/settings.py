"""The node's settings: the LLMLB_NODE_* and pool variables, on top of the library's `Settings`.

Read once at start-up by `llmlb-node serve`; tests build them with `ServerSettings.from_env(env)`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..settings import Settings, read_secret
from .memory import MemoryBudget

_DURATION = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
FOREVER = 10 * 365 * 86400.0
"""A keep-alive this long (ten years) or longer is kept forever, like ``-1``."""
ADVERTISE = ("installed", "catalog")
"""LLMLB_ADVERTISE's values; the first is the default."""


def parse_duration(value: object, name: str = "keep_alive") -> float:
    """Seconds from ``300``, ``"30s"``, ``"5m"``, ``"1h"``; ``-1`` means forever (any negative
    value, or ten years and more)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a duration like '5m', 30 or -1, not {value!r}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond any float
            seconds = math.inf
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"{name} must be a duration like '5m', '30s', 0 or -1, not {value!r}")
    if not math.isfinite(seconds):  # NaN would break the idle timers' ordering, inf overflow
        raise ValueError(f"{name} must be a finite duration, not {value!r}")
    # Past FOREVER no clock or date can hold the expiry (/api/ps's would overflow): the same.
    return -1.0 if seconds < 0 or seconds >= FOREVER else seconds


@dataclass(frozen=True)
class ServerSettings:
    """Everything `llmlb-node serve` reads from the environment."""

    library: Settings
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = field(default=None, repr=False)
    max_queue: int = 32
    """Requests waiting per model (beyond the one running) before 429 server_busy."""
    max_loaded_models: int = 2
    keep_alive: float = 300.0
    """Seconds an idle model stays loaded; 0 unloads after each request, -1 never."""
    load_wait: float = 60.0
    """Seconds a request waits for download + load before 503 model_loading: below the llmlb
    load balancer's 120 s timeout over a whole response, leaving the rest for the answer."""
    advertise: str = "installed"
    """What /v1/models lists: ``installed`` (runnable models on disk) or ``catalog`` (every
    runnable catalog model too, downloaded on first use)."""
    failure_ttl: float = 10.0
    """Seconds a failed download or load is answered from memory before the next retry."""
    n_ctx: int = 4096
    n_threads: int | None = None
    """CPU threads per loaded model (generation and prompt); None: llama.cpp's choice."""
    parallel: int = 4
    """Sequences of one model generated together (its engine's batch), each with n_ctx cells."""
    memory_budget: MemoryBudget = field(default_factory=MemoryBudget)
    """How much memory loaded models may hold (LLMLB_MEMORY_BUDGET, default 90% of available)."""
    shutdown_grace: float = 30.0
    """Seconds requests in flight get to finish after SIGTERM/SIGINT."""
    heartbeat: float = 4.0
    """Seconds between SSE comment lines while a streaming request waits."""
    cors_origins: tuple[str, ...] = ()
    """Origins a browser page may call the node from (LLMLB_NODE_CORS_ORIGINS); ``*`` any."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> ServerSettings:
        """Build settings from `env` (default: os.environ); keyword overrides win."""
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {
            "library": Settings.from_env(env),
            "host": env.get("LLMLB_NODE_HOST") or "127.0.0.1",
            "port": _int(env, "LLMLB_NODE_PORT", 8080, minimum=0),
            "api_key": read_secret(env, "LLMLB_NODE_API_KEY"),
            "max_queue": _int(env, "LLMLB_MAX_QUEUE", 32, minimum=0),
            "max_loaded_models": _int(env, "LLMLB_MAX_LOADED_MODELS", 2, minimum=1),
            "keep_alive": parse_duration(env.get("LLMLB_KEEP_ALIVE") or "5m", "LLMLB_KEEP_ALIVE"),
            "load_wait": _seconds(env, "LLMLB_LOAD_WAIT", 60.0),
            "advertise": _choice(env, "LLMLB_ADVERTISE", ADVERTISE),
            "failure_ttl": _seconds(env, "LLMLB_RETRY_FAILED_AFTER", 10.0),
            "n_ctx": _int(env, "LLMLB_N_CTX", 4096, minimum=0),
            "n_threads": _int(env, "LLMLB_N_THREADS", 0, minimum=0) or None,
            "parallel": _int(env, "LLMLB_PARALLEL", 4, minimum=1),
            "shutdown_grace": _seconds(env, "LLMLB_SHUTDOWN_GRACE", 30.0),
            "memory_budget": MemoryBudget.parse(env.get("LLMLB_MEMORY_BUDGET")),
            "cors_origins": _origins(env.get("LLMLB_NODE_CORS_ORIGINS") or ""),
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def _int(env: Mapping[str, str], key: str, default: int, minimum: int) -> int:
    value = env.get(key)
    if not value:
        return default
    try:
        parsed = int(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not a whole number") from None
    if parsed < minimum:
        raise ValueError(f"{key}={value!r} must be at least {minimum}")
    return parsed


def _choice(env: Mapping[str, str], key: str, choices: tuple[str, ...]) -> str:
    value = (env.get(key) or choices[0]).strip().lower()
    if value not in choices:
        raise ValueError(f"{key}={env.get(key)!r} must be one of {', '.join(choices)}")
    return value


_ORIGIN = re.compile(r"https?://[^/\s?#]+")


def _origins(value: str) -> tuple[str, ...]:
    """Comma-separated origins (``scheme://host[:port]``, no path) or ``*``."""
    origins = tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ValueError(
                f"LLMLB_NODE_CORS_ORIGINS: {origin!r} is not an origin; list them as "
                "https://app.example.org,http://localhost:3000 (scheme, host, port), or *"
            )
    return origins


def _seconds(env: Mapping[str, str], key: str, default: float) -> float:
    value = env.get(key)
    if not value:
        return default
    seconds = parse_duration(value, key)
    if seconds < 0:
        raise ValueError(f"{key}={value!r} must not be negative")
    return seconds
