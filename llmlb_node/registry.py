"""What every resolver in this process shares, keyed by the store's root: the downloads in
flight, the files they are filling, how the last one ended, the installed models seen and the
parsed catalogs; and the download slots, whose limit is each caller's settings in force.

Two resolvers on one store (whatever their catalogs) therefore download a model once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StoreState:
    """One store's shared state. Mutate under `Registry.lock` (reads of one key need not)."""

    flights: dict[str, Any] = field(default_factory=dict)
    """model id -> the in-process download every thread asking for it shares (`_Flight`)."""
    filling: dict[tuple[str, str], Any] = field(default_factory=dict)
    """(model id, filename) -> the file being downloaded now (`Filling`)."""
    last_finished: Any = None
    """The final `ProgressEvent` of the last download to finish."""
    installed: dict[tuple[str, str], Any] = field(default_factory=dict)
    """(catalog layers, model id) -> (`ResolvedModel`, its files' (path, size, mtime_ns))."""
    catalogs: dict[str, Any] = field(default_factory=dict)
    """catalog layers -> (the files' (mtime_ns, size), the parsed `Catalog`)."""


class Slots:
    """At most `limit` downloads at once in this process, `limit` given by each caller (its
    settings in force), so a resolver created later with a higher limit is not held to an
    earlier one's."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.running = 0

    def try_acquire(self, limit: int) -> bool:
        with self.cond:
            if self.running >= max(1, limit):
                return False
            self.running += 1
            return True

    def acquire(self, limit: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.running < max(1, limit))
            self.running += 1

    def release(self) -> None:
        with self.cond:
            self.running -= 1
            self.cond.notify_all()


class Registry:
    """The process's one registry."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.slots = Slots()
        self._stores: dict[str, StoreState] = {}

    def store(self, root: str) -> StoreState:
        state = self._stores.get(root)
        if state is None:
            with self.lock:
                state = self._stores.setdefault(root, StoreState())
        return state


REGISTRY = Registry()
