"""The node's benchmarks (S1-S7): `llmlb-node serve` against in-process LazyLlama and against
llama-cpp-python's own server, same Gemma, same settings, same HTTP client.

Every server runs in its own process on loopback; the client (httpx, keep-alive) runs here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import ROOT, ChildError, end_process, write_catalog
from benchmarks.stats import Section, Stat, ratios
from benchmarks.suite import Context, _rotate

sys.path.insert(0, str(ROOT / "tests"))
from node import Node, free_port  # noqa: E402

N_CTX = 512
MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
NO_EOS = {"1": -100, "106": -100}  # Gemma's <eos> and <end_of_turn>: streams run their length
STORY = {"prompt": "Once upon a time", "max_tokens": 256, "logit_bias": NO_EOS, "seed": 3}
PEER_MISSING = (
    "llama_cpp.server is not installed here (it needs llama-cpp-python's `server` extra: "
    "fastapi, sse-starlette, starlette-context, pydantic-settings): the peer was not measured."
)

# In-process baseline: the same calls through LazyLlama in a fresh process, one per stdin line
# ("call" or "ttft"), so they interleave with the HTTP calls and pair up with them.
_IN_PROCESS = r"""
import json, sys, time
args = json.loads(sys.argv[1])
from llmlb_node import LazyLlama
llm = LazyLlama(args["model"], n_ctx=args["n_ctx"], verbose=False)
chat = dict(messages=args["messages"], max_tokens=16, temperature=0, seed=1)
llm.create_chat_completion(**chat)  # load + warm-up
print("ready", flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    if line.strip() == "call":
        llm.create_chat_completion(**chat)
        print(time.perf_counter() - t, flush=True)
        continue
    first = None
    for chunk in llm.create_chat_completion(**chat, stream=True):
        if first is None and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - t
    print(first, flush=True)
"""


class InProcess:
    """The in-process contender: a child running LazyLlama, driven line by line."""

    def __init__(self, model: str, env: dict[str, str]) -> None:
        args = {"model": model, "n_ctx": N_CTX, "messages": MESSAGES}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _IN_PROCESS, json.dumps(args)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        if self._read() != "ready":
            raise ChildError("the in-process baseline did not start")

    def _read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def measure(self, what: str) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return float(self._read())

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# Cold start measured by parts: resolve (download), load, first token, each on its own.
_COLD_PARTS = r"""
import json, sys, time
from llmlb_node import LazyLlama, ModelResolver
args = json.loads(sys.argv[1])
t0 = time.perf_counter(); ModelResolver().resolve(args["model"]); t1 = time.perf_counter()
llm = LazyLlama(args["model"], n_ctx=args["n_ctx"], verbose=False); llm.load()
t2 = time.perf_counter()
llm.create_chat_completion(messages=args["messages"], max_tokens=1)
t3 = time.perf_counter()
print(json.dumps({"resolve": t1 - t0, "load": t2 - t1, "first": t3 - t2}))
"""


def peer_available() -> bool:
    names = ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
    return all(importlib.util.find_spec(n) is not None for n in names)


class Peer:
    """`python -m llama_cpp.server` on a free loopback port, stopped by its PID."""

    def __init__(
        self,
        model_path: Path,
        model_id: str,
        log_dir: Path,
        n_ctx: int = N_CTX,
        threads: int | None = None,
        env: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
            "--model_alias", model_id, "--n_ctx", str(n_ctx), "--chat_format", "gemma",
            "--host", "127.0.0.1", "--port", str(self.port), "--verbose", "False",
        ]  # fmt: skip
        if threads is not None:
            cmd += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
        cmd += list(extra)
        self.log = open(log_dir / "llama_cpp_server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ChildError(f"llama_cpp.server exited {self.proc.returncode}")
            try:
                httpx.get(self.url + "/v1/models", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise ChildError("llama_cpp.server did not start within 120 s")

    def stop(self) -> None:
        end_process(self.proc)
        self.log.close()


@contextmanager
def _node(env: dict[str, str]) -> Iterator[Node]:
    node = Node(env)
    try:
        yield node
    finally:
        node.stop()


def _node_env(ctx: Context, home: Path, **settings: str) -> dict[str, str]:
    env = ctx.child_env(LLMLB_HOME=str(home), LLMLB_N_CTX=str(N_CTX))
    env.update({f"LLMLB_{k.upper()}": v for k, v in settings.items()})
    return env


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --------------------------------------------------------------------------- S1-S3: warm


CHAT = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0, "seed": 1}


def _http_call(client: httpx.Client, url: str, model: str) -> float:
    t = time.perf_counter()
    client.post(url + "/v1/chat/completions", json={"model": model, **CHAT}).raise_for_status()
    return time.perf_counter() - t


def _http_ttft(client: httpx.Client, url: str, model: str) -> float:
    body = {"model": model, "stream": True, **CHAT}
    t = time.perf_counter()
    first = float("nan")
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():  # read to the end: the connection stays reusable
            if first != first and line.startswith("data: {") and '"content"' in line:
                first = time.perf_counter() - t
    return first


def _probe_during_stream(url: str, model: str, probe: str) -> dict[str, Any]:
    """Latencies of GET `probe` every 5 ms while another client streams 256 tokens."""
    done = threading.Event()
    tokens: list[int] = []
    cut: list[str] = []
    body = {"model": model, "stream": True, **STORY}

    def stream() -> None:
        count = 0
        try:
            with (
                httpx.Client(timeout=300) as c,
                c.stream("POST", url + "/v1/completions", json=body) as r,
            ):
                for line in r.iter_lines():
                    count += line.startswith("data: {")
        except httpx.HTTPError as exc:  # llama_cpp.server may cut a stream when probed
            cut.append(f"{type(exc).__name__}: {exc}")
        finally:
            tokens.append(count)
            done.set()

    thread = threading.Thread(target=stream)
    thread.start()
    latencies, errors = [], 0
    with httpx.Client(timeout=10) as c:
        time.sleep(0.3)  # the stream is generating
        while not done.is_set():
            t = time.perf_counter()
            try:
                c.get(url + probe).raise_for_status()
                latencies.append(time.perf_counter() - t)
            except httpx.HTTPError:
                errors += 1
            time.sleep(0.005)
    thread.join()
    return {"latencies": latencies, "errors": errors, "tokens": tokens[0], "cut": len(cut)}


def bench_warm(ctx: Context) -> tuple[Section, Section, Section]:
    """S1 overhead, S2 time to first token, S3 status latency during a stream."""
    g = ctx.gemma
    assert g is not None and ctx.gemma_home is not None
    n = 3 if ctx.quick else 15
    runs = ctx.runs
    s1 = Section("S1", "serve: non-streaming chat overhead (max_tokens=16)")
    s2 = Section("S2", "serve: streaming time to first token")
    s3 = Section("S3", "serve: status route latency while a 256-token stream runs")
    logs = ctx.fresh_dir("serving-logs")
    env = _node_env(ctx, ctx.gemma_home, HF_HUB_OFFLINE="1")
    env["HF_HUB_OFFLINE"] = "1"
    peer_ok = peer_available()
    names = ["in_process", "serve"] + (["peer"] if peer_ok else [])
    rows: list[dict[str, Any]] = []
    with _node(env) as node, httpx.Client(timeout=300) as client:
        peer = Peer(g.path, g.model_id, logs) if peer_ok else None
        inproc = InProcess(g.model_id, env)
        urls = {"serve": node.url, "peer": peer.url if peer else ""}

        def measure(name: str, what: str) -> float:
            if name == "in_process":
                return inproc.measure(what)
            fn = _http_call if what == "call" else _http_ttft
            return fn(client, urls[name], g.model_id)

        try:
            for name in names:  # warm-up: loaded, prompt cached, connection open
                measure(name, "call")
            for run in range(runs):
                row: dict[str, Any] = {k: {"calls": [], "ttft": []} for k in names}
                for i in range(n):  # paired: each round measures every contender once
                    for name in _rotate(names, run + i):
                        row[name]["calls"].append(measure(name, "call"))
                    for name in _rotate(names, run + i):
                        row[name]["ttft"].append(measure(name, "ttft"))
                for name in names[1:]:
                    probe = f"/v0/models/{g.model_id}/status" if name == "serve" else "/v1/models"
                    row[name]["probe"] = _probe_during_stream(urls[name], g.model_id, probe)
                rows.append(row)
                ctx.log(f"  S1-S3: run {run + 1}/{runs}")
        finally:
            inproc.stop()
            if peer is not None:
                peer.stop()
    med = {k: [statistics.median(r[k]["calls"]) * 1000 for r in rows] for k in names}
    ttft = {k: [statistics.median(r[k]["ttft"]) * 1000 for r in rows] for k in names}
    labels = {"in_process": "in-process LazyLlama", "serve": "llmlb-node serve",
              "peer": "llama_cpp.server"}  # fmt: skip
    for k in names:
        s1.add(Stat(f"{labels[k]}: p50 of {n} calls", "ms", med[k]))
        s2.add(Stat(f"{labels[k]}: time to first token, p50", "ms", ttft[k]))
    s1.goal(Stat("serve − in-process, median of paired calls", "ms", _paired(rows, "calls")),
            "<=", 3.0, "overhead ≤ 3 ms")  # fmt: skip
    s2.goal(Stat("serve TTFT − in-process TTFT, median of pairs", "ms", _paired(rows, "ttft")),
            "<=", 5.0, "TTFT ≤ in-process + 5 ms")  # fmt: skip
    if peer_ok:
        s1.goal(Stat("serve ÷ llama_cpp.server, p50", "×", ratios(med["serve"], med["peer"])),
                "<=", 1.0, "serve ≤ llama_cpp.server")  # fmt: skip
        s2.add(Stat("serve ÷ llama_cpp.server, TTFT", "×", ratios(ttft["serve"], ttft["peer"])))
    else:
        for s in (s1, s2, s3):
            s.notes.append(PEER_MISSING)
    p99 = [_p(r["serve"]["probe"]["latencies"], 0.99) * 1000 for r in rows]
    s3.goal(Stat("serve: GET /v0/models/{id}/status p99", "ms", p99), "<=", 20.0, "p99 ≤ 20 ms")
    s3.add(Stat("serve: status probes per run", "count",
                [len(r["serve"]["probe"]["latencies"]) for r in rows]))  # fmt: skip
    s3.add(Stat("serve: tokens streamed meanwhile", "count",
                [r["serve"]["probe"]["tokens"] for r in rows]))  # fmt: skip
    if peer_ok:
        peer_p99 = [_p(r["peer"]["probe"]["latencies"], 0.99) * 1000 for r in rows]
        s3.add(Stat("llama_cpp.server: GET /v1/models p99", "ms", peer_p99))
        s3.add(Stat("llama_cpp.server: tokens streamed meanwhile", "count",
                    [r["peer"]["probe"]["tokens"] for r in rows]))  # fmt: skip
        s3.add(Stat("llama_cpp.server: failed probes", "count",
                    [r["peer"]["probe"]["errors"] for r in rows]))  # fmt: skip
        s3.add(Stat("llama_cpp.server: streams cut off by the probes", "count",
                    [r["peer"]["probe"]["cut"] for r in rows]))  # fmt: skip
    s3.add(Stat("serve: streams cut off by the probes", "count",
                [r["serve"]["probe"]["cut"] for r in rows]))  # fmt: skip
    s1.notes.append(
        f"{runs} runs of {n} calls each after a warm-up; n_ctx={N_CTX}, chat_format gemma, "
        "temperature 0, seed 1, the same prompt. HTTP over loopback with one keep-alive httpx "
        "client; the in-process figure is LazyLlama in a child process. Calls alternate "
        "(serve, in-process, peer, rotated), so each difference pairs two calls made moments "
        "apart: the machine's drift cancels out."
    )
    s3.notes.append(
        "A client streams 256 tokens (EOS masked with logit_bias) while another polls every 5 ms."
    )
    return s1, s2, s3


def _paired(rows: list[dict[str, Any]], key: str) -> list[float]:
    """Per run, the median of serve − in-process over calls made side by side (ms)."""
    return [
        statistics.median(a - b for a, b in zip(r["serve"][key], r["in_process"][key], strict=True))
        * 1000
        for r in rows
    ]


# --------------------------------------------------------------------------- S4, S5: cold


def _cold_env(ctx: Context, name: str) -> tuple[dict[str, str], Path]:
    g = ctx.gemma
    assert g is not None
    home = ctx.fresh_dir(name)
    entry = g.catalog_entry([{"type": "huggingface", "repo": g.repo}])
    catalog = write_catalog(home / "catalog.json", [entry])
    env = _node_env(ctx, home, SUPPORTED_MODELS=str(catalog))
    return env, home


def bench_cold(ctx: Context) -> Section:
    """S4: empty store, first chat request to answer vs resolve + load + first token alone."""
    g = ctx.gemma
    assert g is not None
    s = Section("S4", "serve: cold store, first chat request to answer")
    rows = []
    for run in range(ctx.runs):
        env, _ = _cold_env(ctx, "cold-parts")
        args = {"model": g.model_id, "n_ctx": N_CTX, "messages": MESSAGES}
        proc = subprocess.run(
            [sys.executable, "-c", _COLD_PARTS, json.dumps(args)],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if proc.returncode:
            raise ChildError(f"cold parts failed: {proc.stderr[-2000:]}")
        parts = json.loads(proc.stdout.strip().splitlines()[-1])
        env, _ = _cold_env(ctx, "cold-serve")
        with _node(env) as node, httpx.Client(timeout=900) as client:
            body = {"model": g.model_id, "messages": MESSAGES, "max_tokens": 1}
            t = time.perf_counter()
            client.post(node.url + "/v1/chat/completions", json=body).raise_for_status()
            parts["serve"] = time.perf_counter() - t
        rows.append(parts)
        ctx.log(f"  S4: run {run + 1}/{ctx.runs}: serve {parts['serve']:.2f}s")
    total = [r["resolve"] + r["load"] + r["first"] for r in rows]
    for key, label in (("resolve", "resolve (download 253 MB from the loopback Hub)"),
                       ("load", "load"), ("first", "first token")):  # fmt: skip
        s.add(Stat(f"on their own: {label}", "s", [r[key] for r in rows]))
    s.add(Stat("on their own: sum", "s", total))
    s.add(Stat("serve: request sent → answer", "s", [r["serve"] for r in rows]))
    s.goal(
        Stat("serve ÷ sum of the parts", "×", ratios([r["serve"] for r in rows], total)),
        "<=", 1.1, "≤ 1.1 × (resolve + load + first token)",
    )  # fmt: skip
    return s


def bench_concurrent_cold(ctx: Context) -> Section:
    """S5: 16 concurrent first requests for a model not on disk."""
    g = ctx.gemma
    assert g is not None
    s = Section("S5", "serve: 16 concurrent first requests on a cold model")
    rows = []
    for run in range(1 if ctx.quick else 3):
        env, _ = _cold_env(ctx, "cold-16")
        ctx.servers.reset()
        with _node(env) as node:
            statuses: list[int] = []
            body = {"model": g.model_id, "messages": MESSAGES, "max_tokens": 3}

            def ask(body: dict = body, url: str = node.url, out: list = statuses) -> None:
                with httpx.Client(timeout=900) as c:
                    out.append(c.post(url + "/v1/chat/completions", json=body).status_code)

            threads = [threading.Thread(target=ask) for _ in range(16)]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t
            log = node.log
        stats = ctx.servers.stats()
        rows.append({
            "wall": wall, "answers": statuses.count(200), "errors": 16 - statuses.count(200),
            "loads": log.count(f"{g.model_id}: loaded in"),
            "downloads": log.count(f"{g.model_id}: installed from"),
            "bytes": stats["cdn_bytes"] / g.size,
        })  # fmt: skip
        ctx.log(f"  S5: run {run + 1}: {rows[-1]}")
    s.goal(Stat("answers", "count", [r["answers"] for r in rows]), ">=", 16, "16 answers")
    s.goal(Stat("errors", "count", [r["errors"] for r in rows]), "<=", 0, "0 errors")
    s.goal(Stat("downloads", "count", [r["downloads"] for r in rows]), "<=", 1, "1 download")
    s.goal(Stat("loads", "count", [r["loads"] for r in rows]), "<=", 1, "1 load")
    s.add(Stat("bytes served by the Hub's CDN ÷ file size", "×", [r["bytes"] for r in rows]))
    s.add(Stat("wall time, first request to last answer", "s", [r["wall"] for r in rows]))
    return s


# --------------------------------------------------------------------------- S6, S7


def bench_two_models(ctx: Context) -> Section:
    """S6: a short request to model B finishes while model A streams a long answer."""
    g = ctx.gemma
    assert g is not None
    s = Section("S6", "serve: two models at once")
    home = ctx.fresh_dir("two-models")
    for model_id in ("gemma-a", "gemma-b"):
        target = home / "models" / model_id / "model.gguf"
        target.parent.mkdir(parents=True)
        try:
            os.link(g.path, target)
        except OSError:
            shutil.copyfile(g.path, target)
    rows = []
    with _node(_node_env(ctx, home)) as node, httpx.Client(timeout=300) as client:
        short = {"model": "gemma-b", "prompt": "Hello", "max_tokens": 4}
        for model_id in ("gemma-a", "gemma-b"):  # both loaded first
            client.post(node.url + "/v1/completions", json={**short, "model": model_id})
        for run in range(ctx.runs):
            t = time.perf_counter()
            client.post(node.url + "/v1/completions", json=short).raise_for_status()
            alone = time.perf_counter() - t
            ended: list[float] = []

            def stream(url: str = node.url, ended: list[float] = ended) -> None:
                body = {"model": "gemma-a", "stream": True, **STORY}
                with (
                    httpx.Client(timeout=300) as c,
                    c.stream("POST", url + "/v1/completions", json=body) as r,
                ):
                    for _ in r.iter_lines():
                        pass
                ended.append(time.perf_counter())

            thread = threading.Thread(target=stream)
            thread.start()
            time.sleep(0.5)
            t = time.perf_counter()
            client.post(node.url + "/v1/completions", json=short).raise_for_status()
            finished = time.perf_counter()
            thread.join()
            rows.append({"alone": alone, "during": finished - t,
                         "before_a": 1.0 if finished < ended[0] else 0.0})  # fmt: skip
            ctx.log(f"  S6: run {run + 1}/{ctx.runs}: B took {finished - t:.3f}s during A")
    s.goal(Stat("B finished while A was still streaming", "count",
                [r["before_a"] for r in rows]), ">=", 1, "B done before A, every run")  # fmt: skip
    s.add(Stat("B, 4 tokens, while A streams", "s", [r["during"] for r in rows]))
    s.add(Stat("B, 4 tokens, alone", "s", [r["alone"] for r in rows]))
    s.notes.append(
        "A streams 256 tokens from gemma-a; B asks gemma-b (the same file installed twice) for "
        "4 tokens 0.5 s later. llama_cpp.server serves one model at a time behind one lock, so it "
        "has no counterpart here."
    )
    return s


def bench_idle_rss(ctx: Context) -> Section:
    """S7: resident memory of the idle node with nothing loaded."""
    s = Section("S7", "serve: RSS of the idle node, nothing loaded")
    rss = []
    for _ in range(1 if ctx.quick else 3):
        home = ctx.fresh_dir("idle")
        with _node(_node_env(ctx, home)) as node:
            for path in ("/v1/models", "/v0/supported-models", "/v1/models/gemma-3-270m"):
                httpx.get(node.url + path, timeout=30)
            time.sleep(0.5)
            rss.append(_rss_mib(node.proc.pid))
    s.goal(Stat("VmRSS after answering the model routes", "MiB", rss), "<=", 80, "≤ 80 MiB")
    s.notes.append(
        "The `llmlb-node serve` process after answering /v1/models, /v0/supported-models and "
        "/v1/models/{id} (catalog parsed, Starlette and uvicorn imported), from /proc/PID/status."
    )
    return s
