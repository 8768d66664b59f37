"""Loopback HTTP forward proxies capping what each benchmark node receives, in their own process.

One listener per node (the node's HTTP_PROXY): every byte the node downloads, from the Hub or
from another node, passes through its listener's token bucket, so a fleet on one machine is
bound by its network, as a real one is, rather than by the two cores it shares. Prints one JSON
line `{"ports": [...], "pid": N}`, then relays until stdin closes (or --timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from urllib.parse import urlsplit

CHUNK = 64 * 1024
HEAD_LIMIT = 64 * 1024


class Bucket:
    """A token bucket of `rate` bytes/s (20 ms burst) shared by all of one node's connections."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(float(CHUNK), rate / 50)
        self.tokens = self.burst
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


async def _head(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """An HTTP head (up to the blank line) and the bytes after it already read."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await reader.read(CHUNK)
        if not chunk or len(data) > HEAD_LIMIT:
            raise ConnectionError("no complete HTTP head")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _closing(head: bytes, first_line: bytes | None = None) -> bytes:
    """`head` with its hop-by-hop connection headers replaced by `Connection: close`: one
    request per connection, so the relay never parses a second one."""
    lines = head.split(b"\r\n")
    kept = [first_line or lines[0]] + [
        line for line in lines[1:]
        if not line.lower().startswith((b"connection:", b"proxy-connection:", b"keep-alive:"))
    ]  # fmt: skip
    return b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n"


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bucket: Bucket | None
) -> None:
    while chunk := await reader.read(CHUNK):
        if bucket is not None:
            await bucket.take(len(chunk))
        writer.write(chunk)
        await writer.drain()


async def _relay(
    bucket: Bucket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    upstream_writer = None
    try:
        head, rest = await _head(reader)
        method, target, version = head.split(b"\r\n", 1)[0].split(b" ", 2)
        url = urlsplit(target.decode("latin-1"))
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        up_reader, upstream_writer = await asyncio.open_connection(url.hostname, url.port or 80)
        first = b" ".join([method, path.encode("latin-1"), version])
        upstream_writer.write(_closing(head, first) + rest)
        await upstream_writer.drain()
        sending = asyncio.ensure_future(_pipe(reader, upstream_writer, None))
        answer, body = await _head(up_reader)
        await bucket.take(len(answer) + len(body))
        writer.write(_closing(answer) + body)
        await _pipe(up_reader, writer, bucket)
        sending.cancel()
    except (ConnectionError, OSError, ValueError, asyncio.IncompleteReadError):
        pass
    finally:
        for w in (writer, upstream_writer):
            if w is not None:
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()


async def _main(nodes: int, rate: float, timeout: float) -> None:
    servers = []
    for _ in range(nodes):
        bucket = Bucket(rate)
        server = await asyncio.start_server(lambda r, w, b=bucket: _relay(b, r, w), "127.0.0.1", 0)
        servers.append(server)
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print(json.dumps({"ports": ports, "pid": os.getpid()}), flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stdin_closed, timeout)
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="bytes/s per node")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    asyncio.run(_main(args.nodes, args.rate, args.timeout))
    os._exit(0)  # the stdin reader thread may still block


if __name__ == "__main__":
    main()
