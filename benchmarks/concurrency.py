"""Many clients, one model (C1, C2): N concurrent streaming clients against the node's engine
(LLMLB_PARALLEL 4 and 8), llama_cpp.server, and llama.cpp's own llama-server (--parallel 4, 8)
built from the llama.cpp that the installed llama-cpp-python vendors; and the worst token gap of
a running stream while a 2,000-token prompt joins.

Every server gets the same Gemma, 4096 context cells in total, 2 threads, OMP_WAIT_POLICY=PASSIVE.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.harness import ChildError, end_process
from benchmarks.serving import NO_EOS, Peer, _node, _node_env, _p, peer_available
from benchmarks.stats import Section, Stat, ratios
from benchmarks.suite import Context, _rotate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from node import free_port  # noqa: E402

N_CTX_TOTAL = 4096
THREADS = "2"
CLIENTS = (1, 4, 8)
OMP = {"OMP_WAIT_POLICY": "PASSIVE"}
PROMPTS = [
    "The history of the lighthouse", "A recipe for bread", "Why the sky is blue",
    "The life of a honeybee", "How trains changed towns", "A letter to a friend",
    "The rules of chess", "A walk in the mountains",
]  # fmt: skip


# -- llama-server, built once per machine ------------------------------------------------------
def llama_server_binary(log: Callable[[str], None]) -> tuple[Path | None, str]:
    """llama.cpp's llama-server from the sdist of the installed llama-cpp-python, built once into
    ~/.cache/llmlb-node/llama-server/VERSION (outside the repository); (None, why) without a
    compiler or when the build fails."""
    version = importlib.metadata.version("llama-cpp-python")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    root = cache / "llmlb-node" / "llama-server" / version
    binary = root / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary, ""
    missing = [t for t in ("cmake", "c++", "cc") if shutil.which(t) is None]
    if missing:
        return None, f"no {', '.join(missing)} on this machine: llama-server cannot be built"
    try:
        source = _vendored_llama_cpp(root, version)
        log(f"  building llama-server from llama-cpp-python {version}'s llama.cpp (~12 min) …")
        _build(source, root / "build")
    except (ChildError, OSError, tarfile.TarError) as exc:
        return None, f"llama-server could not be built: {exc}"
    return binary, ""


def _vendored_llama_cpp(root: Path, version: str) -> Path:
    source = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if source.is_dir():
        return source
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():  # from pip's cache when it has it, else from the index
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "--no-build-isolation", "-d", str(root), f"llama-cpp-python=={version}"])  # fmt: skip
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")
    return source


def _build(source: Path, build: Path) -> None:
    # llama-cpp-python's own build options on Linux: no curl; ggml's defaults otherwise.
    _run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
          "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_OPENSSL=OFF"])  # fmt: skip
    jobs = str(os.cpu_count() or 2)
    _run(["nice", "-n", "10", "cmake", "--build", str(build), "--target", "llama-server",
          "-j", jobs])  # fmt: skip


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise ChildError(f"{' '.join(cmd[:3])} … exited {proc.returncode}: {proc.stderr[-1500:]}")


class LlamaServer:
    """llama-server on a free loopback port, stopped by its PID."""

    def __init__(self, binary: Path, model: Path, alias: str, parallel: int, log_dir: Path,
                 n_ctx: int = N_CTX_TOTAL) -> None:  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            str(binary), "-m", str(model), "--alias", alias, "-c", str(n_ctx),
            "--parallel", str(parallel), "-t", THREADS, "-tb", THREADS,
            "--host", "127.0.0.1", "--port", str(self.port), "--no-webui",
        ]  # fmt: skip
        self.log = open(log_dir / f"llama-server-np{parallel}.log", "wb")  # noqa: SIM115
        env = {**os.environ, **OMP}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        _wait_healthy(self.url + "/health", self.proc, "llama-server")

    def stop(self) -> None:
        end_process(self.proc)
        self.log.close()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ChildError(f"{what} exited {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ChildError(f"{what} was not healthy within 180 s")


# -- the load ------------------------------------------------------------------------------------
@dataclass
class Stream:
    """One streaming client's timings (seconds from the round's start) and its token times."""

    start: float
    first: float = float("nan")
    end: float = float("nan")
    tokens: list[float] | None = None


def _stream(
    url: str,
    model: str,
    prompt: str | list[int],
    max_tokens: int,
    t0: float,
    streaming: threading.Event | None = None,
) -> Stream:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "logit_bias": NO_EOS}  # fmt: skip
    result = Stream(time.perf_counter() - t0, tokens=[])
    with (
        httpx.Client(timeout=600) as client,
        client.stream("POST", url + "/v1/completions", json=body) as r,
    ):
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                now = time.perf_counter() - t0
                result.tokens.append(now)  # type: ignore[union-attr]
                if result.first != result.first:
                    result.first = now
                if streaming is not None and len(result.tokens) == 5:  # type: ignore[arg-type]
                    streaming.set()
    result.end = time.perf_counter() - t0
    return result


def _round(url: str, model: str, clients: int, max_tokens: int) -> list[Stream]:
    """`clients` streams started together, distinct prompts; each stream's timings."""
    t0 = time.perf_counter()
    streams: list[Stream | BaseException] = [ChildError("did not run")] * clients

    def one(i: int) -> None:
        try:
            streams[i] = _stream(url, model, PROMPTS[i % len(PROMPTS)], max_tokens, t0)
        except (httpx.HTTPError, ChildError) as exc:
            streams[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = [s for s in streams if isinstance(s, BaseException)]
    if failed:
        raise ChildError(f"{len(failed)} of {clients} streams failed: {failed[0]}")
    return streams  # type: ignore[return-value]


def _figures(streams: list[Stream]) -> dict[str, float]:
    tokens = sum(len(s.tokens or []) for s in streams)
    wall = max(s.end for s in streams) - min(s.start for s in streams)
    ttfts = [s.first - s.start for s in streams]
    return {
        "tok_s": tokens / wall,
        "ttft_p50": _p(ttfts, 0.5) * 1000,
        "ttft_p95": _p(ttfts, 0.95) * 1000,
        "latency_p95": _p([s.end - s.start for s in streams], 0.95) * 1000,
    }


# -- the contenders -------------------------------------------------------------------------------
@contextmanager
def _contenders(ctx: Context, binary: Path | None) -> Iterator[dict[str, str]]:
    """name -> base URL of every server of this run, all up at once (idle ones wait passively)."""
    g = ctx.gemma
    assert g is not None and ctx.gemma_home is not None
    logs = ctx.fresh_dir("concurrency-logs")
    with ExitStack() as stack:
        urls = {}
        for parallel in (4, 8):
            env = _engine_env(ctx, parallel, N_CTX_TOTAL // parallel)
            urls[f"node -P {parallel}"] = stack.enter_context(_node(env)).url
        if peer_available() and not ctx.quick:
            peer = _peer(g.path, g.model_id, logs)
            stack.callback(peer.stop)
            urls["llama_cpp.server"] = peer.url
        for parallel in (4, 8) if binary is not None and not ctx.quick else ():
            server = LlamaServer(binary, g.path, g.model_id, parallel, logs)
            stack.callback(server.stop)
            urls[f"llama-server -np {parallel}"] = server.url
        yield urls


def _engine_env(ctx: Context, parallel: int, n_ctx: int) -> dict[str, str]:
    assert ctx.gemma_home is not None
    env = _node_env(ctx, ctx.gemma_home, HF_HUB_OFFLINE="1", PARALLEL=str(parallel))
    env.update(OMP, LLMLB_N_CTX=str(n_ctx), LLMLB_N_THREADS=THREADS)
    return env


def _peer(model: Path, alias: str, logs: Path) -> Peer:
    env = {**os.environ, **OMP}
    # Its default interrupts the running stream when another request arrives: let them queue.
    return Peer(model, alias, logs, n_ctx=N_CTX_TOTAL, threads=int(THREADS), env=env,
                extra=("--interrupt_requests", "False"))  # fmt: skip


def bench_concurrency(ctx: Context) -> tuple[Section, Section]:
    """C1: N = 1, 4, 8 concurrent streams against each contender; C2: the token gap."""
    c1 = Section("C1", "many clients, one model: N concurrent 64-token streams")
    c2 = Section("C2", "token gap of a running stream while a 2,000-token prompt joins")
    binary, why = (
        (None, "quick mode: llama-server is not built")
        if ctx.quick
        else (llama_server_binary(ctx.log))
    )
    if why:
        c1.notes.append(f"llama-server column skipped: {why}")
    rounds = 1 if ctx.quick else min(6, ctx.runs)
    max_tokens = 16 if ctx.quick else 64
    clients = (1, 4) if ctx.quick else CLIENTS
    with _contenders(ctx, binary) as urls:
        model = ctx.gemma.model_id  # type: ignore[union-attr]
        names = list(urls)
        for name in names:  # warm-up: loaded, threads started
            _round(urls[name], model, 1, 4)
        samples: dict[tuple[str, int], list[dict[str, float]]] = {}
        failures: dict[tuple[str, int], list[str]] = {}
        for run in range(rounds):
            for n in clients:
                for name in _rotate(names, run):
                    try:
                        figures = _figures(_round(urls[name], model, n, max_tokens))
                    except ChildError as exc:  # recorded: a server that drops streams
                        failures.setdefault((name, n), []).append(str(exc)[:200])
                        continue
                    samples.setdefault((name, n), []).append(figures)
            ctx.log(f"  C1: round {run + 1}/{rounds}")
    for (name, n), why in failures.items():
        c1.notes.append(f"{name}, N={n}: {len(why)} of {rounds} rounds failed ({why[0]})")
    _report_c1(c1, samples, names, clients)
    _bench_gap(ctx, c2, binary)
    return c1, c2


def _report_c1(
    section: Section,
    samples: dict[tuple[str, int], list[dict[str, float]]],
    names: list[str],
    clients: tuple[int, ...],
) -> None:
    def series(name: str, n: int, key: str) -> list[float]:
        return [s[key] for s in samples.get((name, n), [])]

    for n in clients:
        for name in names:
            section.add(Stat(f"N={n} {name}: aggregate", "tok/s", series(name, n, "tok_s")))
            section.add(Stat(f"N={n} {name}: TTFT p50", "ms", series(name, n, "ttft_p50")))
            section.add(Stat(f"N={n} {name}: TTFT p95", "ms", series(name, n, "ttft_p95")))
            section.add(Stat(f"N={n} {name}: latency p95", "ms", series(name, n, "latency_p95")))
    one = series("node -P 4", 1, "tok_s")
    if 4 in clients:
        four = ratios(series("node -P 4", 4, "tok_s"), one)
        section.goal(Stat("node -P 4: N=4 ÷ N=1", "×", four), ">=", 2.0,
                     "≥ 2.0× its single client at 4 clients")  # fmt: skip
    if 8 in clients:
        eight = ratios(series("node -P 8", 8, "tok_s"), series("node -P 8", 1, "tok_s"))
        section.goal(Stat("node -P 8: N=8 ÷ N=1", "×", eight), ">=", 2.7,
                     "≥ 2.7× its single client at 8 clients")  # fmt: skip
    for parallel, n in ((4, 1), (4, 4), (8, 8)):
        peer = f"llama-server -np {parallel}"
        ours = series(f"node -P {parallel}", n, "tok_s")
        if (peer, n) not in samples or len(ours) != len(series(peer, n, "tok_s")):
            continue
        want = 0.95 if n == 1 else 0.9
        section.goal(Stat(f"N={n}: node ÷ {peer}", "×", ratios(ours, series(peer, n, "tok_s"))),
                     ">=", want, f"≥ {want}× llama-server")  # fmt: skip
    if ("llama-server -np 8", 8) in samples:
        ttft = ratios(series("node -P 8", 8, "ttft_p95"), series("llama-server -np 8", 8,
                                                                   "ttft_p95"))  # fmt: skip
        section.goal(Stat("N=8 TTFT p95: node ÷ llama-server -np 8", "×", ttft), "<=", 1.5,
                     "≤ 1.5× llama-server's")  # fmt: skip


# -- C2: a long prompt joins --------------------------------------------------------------------
def _bench_gap(ctx: Context, section: Section, binary: Path | None) -> None:
    g = ctx.gemma
    assert g is not None
    long_prompt = [2] + [1234] * 1999  # 2,000 tokens, the same for every server
    logs = ctx.fresh_dir("gap-logs")
    with ExitStack() as stack:
        urls = {"node -P 4": stack.enter_context(_node(_engine_env(ctx, 4, 2304))).url}
        if binary is not None:
            server = LlamaServer(binary, g.path, g.model_id, 4, logs, n_ctx=4 * 2304)
            stack.callback(server.stop)
            urls["llama-server -np 4"] = server.url
        for name, url in urls.items():
            worst, median = [], []
            for _ in range(1 if ctx.quick else 3):
                w, m = _gap(url, g.model_id, long_prompt)
                worst.append(w)
                median.append(m)
            section.add(Stat(f"{name}: median token gap", "ms", median))
            section.add(Stat(f"{name}: worst gap while the prompt joins", "ms", worst))
            if name.startswith("node"):
                section.goal(Stat(f"{name}: worst ÷ median gap", "×", ratios(worst, median)),
                             "<=", 4.0, "≤ 4× the median gap")  # fmt: skip


def _gap(url: str, model: str, long_prompt: list[int]) -> tuple[float, float]:
    """(worst gap while the long prompt is evaluated, median gap) of a 200-token stream, in ms."""
    t0 = time.perf_counter()
    running: list[Stream] = []
    streaming = threading.Event()
    thread = threading.Thread(target=lambda: running.append(
        _stream(url, model, "Tell a story", 200, t0, streaming)))  # fmt: skip
    thread.start()
    if not streaming.wait(120):
        raise ChildError("the running stream did not start within 120 s")
    time.sleep(0.2)
    joined = _stream(url, model, long_prompt, 1, t0)
    thread.join()
    times = running[0].tokens or []
    gaps = [(b - a) * 1000 for a, b in zip(times, times[1:], strict=False)]
    during = [
        (b - a) * 1000
        for a, b in zip(times, times[1:], strict=False)
        if b >= joined.start and a <= joined.end
    ]
    return max(during or [float("nan")]), statistics.median(gaps)
