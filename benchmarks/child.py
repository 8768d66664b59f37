"""One measurement in a fresh interpreter: `python benchmarks/child.py TASK 'JSON-ARGS'`.

Times only the call under test (after imports) and prints one JSON object as its last stdout line.
"""

import json
import os
import signal
import sys
import time

T0 = time.perf_counter()  # "process start" for the cold-start tasks: before any heavy import

from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

PROMPT = "The capital of France is"


# --------------------------------------------------------------------------- helpers


def _proc_status_kib(field: str) -> int | None:
    """A `Vm*` field of /proc/self/status, in KiB (None off Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class Memory:
    """Peak RSS growth over a region: VmHWM after minus VmRSS before (HWM reset at the start)."""

    def __init__(self) -> None:
        import resource

        self.resettable = _reset_peak_rss()
        self.rss_before = _proc_status_kib("VmRSS")
        self.maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def result(self) -> dict[str, Any]:
        import resource

        hwm = _proc_status_kib("VmHWM")
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out: dict[str, Any] = {"method": "VmHWM-after minus VmRSS-before (clear_refs 5)"}
        if self.resettable and hwm is not None and self.rss_before is not None:
            out["growth_kib"] = hwm - self.rss_before
        else:  # ru_maxrss only grows: an underestimate if imports peaked higher than the download
            out["method"] = "ru_maxrss after minus before"
            out["growth_kib"] = maxrss - self.maxrss_before
        out.update(rss_before_kib=self.rss_before, hwm_after_kib=hwm)
        return out


class Profiler:
    """cProfile over a region, in the calling thread and every thread started inside it."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.profiles: list[Any] = []

    @contextmanager
    def region(self) -> Iterator[None]:
        if not self.path:
            yield
            return
        import cProfile
        import threading

        original = threading.Thread.run
        profiles = self.profiles

        def run(thread: threading.Thread) -> None:
            p = cProfile.Profile()
            p.enable()
            try:
                original(thread)
            finally:
                p.disable()
                profiles.append(p)

        threading.Thread.run = run  # type: ignore[method-assign]
        main = cProfile.Profile()
        main.enable()
        try:
            yield
        finally:
            main.disable()
            threading.Thread.run = original  # type: ignore[method-assign]
            profiles.append(main)
            self._dump()

    def _dump(self) -> None:
        import io
        import pstats

        assert self.path is not None
        stats = pstats.Stats(self.profiles[0])
        for p in self.profiles[1:]:
            stats.add(p)
        stats.dump_stats(self.path + ".pstats")
        buf = io.StringIO()
        stats.stream = buf  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(25)
        with open(self.path, "w") as fh:
            fh.write(f"cProfile of {len(self.profiles)} thread(s); per-thread times are summed\n")
            fh.write(buf.getvalue())


@contextmanager
def _count_sockets(counts: dict[str, int]) -> Iterator[None]:
    """Count socket creation, connect and getaddrinfo by patching the socket module (free when
    unused, so it can stay on during timed loops)."""
    import socket

    originals = (socket.socket.__init__, socket.socket.connect, socket.socket.connect_ex)
    original_gai = socket.getaddrinfo

    def init(self: socket.socket, *a: Any, **k: Any) -> None:
        counts["socket"] = counts.get("socket", 0) + 1
        originals[0](self, *a, **k)

    def connect(self: socket.socket, *a: Any) -> Any:
        counts["connect"] = counts.get("connect", 0) + 1
        return originals[1](self, *a)

    def connect_ex(self: socket.socket, *a: Any) -> Any:
        counts["connect"] = counts.get("connect", 0) + 1
        return originals[2](self, *a)

    def getaddrinfo(*a: Any, **k: Any) -> Any:
        counts["getaddrinfo"] = counts.get("getaddrinfo", 0) + 1
        return original_gai(*a, **k)

    socket.socket.__init__ = init  # type: ignore[method-assign]
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
    try:
        yield
    finally:
        socket.socket.__init__ = originals[0]  # type: ignore[method-assign]
        socket.socket.connect = originals[1]  # type: ignore[method-assign]
        socket.socket.connect_ex = originals[2]  # type: ignore[method-assign]
        socket.getaddrinfo = original_gai


# --------------------------------------------------------------------------- tasks


def task_micro(a: dict[str, Any]) -> dict[str, Any]:
    """Cached resolve, unknown id and their peers: per-call mean over a loop, `runs` times."""
    import gc
    import itertools

    from huggingface_hub import hf_hub_download

    from llmlb_node import ModelResolver, UnsupportedModelError

    model_id, repo, filename = a["model_id"], a["hf_repo"], a["hf_filename"]
    resolver = ModelResolver()
    path = str(resolver.resolve(model_id).path)
    hf_hub_download(repo, filename, local_files_only=True)
    missing = os.path.join(os.path.dirname(path), "no-such-file.gguf")

    def unknown() -> None:
        try:
            resolver.resolve("no-such-model")
        except UnsupportedModelError:
            pass
        else:
            raise AssertionError("no UnsupportedModelError")

    def stat_missing() -> None:
        try:  # noqa: SIM105 - contextlib.suppress would add its own cost to the floor
            os.stat(missing)
        except FileNotFoundError:
            pass

    contenders: dict[str, Callable[[], object]] = {
        "resolve": lambda: resolver.resolve(model_id),
        "resolve_new": lambda: ModelResolver().resolve(model_id),
        "hf_local": lambda: hf_hub_download(repo, filename, local_files_only=True),
        "stat": lambda: os.stat(path),
        "unknown": unknown,
        "stat_missing": stat_missing,
    }

    def timed(fn: Callable[[], object], n: int) -> float:
        gc.collect()
        gc.disable()
        try:
            t = time.perf_counter()
            for _ in itertools.repeat(None, n):
                fn()
            return time.perf_counter() - t
        finally:
            gc.enable()

    if a.get("profile"):
        fn = contenders[a["profile_contender"]]
        with Profiler(a["profile"]).region():
            for _ in range(int(a.get("profile_calls", 5000))):
                fn()
        return {"profile": a["profile"]}

    target = float(a.get("target_s", 0.1))
    loops: dict[str, int] = {}
    for name, fn in contenders.items():  # calibrate: each run of each contender lasts ~target
        n = 1
        while (elapsed := timed(fn, n)) < target / 10:
            n *= 4
        loops[name] = max(1, int(n * target / elapsed))

    sockets: dict[str, dict[str, int]] = {name: {} for name in contenders}
    per_run_sockets: dict[str, list[int]] = {name: [] for name in contenders}
    per_call_us: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for run in range(int(a["runs"])):
        order = names[run % len(names) :] + names[: run % len(names)]
        for name in order:
            before = sum(sockets[name].values())
            with _count_sockets(sockets[name]):
                elapsed = timed(contenders[name], loops[name])
            per_run_sockets[name].append(sum(sockets[name].values()) - before)
            per_call_us[name].append(elapsed / loops[name] * 1e6)

    # A second proof, outside the timed loops: the interpreter's own audit events.
    audit: dict[str, dict[str, int]] = {}
    current: list[str] = [""]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event.startswith("socket.") and current[0]:
            bucket = audit[current[0]]
            bucket[event] = bucket.get(event, 0) + 1

    sys.addaudithook(hook)
    for name, fn in contenders.items():
        audit[name] = {}
        current[0] = name
        for _ in range(min(loops[name], 2000)):
            fn()
        current[0] = ""
    return {
        "per_call_us": per_call_us,
        "loops": loops,
        "sockets_in_timed_loops": sockets,
        "sockets_per_run": per_run_sockets,
        "audit_socket_events": audit,
        "audit_calls": {name: min(loops[name], 2000) for name in contenders},
    }


def task_download(a: dict[str, Any]) -> dict[str, Any]:
    """Download one file into an empty destination with llmlb, hf_hub_download or
    Llama.from_pretrained; time the call only; peak RSS growth over it."""
    contender = a["contender"]
    prof = Profiler(a.get("profile"))
    out: dict[str, Any] = {"contender": contender}
    if contender == "llmlb":
        # What resolve() imports lazily, imported up front like the peers import theirs.
        from huggingface_hub import get_hf_file_metadata, hf_hub_url  # noqa: F401

        import llmlb_node.download  # noqa: F401
        import llmlb_node.sources  # noqa: F401
        from llmlb_node import ModelResolver, Settings

        resolver = ModelResolver(Settings.from_env(**a.get("overrides", {})))
        stages: dict[str, float] = {}
        checks = _time_gguf_checks(out)
        kill_at = a.get("kill_at")  # a fraction of the file: SIGKILL ourselves once it is held

        def progress(event: Any) -> None:
            now = time.perf_counter()
            stages.setdefault(event.stage, now)
            stages["last_" + event.stage] = now
            if kill_at and event.total and event.downloaded >= kill_at * event.total:
                # The parent reads how far it got from this line (stdout is a pipe: flush).
                sys.stdout.write(json.dumps({"killed_at": event.downloaded}) + "\n")
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        mem = Memory()
        with prof.region():
            t = time.perf_counter()
            resolved = resolver.resolve(a["model_id"], progress=progress)
            elapsed = time.perf_counter() - t
        out["memory"] = mem.result()
        out["stages"] = {k: v - t for k, v in stages.items()}
        out["gguf_checks"] = checks
        out["source"] = resolved.source
        path = str(resolved.path)
        resolver.close()
    elif contender == "hf":
        from huggingface_hub import hf_hub_download

        mem = Memory()
        with prof.region():
            t = time.perf_counter()
            path = hf_hub_download(a["repo"], a["filename"], local_dir=a["dest"])
            elapsed = time.perf_counter() - t
        out["memory"] = mem.result()
    elif contender == "from_pretrained":
        import huggingface_hub
        from llama_cpp import Llama

        original = huggingface_hub.hf_hub_download
        marks: list[float] = []

        def download(*args: Any, **kwargs: Any) -> str:
            result = original(*args, **kwargs)
            if not kwargs.get("local_files_only"):
                marks.append(time.perf_counter())
            return result

        huggingface_hub.hf_hub_download = download  # from_pretrained imports it at call time
        mem = Memory()
        llm = None
        with prof.region():
            t = time.perf_counter()
            try:
                llm = Llama.from_pretrained(
                    a["repo"], a["filename"], local_dir=a["dest"], n_ctx=512, verbose=False
                )
            except ValueError as exc:  # a synthetic (quick-mode) GGUF downloads but cannot load
                if not (marks and a.get("allow_load_failure")):
                    raise
                out["load_error"] = str(exc)
            total = time.perf_counter() - t
        out["memory"] = mem.result()
        elapsed = marks[-1] - t  # Hub listing + download, without the model load
        out["total_s"] = total
        path = llm.model_path if llm is not None else os.path.join(a["dest"], a["filename"])
        del llm
    else:
        raise ValueError(f"unknown contender {contender!r}")
    out.update(elapsed_s=elapsed, path=path, size=os.path.getsize(path))
    return out


def _time_gguf_checks(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Time each structural GGUF check the install makes at its end (and whether its header was
    already parsed while the bytes arrived)."""
    from llmlb_node.download import checks as download_checks

    checks: list[dict[str, Any]] = []
    real = download_checks.verify_gguf

    def verify(path: Any, filename: str, header: Any = None) -> Any:
        t = time.perf_counter()
        try:
            return real(path, filename, header)
        finally:
            checks.append({"s": time.perf_counter() - t, "probed": header is not None})

    download_checks.verify_gguf = verify
    return checks


def task_gguf_parse(a: dict[str, Any]) -> dict[str, Any]:
    """Parse a GGUF's whole header from scratch (what a check costs without the early parse)."""
    from llmlb_node.gguf import check_complete

    times = []
    for _ in range(a.get("repeat", 5)):
        t = time.perf_counter()
        header = check_complete(a["path"])
        times.append(time.perf_counter() - t)
    return {"times_s": times, "data_end": header.data_end, "tensors": len(header.tensors)}


def task_dedup(a: dict[str, Any]) -> dict[str, Any]:
    """Wait for "go" on stdin, then resolve one model from `threads` threads at once."""
    import threading

    from huggingface_hub import get_hf_file_metadata, hf_hub_url  # noqa: F401

    import llmlb_node.download  # noqa: F401
    import llmlb_node.sources  # noqa: F401
    from llmlb_node import ModelResolver

    resolver = ModelResolver()
    n = int(a["threads"])
    ends: list[float] = [0.0] * n
    sources: list[str] = [""] * n
    errors: list[str] = []
    barrier = threading.Barrier(n + 1)

    def work(i: int) -> None:
        barrier.wait()
        try:
            sources[i] = resolver.resolve(a["model_id"]).source
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            errors.append(repr(exc))
        ends[i] = time.monotonic()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    barrier.wait()
    for t in threads:
        t.join()
    return {"start": start, "ends": ends, "sources": sources, "errors": errors, "pid": os.getpid()}


def task_coldstart(a: dict[str, Any]) -> dict[str, Any]:
    """From process start to the first generated token, with the same llama kwargs each time."""
    with Profiler(a.get("profile")).region():
        return _coldstart(a)


def _coldstart(a: dict[str, Any]) -> dict[str, Any]:
    contender = a["contender"]
    kwargs = {"n_ctx": int(a.get("n_ctx", 512)), "verbose": False}
    marks: dict[str, float] = {}
    out: dict[str, Any] = {"contender": contender}
    if contender == "direct":
        from llama_cpp import Llama

        marks["imported"] = marks["load_start"] = time.perf_counter()
        llm: Any = Llama(model_path=a["path"], **kwargs)
        marks["loaded"] = time.perf_counter()
    elif contender == "lazy":
        from llmlb_node import LazyLlama

        marks["imported"] = time.perf_counter()
        llm = LazyLlama(a["model_id"], **kwargs)
        llm.llama_factory = _timed_factory(marks)  # marks load_start / loaded
    elif contender == "from_pretrained":
        from llama_cpp import Llama

        marks["imported"] = time.perf_counter()
        llm = Llama.from_pretrained(a["repo"], a["filename"], **kwargs)
    elif contender == "proxy":
        llm = _cold_from_proxy(a, kwargs, marks, out)
    else:
        raise ValueError(f"unknown contender {contender!r}")
    marks["constructed"] = time.perf_counter()
    result = llm(PROMPT, max_tokens=1)
    marks["first_token"] = time.perf_counter()
    for stage, at in out.pop("stages", {}).items():
        marks[stage] = at
    out["text"] = result["choices"][0]["text"]
    out["marks"] = {k: v - T0 for k, v in marks.items()}
    out["total_s"] = marks["first_token"] - T0
    return out


def _cold_from_proxy(
    a: dict[str, Any], kwargs: dict[str, Any], marks: dict[str, float], out: dict[str, Any]
) -> Any:
    """`LazyLlama` from an empty store: progress events and a construction hook mark each step.

    The first call (made by the caller) resolves, downloads, verifies, loads, then generates.
    """
    from llmlb_node import LazyLlama

    marks["imported"] = time.perf_counter()
    stages: dict[str, float] = {}

    sources: list[str] = []

    def progress(event: Any) -> None:
        stages.setdefault(event.stage, time.perf_counter())
        if event.source and event.source not in sources:
            sources.append(event.source)

    llm = LazyLlama(a["model_id"], progress=progress, **kwargs)
    llm.llama_factory = _timed_factory(marks)
    out["stages"] = stages
    out["sources"] = sources
    return llm


def _timed_factory(marks: dict[str, float]) -> Callable[..., Any]:
    """A `LazyLlama.llama_factory` that builds `llama_cpp.Llama` and marks when and how long."""

    def factory(**kw: Any) -> Any:
        from llama_cpp import Llama

        marks["load_start"] = time.perf_counter()
        llama = Llama(**kw)
        marks["loaded"] = time.perf_counter()
        return llama

    return factory


def task_reuse(a: dict[str, Any]) -> dict[str, Any]:
    """Install a model whose file sits in the huggingface_hub cache: the first install (our own
    hash of it), then `rm` and a second one (the hash remembered for that inode); each timed."""
    # What resolve() imports lazily, imported up front as the other tasks do.
    import filelock  # noqa: F401

    import llmlb_node.reuse  # noqa: F401
    from llmlb_node import ModelResolver

    resolver = ModelResolver()
    out: dict[str, Any] = {}
    for run in ("first", "second"):
        started = time.perf_counter()
        resolved = resolver.resolve(a["model_id"])
        out[f"{run}_s"] = time.perf_counter() - started
        out[f"{run}_source"] = resolved.source
        out["same_inode"] = os.stat(resolved.path).st_ino == os.stat(a["blob"]).st_ino
        if run == "first":
            resolver.remove(a["model_id"])
    return out


TASKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "reuse": task_reuse,
    "micro": task_micro,
    "download": task_download,
    "dedup": task_dedup,
    "coldstart": task_coldstart,
    "gguf_parse": task_gguf_parse,
}


def main() -> int:
    """Run TASK with its JSON arguments and print the JSON result as the last line."""
    task, args = sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")
    result = TASKS[task](args)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
