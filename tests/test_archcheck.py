"""Architectures this llama.cpp does not know are refused from the GGUF's header, before the
weights: the loopback Hub serves the file, the real llama.cpp gives the verdict."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf import make_gguf, make_model_gguf, sha256_hex
from node import running_node
from test_cli import cli
from world import World

from llmlb_node import archcheck
from llmlb_node.backend import installed_version
from llmlb_node.errors import UnsupportedArchitectureError
from llmlb_node.store import ModelStore

SIZE = 80 * 1024 * 1024  # over archcheck.MIN_CHECKED: smaller files are not read first
FIELDS = {"block_count": 2, "context_length": 128, "embedding_length": 64}


def model(arch: str, seed: int = 0) -> bytes:
    """A whole GGUF of SIZE bytes whose header names `arch`."""
    head = make_model_gguf(arch, FIELDS, {})
    tensors = {"blob.weight": SIZE - len(head) - 64 - seed}
    data = make_model_gguf(arch, FIELDS, tensors)
    return data + bytes(SIZE - len(data))


@pytest.fixture
def frob(world: World) -> bytes:
    """A catalog entry `frob` (with its sha256) whose GGUF has an architecture no llama.cpp has."""
    data = model("frobnicator")
    world.add_model("frob", {"frob-Q4_K_M.gguf": data}, sha256=sha256_hex(data))
    world.monkeypatch.delenv("LLMLB_URL")  # the Hub alone
    return data


def test_the_real_llama_cpp_judges_the_name() -> None:
    assert archcheck.probe("frobnicator") is False
    assert archcheck.probe("llama") is True and archcheck.probe("gemma3") is True
    assert archcheck.library_knows("gemma3") and not archcheck.library_knows("frobnicator")


def test_an_unknown_architecture_is_refused_from_its_header(world: World, frob: bytes) -> None:
    world.hub.reset_counters()
    started = time.perf_counter()
    with pytest.raises(UnsupportedArchitectureError) as info:
        world.resolver().resolve("frob")
    took = time.perf_counter() - started

    message = str(info.value)
    assert "'frobnicator'" in message and f"llama-cpp-python {installed_version()}" in message
    assert info.value.architecture == "frobnicator"
    assert world.hub.total_bytes_sent() < SIZE / 16  # the header only
    assert not (world.models_dir / "frob" / "frob-Q4_K_M.gguf").exists()
    print(f"refused in {took * 1000:.0f} ms, {world.hub.total_bytes_sent()} bytes")
    status = world.resolver().status("frob")
    assert status.status == "error" and "frobnicator" in (status.error_message or "")


def test_the_verdict_is_kept_and_a_refusal_again_needs_no_llama_cpp(
    world: World, frob: bytes
) -> None:
    with pytest.raises(UnsupportedArchitectureError):
        world.resolver().resolve("frob")
    cache = json.loads((world.models_dir / ".llmlb" / archcheck.CACHE).read_text())
    assert cache["verdicts"][installed_version()]["frobnicator"] is False
    assert cache["files"][sha256_hex(frob)] == "frobnicator"

    code = (
        "import sys\nfrom llmlb_node import ModelResolver\n"
        "try:\n    ModelResolver().resolve('frob')\nexcept Exception as e:\n    print(repr(e))\n"
        "print('llama_cpp' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "UnsupportedArchitectureError" in done.stdout, done.stderr
    assert done.stdout.strip().endswith("False")


def test_a_known_architecture_installs_without_importing_llama_cpp(world: World) -> None:
    data = model("llama")
    world.add_model("llamaish", {"llamaish.gguf": data})
    code = (
        "import sys\nfrom llmlb_node import ModelResolver\n"
        "print(ModelResolver().resolve('llamaish').source, 'llama_cpp' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["huggingface:test-org/llamaish-GGUF", "False"], done.stderr


def test_a_header_it_cannot_judge_is_let_through_with_a_debug_line(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_gguf(SIZE, seed=4)  # a synthetic GGUF with no architecture key
    world.add_model("anon", {"anon.gguf": data})
    with caplog.at_level(logging.DEBUG, logger="llmlb_node.archcheck"):
        resolved = world.resolver().resolve("anon")
        world.resolver().resolve("tiny")  # under MIN_CHECKED: downloaded without a header read
    assert resolved.path.stat().st_size == SIZE
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "anon: architecture not checked" in m and "general.architecture" in m for m in messages
    )
    assert any("tiny" in m and "is small" in m for m in messages)


def test_a_probe_that_cannot_run_refuses_nothing(world: World, frob: bytes, tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "llama_cpp"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no shared library here')\n")
    code = "from llmlb_node import ModelResolver; print(ModelResolver().resolve('frob').source)"
    env = {**world.env(), "PYTHONPATH": str(shadow.parent), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.stdout.strip() == "huggingface:test-org/frob-GGUF", done.stderr


def test_a_catalog_entry_known_to_be_unsupported_is_marked_and_warned_once(
    world: World, frob: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    world.add_model("declared", {"d.gguf": make_gguf(2000)}, architecture="frobnicator")
    with caplog.at_level(logging.WARNING, logger="llmlb_node.archcheck"):
        listed = {m.id: m for m in world.resolver().models()}
        world.resolver().models()

    assert not listed["declared"].runnable
    assert "frobnicator" in (listed["declared"].unusable or "")
    assert listed["tiny"].runnable and listed["tiny"].unusable is None
    warned = [r.getMessage() for r in caplog.records if "declared" in r.getMessage()]
    assert len(warned) == 1 and "unusable" in warned[0]
    with pytest.raises(UnsupportedArchitectureError):  # before any network
        world.resolver().resolve("declared")
    assert world.hub.request_count == 0

    done = cli("models")
    assert "no (architecture 'frobnicator'" in done.stdout
    assert done.stderr.count("declared: unusable on this node") == 1


def test_the_node_answers_400_unsupported_architecture_and_marks_it(
    world: World, frob: bytes
) -> None:
    chat = {"model": "frob", "messages": [{"role": "user", "content": "hi"}]}
    with running_node() as node:
        status, _, body = node.post("/v1/chat/completions", chat)
        _, _, supported = node.get("/v0/supported-models")
        _, _, state = node.get("/v0/models/frob/status")
        _, _, listed = node.get("/v1/models/frob")
        pull = node.post("/api/models/pull", {"model": "frob", "stream": False})

    assert status == 400 and body["error"]["code"] == "unsupported_architecture"
    assert "frobnicator" in body["error"]["message"]
    row = next(m for m in supported["models"] if m["id"] == "frob")
    assert row["runnable"] is False
    assert state["status"] == "error" and "frobnicator" in state["error_message"]
    assert listed["status"] == "error"
    assert pull[0] == 400 and pull[2]["error"]["code"] == "unsupported_architecture"


def test_an_unusable_architecture_is_never_advertised_even_with_the_whole_catalog(
    world: World, frob: bytes
) -> None:
    chat = {"model": "frob", "messages": [{"role": "user", "content": "hi"}]}
    with running_node(ADVERTISE="catalog") as node:
        refused, _, _ = node.post("/v1/chat/completions", chat)
        _, _, listing = node.get("/v1/models")

    assert refused == 400
    ids = [m["id"] for m in listing["data"]]
    assert "frob" not in ids and "tiny" in ids  # a load balancer never routes it here


def test_a_hub_reference_to_an_unknown_architecture_exits_3(world: World) -> None:
    world.hub.add_file("test-org/Frob-GGUF", "frob-Q4_K_M.gguf", model("frobnicator", seed=1))
    world.monkeypatch.setenv("LLMLB_ALLOW_HF", "1")

    done = cli("pull", "hf:test-org/Frob-GGUF")

    assert done.returncode == 3 and "'frobnicator'" in done.stderr
    assert world.hub.cdn.bytes_sent < SIZE / 16
    # Known now (the file list kept, its sha256's architecture noted): refused with no request.
    world.hub.reset_counters()
    again = cli("pull", "hf:test-org/Frob-GGUF")
    assert again.returncode == 3 and world.hub.total_requests() == 0


def test_reading_the_architecture_stops_at_its_key(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    path = tmp_path / "m.gguf"
    path.write_bytes(model("gemma3"))
    assert archcheck.file_architecture(path) == "gemma3"
    assert archcheck.verdict("gemma3", store) is True
    assert archcheck.cached_verdict("gemma3", store) is True


def test_an_architecture_the_catalog_declares_needs_no_header_read(world: World) -> None:
    data = model("llama", seed=2)
    world.add_model("declared-llama", {"dl.gguf": data}, architecture="llama")
    world.hub.reset_counters()

    world.resolver().resolve("declared-llama")

    ranges = [r.headers.get("range") for r in world.hub.cdn.requests]
    assert "bytes=0-65535" not in ranges  # the name alone was judged
