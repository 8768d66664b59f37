"""The fleet's benchmarks (F1-F3): what the llmlb load balancer sees, and nodes feeding nodes.

F1: `/api/health` and `/api/system` latency while the node downloads, loads and generates.
F2: one seed node reaches the loopback Hub; the other nodes may not (their allowlist excludes it)
and have the seed as their LLMLB_URL; all receive a first chat request for cold Gemma at once.
F3: F2 bound by the network, as a real fleet is: every node receives through its own loopback
relay (benchmarks/relay.py) capped at 25 MB/s, the Hub capped the same, so the CPU mostly idles.
Every node is a real `llmlb-node serve` process on loopback; the client runs here.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx

from benchmarks.harness import BENCH_DIR, ROOT, write_catalog
from benchmarks.stats import Section, Stat, ratios
from benchmarks.suite import Context

sys.path.insert(0, str(ROOT / "tests"))
from node import Node  # noqa: E402

N_CTX = 512
MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
NO_EOS = {"1": -100, "106": -100}  # Gemma's <eos> and <end_of_turn>: the stream runs its length
SEED_KEY = "seed-node-key"
# The fleet's nodes share this machine's cores, so each llama.cpp gets one thread (the peer too):
# seven thread pools each sized for the whole machine spin against each other.
FLEET_NODE = {"n_threads": "1", "load_wait": "900"}
# The nodes are asked directly for a model they do not have (no load balancer in front, which
# would route it only to nodes listing it): the 60 s default load wait is not what is measured.
HUB_RATE = 60_000_000  # bytes/s per connection in F1: the download lasts a few seconds
NET_RATE = 25_000_000  # F3: bytes/s into each node (through its relay), and per Hub connection
# F3: one connection per download. Under a per-node cap more ranges add no speed, and a seed
# filling four ranges at once has only the first one's bytes in order for the nodes it feeds.
NET_NODE = {**FLEET_NODE, "download_connections": "1"}
RELAY = BENCH_DIR / "relay.py"


@contextmanager
def _node(env: dict[str, str], api_key: str | None = None) -> Iterator[Node]:
    node = Node(env, api_key=api_key)
    try:
        yield node
    finally:
        node.stop()


def _cold_env(ctx: Context, name: str, **settings: str) -> dict[str, str]:
    """A node with an empty store whose catalog has Gemma from the loopback Hub only."""
    g = ctx.gemma
    assert g is not None
    home = ctx.fresh_dir(name)
    entry = g.catalog_entry([{"type": "huggingface", "repo": g.repo}])
    catalog = write_catalog(home / "catalog.json", [entry])
    env = ctx.child_env(
        LLMLB_HOME=str(home), LLMLB_N_CTX=str(N_CTX), LLMLB_SUPPORTED_MODELS=str(catalog)
    )
    env.update({f"LLMLB_{k.upper()}": v for k, v in settings.items()})
    return env


def _installed_after(log: str, model: str, since: float) -> float:
    """Seconds from `since` (a time.time()) to the node's "installed from" log line."""
    match = re.search(rf"^(\S+ \S+) INFO \S+: {re.escape(model)}: installed from", log, re.M)
    if match is None:
        return float("inf")
    stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return stamp - since


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _first_token(url: str, model: str, api_key: str | None = None, **extra: Any) -> float:
    """Seconds from sending a streaming chat request to its first content token (read to the
    end); raises if the node answers an error."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "messages": MESSAGES, "max_tokens": 8, "stream": True, **extra}
    started = time.perf_counter()
    first = None
    with (
        httpx.Client(timeout=900, headers=headers) as client,
        client.stream("POST", url + "/v1/chat/completions", json=body) as response,
    ):
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and '"content"' in line:
                first = time.perf_counter() - started
            if line.startswith("data: {") and '"error"' in line:
                raise RuntimeError(f"{url}: {line[:300]}")
    if first is None:
        raise RuntimeError(f"{url}: the stream had no content")
    return first


# --------------------------------------------------------------------------- F1


def bench_health(ctx: Context) -> Section:
    """F1: the LB's polls answered from memory while a cold model downloads, loads, generates."""
    g = ctx.gemma
    assert g is not None
    s = Section("F1", "LB polls (/api/health, /api/system) during download, load and generation")
    phases: dict[str, list[float]] = {"download": [], "load": [], "generation": []}
    system: list[float] = []
    idle: list[float] = []
    errors = 0
    for run in range(min(ctx.runs, 3)):
        ctx.servers.rate(HUB_RATE)
        try:
            with _node(_cold_env(ctx, "health")) as node:
                idle.extend(_poll_idle(node.url, seconds=2.0))
                row = _poll_through_a_cold_request(node.url, g.model_id)
        finally:
            ctx.servers.rate(None)
        for phase, values in row["phases"].items():
            phases[phase].extend(values)
        system.extend(row["system"])
        errors += row["errors"]
        counts = {k: len(v) for k, v in row["phases"].items()}
        ctx.log(f"  F1: run {run + 1}: polls per phase {counts}, errors {row['errors']}")
    every = [v for values in phases.values() for v in values]
    for phase, values in phases.items():
        s.add(Stat(f"/api/health p99 while the model is in {phase}", "ms", [_p(values, 0.99)]))
    s.goal(Stat("/api/health p99, all phases", "ms", [_p(every, 0.99)]), "<=", 20, "p99 ≤ 20 ms")
    s.goal(Stat("/api/system p99, all phases", "ms", [_p(system, 0.99)]), "<=", 20, "p99 ≤ 20 ms")
    s.add(Stat("/api/health p50, all phases", "ms", [_p(every, 0.5)]))
    s.add(
        Stat("peer: /api/health p99 on the same node idle (this machine's floor)", "ms",
             [_p(idle, 0.99)])
    )  # fmt: skip
    s.add(Stat("polls", "count", [len(every) + len(system)]))
    s.goal(Stat("failed polls", "count", [errors]), "<=", 0, "every poll answered")
    return s


def _poll_idle(url: str, seconds: float) -> list[float]:
    """/api/health latencies (ms) polled every 5 ms for `seconds` on a node doing nothing."""
    out = []
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < deadline:
            t = time.perf_counter()
            client.get(url + "/api/health").raise_for_status()
            out.append((time.perf_counter() - t) * 1000)
            time.sleep(0.005)
    return out


def _poll_through_a_cold_request(url: str, model: str) -> dict[str, Any]:
    """Poll like an impatient LB (every 5 ms) while one client's first request downloads, loads
    and streams 128 tokens; each latency is filed under the phase the health body reports."""
    done = threading.Event()
    failure: list[BaseException] = []

    def ask() -> None:
        try:
            _first_token(url, model, max_tokens=128, logit_bias=NO_EOS)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            failure.append(exc)
        done.set()

    thread = threading.Thread(target=ask)
    thread.start()
    phases: dict[str, list[float]] = {"download": [], "load": [], "generation": []}
    system: list[float] = []
    errors = 0
    with httpx.Client(timeout=10) as client:
        while not done.is_set():
            try:
                t = time.perf_counter()
                body = client.get(url + "/api/health").raise_for_status().json()
                elapsed = (time.perf_counter() - t) * 1000
                t = time.perf_counter()
                client.get(url + "/api/system").raise_for_status()
                system.append((time.perf_counter() - t) * 1000)
            except httpx.HTTPError:
                errors += 1
                continue
            if body["sync_state"] == "running":
                phases["download"].append(elapsed)
            elif body["loaded_models"]:
                phases["generation"].append(elapsed)
            else:
                phases["load"].append(elapsed)
            time.sleep(0.005)
    thread.join()
    if failure:
        raise failure[0]
    return {"phases": phases, "system": system, "errors": errors}


# --------------------------------------------------------------------------- F2


def bench_fleet(ctx: Context) -> Section:
    """F2: a seed node and N-1 nodes fed by it, all asked for cold Gemma at once."""
    g = ctx.gemma
    assert g is not None
    size = 3 if ctx.quick else 7
    s = Section("F2", f"Fleet: {size} nodes, one Hub copy, first chat request at once")
    rows = []
    for run in range(1 if ctx.quick else 3):
        with _node(_cold_env(ctx, "single", **FLEET_NODE)) as node:
            sent = time.time()
            single = _first_token(node.url, g.model_id)
            single_installed = _installed_after(node.log, g.model_id, sent)
        row = _fleet_run(ctx, size)
        row.update(single=single, single_installed=single_installed)
        rows.append(row)
        ctx.log(
            f"  F2: run {run + 1}: single {single:.2f}s (installed {single_installed:.2f}s), "
            f"last of {size} {row['last']:.2f}s (installed {row['installed']:.2f}s), "
            f"Hub {row['hub'] / g.size:.3f}×, answers {row['answers']}"
        )
    last = [r["last"] for r in rows]
    single = [r["single"] for r in rows]
    s.add(Stat("one node alone: request → first token (cold store, from the Hub)", "s", single))
    alone = [r["single_installed"] for r in rows]
    everyone = [r["installed"] for r in rows]
    s.add(Stat("one node alone: request → model installed", "s", alone))
    s.add(Stat(f"fleet of {size}: request → model installed on every node", "s", everyone))
    s.add(Stat("every node installed ÷ one node alone", "×", ratios(everyone, alone)))
    s.add(Stat(f"fleet of {size}: first node's first token", "s", [r["first"] for r in rows]))
    s.add(Stat(f"fleet of {size}: last node's first token", "s", last))
    s.goal(
        Stat("last node's first token ÷ one node alone", "×", ratios(last, single)),
        "<=",
        2.0,
        "≤ 2 × a single node's cold start",
    )
    s.goal(
        Stat("bytes served by the Hub ÷ model size", "×", [r["hub"] / g.size for r in rows]),
        "<=",
        1.05,
        "≤ 1.05 × the model's size",
    )
    s.goal(Stat("nodes that answered", "count", [r["answers"] for r in rows]), ">=", size, "all")
    return s


def _fleet_run(
    ctx: Context,
    size: int,
    node: dict[str, str] = FLEET_NODE,
    via: Callable[[int], dict[str, str]] = lambda i: {},
) -> dict[str, Any]:
    """One seed and `size - 1` nodes fed by it; `via(i)` adds node i's environment."""
    g = ctx.gemma
    assert g is not None
    with ExitStack() as stack:
        seed_env = {**_cold_env(ctx, "seed", **node), **via(0)}
        seed = stack.enter_context(_node(seed_env, api_key=SEED_KEY))
        fed = {
            "LLMLB_URL": seed.url,
            "LLMLB_API_KEY": SEED_KEY,
            "LLMLB_ORIGIN_ALLOWLIST": "none.invalid",  # the Hub is not allowed
        }
        nodes = [seed]
        for i in range(size - 1):
            env = {**_cold_env(ctx, f"fed-{i}", **node), **fed, **via(i + 1)}
            nodes.append(stack.enter_context(_node(env)))
        ctx.servers.reset()
        results: dict[int, float | BaseException] = {}
        go = threading.Barrier(len(nodes) + 1)

        def ask(i: int, node: Node) -> None:
            go.wait()
            try:
                results[i] = _first_token(node.url, g.model_id, node.api_key)
            except BaseException as exc:  # noqa: BLE001 - counted as a node that did not answer
                results[i] = exc
                ctx.log(f"  F2: node {i} failed: {exc}\n{node.log[-2000:]}")

        threads = [threading.Thread(target=ask, args=(i, n)) for i, n in enumerate(nodes)]
        for t in threads:
            t.start()
        go.wait()
        sent = time.time()
        for t in threads:
            t.join()
        stats = ctx.servers.stats()
        each = [_installed_after(n.log, g.model_id, sent) for n in nodes]
    times = [r for r in results.values() if isinstance(r, float)]
    return {
        "first": min(times, default=float("nan")),
        "last": max(times) if len(times) == len(nodes) else float("inf"),
        "answers": len(times),
        "installed": max(each),
        "seed_installed": each[0],
        "hub": stats["hub_bytes"] + stats["cdn_bytes"],
    }


# --------------------------------------------------------------------------- F3


class Relays:
    """benchmarks/relay.py in its own process: one capped forward proxy per node."""

    def __init__(self, nodes: int, rate: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(RELAY), "--nodes", str(nodes), "--rate", str(rate)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.ports: list[int] = json.loads(self.proc.stdout.readline())["ports"]

    def env(self, i: int) -> dict[str, str]:
        """Node i's environment: every HTTP request it makes goes through its relay."""
        proxy = f"http://127.0.0.1:{self.ports[i]}"
        return {"HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}

    def __enter__(self) -> Relays:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its PID
            self.proc.wait(5)


def bench_network_fleet(ctx: Context) -> Section:
    """F3: F2 with every node's inbound bytes, and each Hub connection, capped at 25 MB/s."""
    g = ctx.gemma
    assert g is not None
    size = 3 if ctx.quick else 7
    mb = NET_RATE / 1e6
    s = Section("F3", f"Fleet, network-bound: {size} nodes, each receiving ≤ {mb:g} MB/s")
    rows = []
    ctx.servers.rate(NET_RATE)
    try:
        for run in range(1 if ctx.quick else 3):
            rows.append(_network_run(ctx, size))
            r = rows[-1]
            ctx.log(
                f"  F3: run {run + 1}: single installed {r['single_installed']:.2f}s, "
                f"every node of {size} {r['installed']:.2f}s (seed {r['seed_installed']:.2f}s), "
                f"Hub {r['hub'] / g.size:.3f}×, answers {r['answers']}, "
                f"CPU busy {100 * r['busy']:.0f}%"
            )
    finally:
        ctx.servers.rate(None)
    alone = [r["single_installed"] for r in rows]
    everyone = [r["installed"] for r in rows]
    s.add(Stat(f"one node alone at {mb:g} MB/s: request → model installed", "s", alone))
    s.add(Stat(f"fleet of {size}: request → model installed on every node", "s", everyone))
    s.add(Stat("one node alone: first token", "s", [r["single"] for r in rows]))
    s.add(Stat(f"fleet of {size}: last node's first token", "s", [r["last"] for r in rows]))
    busy = [100 * r["busy"] for r in rows]
    s.add(Stat("machine CPU busy during the fleet's run (every process on it)", "%", busy))
    s.goal(
        Stat("last node installed ÷ one node alone", "×", ratios(everyone, alone)),
        "<=",
        1.5,
        "≤ 1.5 × one node alone at the same cap",
    )
    s.goal(
        Stat("bytes served by the Hub ÷ model size", "×", [r["hub"] / g.size for r in rows]),
        "<=",
        1.05,
        "≤ 1.05 × the model's size",
    )
    s.goal(Stat("nodes that answered", "count", [r["answers"] for r in rows]), ">=", size, "all")
    return s


def _network_run(ctx: Context, size: int) -> dict[str, Any]:
    g = ctx.gemma
    assert g is not None
    with Relays(1, NET_RATE) as relay, _node(_relayed(ctx, "net-single", relay)) as node:
        sent = time.time()
        single = _first_token(node.url, g.model_id)
        single_installed = _installed_after(node.log, g.model_id, sent)
    with Relays(size, NET_RATE) as relays:
        before = _cpu_times()
        row = _fleet_run(ctx, size, NET_NODE, relays.env)
        busy = _busy_since(before)
    return {**row, "single": single, "single_installed": single_installed, "busy": busy}


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, every process counted (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _busy_since(before: tuple[int, int]) -> float:
    busy, total = _cpu_times()
    return (busy - before[0]) / max(1, total - before[1])


def _relayed(ctx: Context, name: str, relay: Relays) -> dict[str, str]:
    return {**_cold_env(ctx, name, **NET_NODE), **relay.env(0)}
