"""Loopback Hub (+CDN) and llmlb proxy for the benchmarks, in a process of their own.

Prints one JSON line of URLs, then serves until stdin closes (or --timeout); a control port answers
GET /stats and POST /reset, /rate?bytes_per_s=N, /add_file and /add_model (JSON bodies).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "tests"))  # the servers the test-suite uses

from servers import Blob, HubServer, ProxyServer  # noqa: E402

API_KEY = "bench-key"


class Servers:
    """The Hub, its CDN and the proxy, plus what the control port can do to them."""

    def __init__(self) -> None:
        self.hub = HubServer()
        self.proxy = ProxyServer(api_key=API_KEY)
        self._blobs: dict[tuple[str, str], Blob] = {}

    def blob(self, path: str, sha256: str | None) -> Blob:
        key = (path, sha256 or "")
        if key not in self._blobs:
            self._blobs[key] = Blob.of(path, sha256=sha256)
        return self._blobs[key]

    def stats(self) -> dict[str, Any]:
        hub, cdn, proxy = self.hub, self.hub.cdn, self.proxy
        return {
            "hub_bytes": hub.bytes_sent,
            "cdn_bytes": cdn.bytes_sent,
            "proxy_bytes": proxy.bytes_sent,
            "total_bytes": hub.bytes_sent + cdn.bytes_sent + proxy.bytes_sent,
            "hub_requests": hub.request_count,
            "cdn_requests": cdn.request_count,
            "proxy_requests": proxy.request_count,
            "connections": hub.connections_opened
            + cdn.connections_opened
            + proxy.connections_opened,
            "open_connections": hub.open_connections
            + cdn.open_connections
            + proxy.open_connections,
        }

    def reset(self) -> None:
        for server in (self.hub, self.proxy):
            server.reset_counters()

    def rate(self, bytes_per_s: float | None) -> None:
        """Cap each connection of the CDN and the proxy (the Hub itself only answers 302s)."""
        self.hub.cdn.rate_limit(bytes_per_s)
        self.proxy.rate_limit(bytes_per_s)

    def close(self) -> None:
        self.hub.close()
        self.proxy.close()


def _control(servers: Servers) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, obj: Any) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if urlsplit(self.path).path == "/stats":
                self._reply(200, servers.stats())
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            split = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(split.query).items()}
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            try:
                if split.path == "/reset":
                    servers.reset()
                elif split.path == "/rate":
                    rate = float(params.get("bytes_per_s") or 0)
                    servers.rate(rate or None)
                elif split.path == "/add_file":
                    blob = servers.blob(body["path"], body.get("sha256"))
                    servers.hub.add_file(body["repo"], body["filename"], blob)
                elif split.path == "/add_model":
                    blob = servers.blob(body["path"], body.get("sha256"))
                    servers.proxy.add_model(body["id"], {body["filename"]: blob})
                else:
                    self._reply(404, {"error": "not found"})
                    return
            except (KeyError, ValueError, OSError) as exc:
                self._reply(400, {"error": repr(exc)})
                return
            self._reply(200, servers.stats())

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="control", daemon=True).start()
    return httpd


def main(argv: list[str] | None = None) -> int:
    """Serve until stdin reaches EOF or `--timeout` seconds pass."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this long")
    args = parser.parse_args(argv)
    servers = Servers()
    control = _control(servers)
    info = {
        "hub": servers.hub.url,
        "cdn": servers.hub.cdn.url,
        "proxy": servers.proxy.url,
        "control": f"http://127.0.0.1:{control.server_address[1]}",
        "api_key": API_KEY,
        "pid": os.getpid(),
    }
    print(json.dumps(info), flush=True)
    done = threading.Event()

    def watch_stdin() -> None:
        while sys.stdin.buffer.read(1 << 16):
            pass
        done.set()

    threading.Thread(target=watch_stdin, name="stdin", daemon=True).start()
    done.wait(args.timeout)
    control.shutdown()
    servers.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
