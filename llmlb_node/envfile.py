"""``$LLMLB_HOME/.env`` (``~/.llmlb/.env``): HF_TOKEN and LLMLB_* variables kept in a file.

The command reads it once at start, before anything reads the environment; a variable the
process environment sets already wins. Values (tokens) are never logged.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, MutableMapping
from pathlib import Path

from .errors import ConfigurationError

log = logging.getLogger(__name__)

_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")


def envfile_path(env: MutableMapping[str, str]) -> Path:
    """``$LLMLB_HOME/.env``, LLMLB_HOME as the process environment has it (or ``~/.llmlb``)."""
    return Path(env.get("LLMLB_HOME") or Path.home() / ".llmlb").expanduser() / ".env"


def load_envfile(env: MutableMapping[str, str] | None = None) -> list[str]:
    """Set in `env` (default: os.environ) each HF_TOKEN and LLMLB_* variable of the file that
    `env` does not set already. Returns the names set. A line that is not ``NAME=value`` is a
    `ConfigurationError` naming the file and line; other variables are skipped with a warning."""
    env = os.environ if env is None else env
    path = envfile_path(env)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path}: cannot be read ({exc})") from None
    loaded = []
    for name, value in parse_envfile(text, path):
        if not (name == "HF_TOKEN" or name.startswith("LLMLB_")):
            log.warning("%s: %s is not read from this file (only HF_TOKEN and LLMLB_*)", path, name)
        elif name not in env:
            env[name] = value
            loaded.append(name)
    if loaded:
        log.debug("%s: read %s", path, ", ".join(loaded))
    return loaded


def parse_envfile(text: str, path: Path) -> Iterator[tuple[str, str]]:
    """``NAME=value`` pairs: blank lines and ``#`` comments skipped, an ``export`` prefix allowed,
    a value in matching single or double quotes taken verbatim, an unquoted one up to `` #``."""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:  # the line itself may hold a secret: only its number is shown
            raise ConfigurationError(f"{path} line {number}: expected NAME=value")
        yield match.group(1), _value(match.group(2))


def _value(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value.split(" #", 1)[0].strip()
