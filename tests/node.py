"""`llmlb-node serve` as a real subprocess on a free loopback port, for tests and benchmarks.

Started with the caller's environment, stopped by its PID; its log is kept for assertions.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from servers import refused_url

_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Node:
    """One running node: its URL, an HTTP helper, and its log."""

    def __init__(self, env: Mapping[str, str], api_key: str | None = None) -> None:
        # Port 0: the node binds a free port itself and uvicorn logs which. A port picked here
        # and bound later can be taken in between (by any process's outgoing connection on a
        # busy machine), and the node would then fail to start, or a client reach another server.
        self.port = 0
        self.url = ""
        self.api_key = api_key
        self._log_dir = tempfile.mkdtemp(prefix="llmlb-node-log-")
        self.log_path = os.path.join(self._log_dir, "serve.log")
        full_env = {**env, "LLMLB_NODE_HOST": "127.0.0.1", "LLMLB_NODE_PORT": "0"}
        if api_key:
            full_env["LLMLB_NODE_API_KEY"] = api_key
        exe = os.path.join(os.path.dirname(sys.executable), "llmlb-node")
        cmd = [exe, "serve"] if os.path.exists(exe) else [sys.executable, "-m", "llmlb_node.cli"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_up()

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def _wait_up(self, timeout: float = 120.0) -> None:
        """Until uvicorn logs that it listens (after the app's startup), and on which port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = _LISTENING.search(self.log)
            if found:
                self.port = int(found.group(1))
                self.url = f"http://127.0.0.1:{self.port}"
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmlb-node serve exited {self.proc.returncode}:\n{self.log}")
            time.sleep(0.05)
        raise RuntimeError(f"llmlb-node serve did not listen within {timeout}s:\n{self.log}")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 120.0,
    ) -> tuple[int, dict[str, str], Any]:
        """Status, headers (lowercase names) and JSON (or text) body; sends the node's key."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if self.api_key and "Authorization" not in all_headers:
            all_headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data, all_headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, _lower(resp.headers), _decode(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, _lower(err.headers), _decode(err.read())

    def get(self, path: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
        return self.request("POST", path, body, **kwargs)

    def loaded(self) -> set[str]:
        """Ids /v1/models reports as loaded."""
        status, _, body = self.get("/v1/models")
        assert status == 200, body
        return {m["id"] for m in body["data"] if m["loaded"]}

    def wait_for(self, predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.log[-4000:]}")
            time.sleep(0.05)

    @property
    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def stop(self) -> int:
        """SIGINT (uvicorn's clean stop), then SIGKILL if it hangs; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._log_dir, ignore_errors=True)
        return self.proc.returncode


def _lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


@contextlib.contextmanager
def running_node(
    env: Mapping[str, str] | None = None, api_key: str | None = None, **settings: str
) -> Iterator[Node]:
    """A node with `env` (default: os.environ) plus ``LLMLB_<NAME>`` for each keyword."""
    full = dict(os.environ if env is None else env)
    full.update({f"LLMLB_{k.upper()}": str(v) for k, v in settings.items()})
    node = Node(full, api_key=api_key)
    try:
        yield node
    finally:
        node.stop()


def offline_env(home: Path | str, **settings: str) -> dict[str, str]:
    """The environment of a node whose store is `home` and which reaches no network source: none
    of the caller's ``LLMLB_*`` or ``HF_*`` settings, the Hub offline and its endpoint refusing
    connections, plus ``LLMLB_<NAME>`` for each keyword."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMLB_", "HF_"))}
    env.update(LLMLB_HOME=str(home), HF_HUB_OFFLINE="1", HF_ENDPOINT=refused_url())
    env.update({f"LLMLB_{k.upper()}": v for k, v in settings.items()})
    return env


def manual_store(tmp_path: Path, gguf_file: Path, *ids: str) -> Path:
    """An LLMLB_HOME holding `gguf_file` under each of `ids` as a hand-installed model (hard
    links where the filesystem allows, copies elsewhere)."""
    home = tmp_path / "home"
    for model_id in ids:
        target = home / "models" / model_id / "model.gguf"
        target.parent.mkdir(parents=True)
        try:
            os.link(gguf_file, target)
        except OSError:
            shutil.copyfile(gguf_file, target)
    return home
