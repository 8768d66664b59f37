"""What `run` and a first load print, with the real model and llama.cpp: llama.cpp's log goes
through `logging`, the seed is new each run unless given, and loading never blocks an event loop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest

from llmlb_node import LazyLlama

from .conftest import GEMMA_ID, LLAMA_KWARGS, GemmaWorld

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"


@pytest.fixture
def installed(gemma_world: GemmaWorld, monkeypatch: pytest.MonkeyPatch) -> GemmaWorld:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # from the demo packages, like the README
    done = _cli(gemma_world, "pull", GEMMA_ID)
    assert done.returncode == 0, done.stderr
    return gemma_world


def _cli(world: GemmaWorld, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["llmlb-node", *args],
        env={**os.environ, **world.env()},
        capture_output=True,
        text=True,
        timeout=180,
    )


def _run(world: GemmaWorld, *args: str, verbose: bool = False) -> subprocess.CompletedProcess[str]:
    flags = ["-v"] if verbose else []
    done = _cli(world, *flags, "run", GEMMA_ID, PROMPT, "--max-tokens", "24", *args)
    assert done.returncode == 0, done.stderr
    return done


def test_llama_cpp_log_goes_through_logging_unless_verbose(installed: GemmaWorld) -> None:
    quiet = _run(installed, "-o", "n_ctx=256")
    # Before: "llama_kv_cache_iswa: using full-size SWA cache" on stderr at every load.
    (line,) = quiet.stderr.splitlines()  # nothing but our own line
    assert line.startswith("loaded ")

    logged = _run(installed, "-o", "n_ctx=256", verbose=True)  # -v: our DEBUG log shows it
    native = [
        line
        for line in logged.stderr.splitlines()
        if line.startswith("DEBUG llmlb_node.llama_cpp.native: ")
    ]
    assert any("SWA cache" in line for line in native)

    loud = _run(installed, "-o", "n_ctx=256", "-o", "verbose=true")  # llama.cpp's own output
    assert "using full-size SWA cache" in loud.stderr
    assert "DEBUG llmlb_node.llama_cpp.native" not in loud.stderr


def test_each_run_draws_a_new_seed_unless_one_is_given(installed: GemmaWorld) -> None:
    fixed = [_run(installed, "--seed", "42", "-o", "n_ctx=256").stdout for _ in range(2)]
    assert fixed[0] == fixed[1] and fixed[0].strip()
    assert _run(installed, "-o", "seed=42", "-o", "n_ctx=256").stdout == fixed[0]

    fresh = {_run(installed, "-o", "n_ctx=256").stdout for _ in range(3)}
    assert len(fresh) > 1  # before: every run printed the same text
    assert len({_run(installed, "-o", "seed=-1", "-o", "n_ctx=256").stdout, *fresh}) > 1


def test_aload_keeps_the_event_loop_ticking(installed: GemmaWorld) -> None:
    llm = LazyLlama(GEMMA_ID, **LLAMA_KWARGS)
    ticks: list[float] = []

    async def main() -> tuple[float, float]:
        async def tick() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        started = time.monotonic()
        await llm.aload()
        took = time.monotonic() - started
        ticker.cancel()
        return started, took

    started, took = asyncio.run(main())
    try:
        assert llm.is_loaded
        assert took > 0.05
        # A load blocking the loop would leave one gap as long as the load; a loaded machine's
        # scheduler pauses are shorter than half of it (a fixed 0.2 s was not, under load).
        during = [t for t in ticks if t >= started]
        gaps = [b - a for a, b in zip([started, *during], [*during, started + took], strict=False)]
        assert len(during) >= 3 and max(gaps) < took / 2, (gaps, took)
        assert llm("The capital of France is", max_tokens=4)["choices"][0]["text"]
    finally:
        llm.close()


def test_a_load_failure_says_what_llama_cpp_said(installed: GemmaWorld) -> None:
    done = _cli(installed, "run", GEMMA_ID, PROMPT, "-o", "n_ctx=256", "-o", "type_v=q8_0")
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: llama.cpp could not load model '{GEMMA_ID}'")
    assert "quantized V cache requires flash_attn" in line  # llama.cpp's own reason
    assert "Traceback" not in done.stderr


def _generating(world: GemmaWorld, *args: str) -> subprocess.Popen[bytes]:
    """`run` with a long generation ahead, returned once its first text has arrived."""
    proc = subprocess.Popen(
        ["llmlb-node", "run", GEMMA_ID, PROMPT, "--max-tokens", "1000", "-o", "n_ctx=1100", *args],
        env={**os.environ, **world.env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = proc.stdout.read(1)  # like `head -c 1`: waits for the load and the first token
    assert first, proc.communicate(timeout=60)
    assert proc.poll() is None  # still generating when the reader leaves
    return proc


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_run_stops_quietly_when_its_reader_goes_away(installed: GemmaWorld, chat: bool) -> None:
    proc = _generating(installed, *(["--chat"] if chat else []))
    try:
        proc.stdout.close()  # type: ignore[union-attr]  # `| head` took what it wanted
        # Bounded: the next token's write fails and generation stops (1000 tokens take far
        # longer). Before: exit 1 "cannot close this LazyLlama: a stream ... is open".
        err = proc.stderr.read().decode()  # type: ignore[union-attr]
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    (line,) = err.splitlines()  # our own "loaded" line, nothing about the pipe
    assert line.startswith("loaded ")


def test_ctrl_c_during_generation_exits_130_in_one_line(installed: GemmaWorld) -> None:
    proc = _generating(installed)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Before: exit 1 and "cannot close this LazyLlama: a stream ... is open".
    assert proc.returncode == 130, err
    loaded, interrupted = err.decode().splitlines()
    assert loaded.startswith("loaded ") and interrupted == "interrupted"
