"""One scrubber for every text that leaves the process: no configured secret in any of them.

Settings register the secrets they read (`remember`); error messages, status files, the node's
routes, the CLI's output and log records all pass `redact` before they are written anywhere.
"""

from __future__ import annotations

import json
import logging

MASK = "***"
_SECRETS: set[str] = set()
_ORDERED: list[str] = []  # longest first: a secret containing another is masked whole


def remember(*secrets: str | None) -> None:
    """Mask these values (and the forms a message may quote them in) from now on."""
    added = False
    for secret in secrets:
        for form in _forms(secret) if secret else ():
            if form not in _SECRETS:
                _SECRETS.add(form)
                added = True
    if added:
        _ORDERED[:] = sorted(_SECRETS, key=len, reverse=True)


def remember_userinfo(user: str, password: str) -> None:
    """Mask an ``user:password`` pair: each part, and the Basic credentials made of them."""
    import base64

    pair = f"{user}:{password}"
    remember(password, pair, base64.b64encode(pair.encode()).decode())
    if len(user) >= 8:  # a short user name ("me") is not a secret; masking it would garble text
        remember(user)


def _forms(secret: str) -> set[str]:
    from urllib.parse import quote

    # As written, as a JSON string escapes it, as a repr quotes it, as a URL carries it.
    return {secret, json.dumps(secret)[1:-1], repr(secret)[1:-1], quote(secret, safe="")}


def has_secrets() -> bool:
    """Whether any secret is remembered (nothing to scrub otherwise)."""
    return bool(_ORDERED)


def redact(text: str) -> str:
    """`text` with every remembered secret replaced by ``***``."""
    for secret in _ORDERED:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message and traceback; it never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _ORDERED:
            return True
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class _Scrubber(logging.Handler):
    """Handles nothing itself: its filter masks each record of the package in place, before
    the record propagates to the application's own handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RedactingFilter())

    def emit(self, record: logging.LogRecord) -> None:
        # Being a handler, this one stops Python's last resort (WARNING and above to stderr
        # when the application configured no logging): stand in for it then.
        last = logging.lastResort
        if last is not None and record.levelno >= last.level and not _configured():
            last.handle(record)


def _configured() -> bool:
    package = logging.getLogger("llmlb_node")
    others = [h for h in package.handlers if not isinstance(h, _Scrubber)]
    return bool(others or (package.propagate and logging.getLogger().handlers))


def scrub_logs(logger: logging.Logger) -> None:
    """Make every record logged under `logger` (its children included) pass `redact` before
    any handler above it sees it; a handler of `logger` itself gets the filter too."""
    if not any(isinstance(h, _Scrubber) for h in logger.handlers):
        logger.handlers.insert(0, _Scrubber())
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


scrub_logs(logging.getLogger("llmlb_node"))


def redact_json(text: str) -> str:
    """`text`, a JSON document, with every secret masked in its string values only: a key or a
    number never changes, so the document stays the one the caller wrote (a secret as short as
    "e" must not turn ``"error"`` into ``"***rror"``). Text that is not JSON is masked whole."""
    if not _ORDERED:
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return redact(text)
    clean = _redact_values(value)
    return text if clean == value else json.dumps(clean, ensure_ascii=False, separators=(",", ":"))


def redact_lines(text: str) -> str:
    """An NDJSON or server-sent-events text with each JSON line (or ``data:`` payload) masked
    as `redact_json` masks a document; the framing is kept."""
    out = []
    for line in text.split("\n"):
        head, payload = ("data: ", line[6:]) if line.startswith("data: ") else ("", line)
        out.append(head + (redact_json(payload) if payload.strip() else payload))
    return "\n".join(out)


# Fields whose values come from our own fixed vocabularies (error codes, stages, object kinds),
# never from a server or a user: kept as written, so a client matching on them keeps working.
VOCABULARY_FIELDS = frozenset(
    {"object", "type", "code", "status", "stage", "kind", "role", "finish_reason", "param"}
)


def _redact_values(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redact_values(item) for item in value]
    if isinstance(value, dict):
        return {
            key: item if key in VOCABULARY_FIELDS else _redact_values(item)
            for key, item in value.items()
        }
    return value
