"""Whole journeys: a model id in, generated text out, with the real model and the real llama.cpp."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from llmlb_node import LazyLlama, ModelResolver

from .conftest import GEMMA_FILE, GEMMA_ID, GEMMA_REPO, GEMMA_SHA256, LLAMA_KWARGS, GemmaWorld

pytestmark = pytest.mark.e2e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 * 1024 * 1024):
            h.update(block)
    return h.hexdigest()


def _text(result: dict) -> str:
    return result["choices"][0]["text"]


def test_first_call_through_the_hub_downloads_and_generates(gemma_world: GemmaWorld) -> None:
    llm = LazyLlama(GEMMA_ID, **LLAMA_KWARGS)
    assert not gemma_world.installed.exists()

    out = llm("The capital of France is", max_tokens=8, temperature=0)

    assert _text(out).strip()
    assert llm.model_path == str(gemma_world.installed)
    assert _sha256(gemma_world.installed) == GEMMA_SHA256
    assert gemma_world.hub.cdn.bytes_sent <= gemma_world.file.stat().st_size * 1.01
    assert gemma_world.proxy.request_count == 0
    assert any(r.path.startswith(f"/{GEMMA_REPO}/resolve/") for r in gemma_world.hub.requests)
    llm.close()


_SECOND = """
from llmlb_node import LazyLlama
llm = LazyLlama("gemma-3-270m", n_ctx=256, verbose=False, seed=1)
print(llm("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"])
"""


def test_second_process_with_the_model_installed_makes_zero_requests(
    gemma_world: GemmaWorld,
) -> None:
    ModelResolver().resolve(GEMMA_ID)
    gemma_world.hub.reset_counters()
    gemma_world.proxy.reset_counters()

    done = subprocess.run(
        [sys.executable, "-c", _SECOND],
        env={**os.environ, **gemma_world.env()},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert gemma_world.requests() == 0


def test_through_the_llmlb_proxy_when_the_hub_is_down(
    gemma_world: GemmaWorld, hub_only_catalog: Path
) -> None:
    gemma_world.hub.refuse()
    llm = LazyLlama(GEMMA_ID, **LLAMA_KWARGS)

    resolved = llm.prefetch()
    out = llm("Paris is the capital of", max_tokens=4, temperature=0)

    assert resolved.source == "llmlb-proxy"
    assert _text(out).strip()
    assert {r.authorization for r in gemma_world.proxy.requests} == {"Bearer test-key"}
    assert _sha256(gemma_world.installed) == GEMMA_SHA256
    llm.close()


def test_from_the_python_package_source_with_chat(
    gemma_world: GemmaWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LLMLB_URL")

    with LazyLlama(GEMMA_ID, **LLAMA_KWARGS) as llm:
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
        )
        assert llm.prefetch().source == "local"

    message = reply["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"].strip()
    assert gemma_world.requests() == 0
    record = ModelResolver().store.read_record(GEMMA_ID)
    assert record is not None and record.source.startswith("python-package:")


def test_two_threads_times_two_lazyllamas_download_once(
    gemma_world: GemmaWorld, hub_only_catalog: Path
) -> None:
    llms = [LazyLlama(GEMMA_ID, **LLAMA_KWARGS) for _ in range(2)]
    answers: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(llm: LazyLlama) -> None:
        barrier.wait()
        try:
            answers.append(_text(llm("One, two,", max_tokens=3, temperature=0)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(llm,)) for llm in llms for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors and len(answers) == 4
    gets = [r for r in gemma_world.hub.cdn.requests if r.method == "GET"]
    assert 1 <= len(gets) <= 4  # one download, over up to 4 parallel ranges
    assert gemma_world.hub.cdn.bytes_sent <= gemma_world.file.stat().st_size * 1.01
    for llm in llms:
        llm.close()


def test_sixteen_threads_on_one_instance_get_sixteen_answers(gemma_world: GemmaWorld) -> None:
    llm = LazyLlama(GEMMA_ID, **LLAMA_KWARGS)
    answers: list[str] = []

    def work(i: int) -> None:
        answers.append(_text(llm(f"Number {i} is", max_tokens=2, temperature=0)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(answers) == 16
    llm.close()


def _run(world: GemmaWorld, *args: str) -> subprocess.CompletedProcess[str]:
    """`llmlb-node run gemma-3-270m ...` as a user types it, with a small context."""
    return subprocess.run(
        ["llmlb-node", "run", GEMMA_ID, *args, "-o", "n_ctx=256"],
        env={**os.environ, **world.env()},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_the_readme_main_command(gemma_world: GemmaWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """`llmlb-node run gemma-3-270m "The capital of France is"` on a machine with no Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gemma_world.hub.refuse()

    done = _run(gemma_world, "The capital of France is", "--max-tokens", "8")

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "100%" in done.stderr and "installed" in done.stderr  # progress, then the install
    assert "Traceback" not in done.stderr
    assert (gemma_world.home / "models" / GEMMA_ID / GEMMA_FILE).exists()


def test_the_cli_chat_mode(gemma_world: GemmaWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    done = _run(gemma_world, "Name a colour.", "--chat", "--max-tokens", "6", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_the_real_gemma_header_gives_its_layer_count(gemma_file: Path) -> None:
    from llmlb_node.gguf import block_count

    assert block_count(gemma_file) == 18  # gemma3.block_count, as llama.cpp reads it
