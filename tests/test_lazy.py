"""Tests for llmlb_node.lazy: LazyLlama with the real llama.cpp and the real Gemma 3 270M model.

Nothing reaches the network: the store is filled once from the installed demo PyPI packages.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from gguf import make_gguf

from llmlb_node import (
    InvalidModelIdError,
    ModelLoadError,
    ModelResolver,
    ProgressEvent,
    ResolvedModel,
    Settings,
    UnsupportedModelError,
    lazy,
)
from llmlb_node.lazy import LazyLlama
from llmlb_node.offload import ENV_VAR

MODEL = "gemma-3-270m"
LLAMA_KW: dict[str, Any] = {"n_ctx": 256, "verbose": False, "seed": 0}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
JOIN_S = 60  # a thread still alive after this is deadlocked


# -- fixtures and helpers ------------------------------------------------------------------------
@dataclass(frozen=True)
class Store:
    settings: Settings
    resolved: ResolvedModel
    events: tuple[ProgressEvent, ...]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """An isolated store holding the real model, filled once through LazyLlama.prefetch()."""
    home = tmp_path_factory.mktemp("lazy-store")
    settings = Settings.from_env(env={"LLMLB_HOME": str(home), **OFFLINE_ENV})
    events: list[ProgressEvent] = []
    with ModelResolver(settings) as resolver:
        resolved = LazyLlama(MODEL, resolver=resolver, progress=events.append).prefetch()
    return Store(settings, resolved, tuple(events))


@pytest.fixture
def resolver(store: Store) -> Iterator[ModelResolver]:
    with ModelResolver(store.settings) as r:
        yield r


@pytest.fixture(autouse=True)
def _no_offload_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


class TrackedLlama(llama_cpp.Llama):
    """The real Llama, reporting completions and closes to its Tracker (a counter, not a mock)."""

    tracker: Tracker

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        with self.tracker.inside():
            result = super().create_completion(*args, **kwargs)
        if isinstance(result, Iterator):
            return self.tracker.watch(result)
        return result

    def close(self) -> None:
        tracker = getattr(self, "tracker", None)
        if tracker is not None:
            tracker.closed.append(id(self))
        super().close()


class Tracker:
    """A `llama_factory` that builds real TrackedLlamas and records what happens to them."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.built: list[dict[str, Any]] = []
        self.closed: list[int] = []
        self.chunks: list[int] = []  # per streamed chunk: which stream produced it
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self._streams = 0

    def factory(self, **kwargs: Any) -> TrackedLlama:
        with self._lock:
            self.built.append(kwargs)
        time.sleep(self.delay)  # widens the window in which concurrent first calls race
        llama = TrackedLlama(**kwargs)
        llama.tracker = self
        return llama

    @contextmanager
    def inside(self) -> Iterator[None]:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1

    def watch(self, stream: Iterator[Any]) -> Iterator[Any]:
        with self._lock:
            self._streams += 1
            sid = self._streams
        while True:
            with self.inside():
                try:
                    chunk = next(stream)
                except StopIteration:
                    return
                self.chunks.append(sid)
            yield chunk

    def reset(self) -> None:
        with self._lock:
            self.chunks.clear()
            self.max_active = 0


def make(resolver: ModelResolver, tracker: Tracker | None = None, **kw: Any) -> LazyLlama:
    llm = LazyLlama(MODEL, resolver=resolver, **{**LLAMA_KW, **kw})
    if tracker is not None:
        llm.llama_factory = tracker.factory
    return llm


def run_threads(n: int, target: Any) -> list[Any]:
    """Run target(i) in n threads started together; return the results (errors re-raised)."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "deadlock: threads still running"
    if errors:
        raise errors[0]
    return results


def in_thread(fn: Any) -> Any:
    """fn() in another thread, failing instead of hanging if it deadlocks."""
    return run_threads(1, lambda _: fn())[0]


def text_of(result: dict[str, Any]) -> str:
    assert result["object"] == "text_completion"
    text = result["choices"][0]["text"]
    assert isinstance(text, str)
    return text


@pytest.fixture(scope="module")
def tracker() -> Tracker:
    return Tracker()


@pytest.fixture(scope="module")
def llm(store: Store, tracker: Tracker) -> Iterator[LazyLlama]:
    """One loaded model shared by the read-only tests."""
    with ModelResolver(store.settings) as resolver:
        model = make(resolver, tracker)
        model.load()
        yield model
        model.close()


# -- construction --------------------------------------------------------------------------------
def test_construction_does_no_io_and_does_not_import_llama_cpp(tmp_path: Path) -> None:
    home = tmp_path / "home"
    code = textwrap.dedent(
        """
        import json, sys
        import llmlb_node
        from llmlb_node import LazyLlama

        recording = False
        events = []

        def hook(event, args):
            if recording and (event == "open" or event.startswith(("socket.", "os.mkdir"))):
                events.append([event, str(args[0]) if args else ""])

        sys.addaudithook(hook)
        recording = True
        llm = LazyLlama("gemma-3-270m", n_ctx=64, n_gpu_layers="auto", verbose=False)
        other = LazyLlama("x")
        recording = False
        print(json.dumps({
            "events": events,
            "llama_cpp": sorted(m for m in sys.modules if m.split(".")[0] == "llama_cpp"),
            "state": [llm.is_loaded, llm.model_path, llm.offload, repr(llm), repr(other)],
        }))
        """
    )
    env = {**os.environ, "LLMLB_HOME": str(home), **OFFLINE_ENV}
    env.pop("LLMLB_MODELS_DIR", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["llama_cpp"] == []
    # The only file read is llama_cpp's own source, for Llama.__init__'s keyword names.
    opened = {Path(path).name for event, path in data["events"] if event == "open"}
    assert opened <= {"llama.py"}, data["events"]
    assert not [e for e in data["events"] if e[0] != "open"], data["events"]
    assert data["state"][:3] == [False, None, None]
    assert data["state"][3:] == [
        "<LazyLlama 'gemma-3-270m' not loaded>",
        "<LazyLlama 'x' not loaded>",
    ]
    assert not home.exists()


def test_keyword_typo_raises_with_the_closest_name() -> None:
    with pytest.raises(TypeError, match=r"'n_gpu_layer'; did you mean 'n_gpu_layers'\?"):
        LazyLlama(MODEL, n_gpu_layer=10)
    with pytest.raises(TypeError) as info:
        LazyLlama(MODEL, n_ctxx=512, flash_atn=True, zzz=1)
    message = str(info.value)
    assert "did you mean 'n_ctx'?" in message
    assert "did you mean 'flash_attn'?" in message
    assert "'zzz'" in message


def test_model_path_and_bad_values_are_refused() -> None:
    with pytest.raises(TypeError, match="model_path"):
        LazyLlama(MODEL, model_path="/tmp/x.gguf")
    with pytest.raises(ValueError, match="n_gpu_layers"):
        LazyLlama(MODEL, n_gpu_layers="lots")
    with pytest.raises(TypeError, match="n_gpu_layers"):
        LazyLlama(MODEL, n_gpu_layers=1.5)
    with pytest.raises(InvalidModelIdError):
        LazyLlama("../etc/passwd")
    for value in ("auto", "AUTO", None, 0, -1, 12, "8"):
        assert LazyLlama(MODEL, n_gpu_layers=value).llama_kwargs["n_gpu_layers"] == value
    assert LazyLlama(MODEL, n_ctx=64).llama_kwargs == {"n_ctx": 64, "n_gpu_layers": "auto"}


def test_llama_api_is_read_from_the_installed_source(monkeypatch: pytest.MonkeyPatch) -> None:
    api = lazy._llama_api()
    assert Path(api.origin).name == "llama.py"
    real = set(inspect.signature(llama_cpp.Llama.__init__).parameters)
    assert api.params == real - {"self", "model_path", "kwargs"}
    public = {n for n in dir(llama_cpp.Llama) if not n.startswith("_")}
    assert api.attributes is not None
    assert public <= api.attributes
    assert {"n_tokens", "metadata", "model_path"} <= api.attributes  # instance attributes too

    monkeypatch.setattr(lazy, "_find_llama_source", lambda: None)
    fallback = lazy._llama_api.__wrapped__()
    assert (fallback.origin, fallback.attributes) == ("fallback", None)
    assert fallback.params == lazy._FALLBACK_PARAMS
    assert "n_gpu_layers" in fallback.params and "model_path" not in fallback.params


# -- resolution ----------------------------------------------------------------------------------
def test_prefetch_resolves_without_loading(store: Store, resolver: ModelResolver) -> None:
    stages = [e.stage for e in store.events]
    assert stages[-1] == "installed" and "downloading" in stages
    assert store.resolved.path.stat().st_size == 253_113_024

    llm = make(resolver)
    assert llm.model_path == str(store.resolved.path)  # installed: known without resolving
    resolved = llm.prefetch()
    assert resolved.path == store.resolved.path and resolved.source == "local"
    assert llm.model_path == str(store.resolved.path)  # a str, as Llama.model_path
    assert not llm.is_loaded and llm.offload is None
    assert repr(llm) == f"<LazyLlama {MODEL!r} resolved to {resolved.path}, not loaded>"


def test_unknown_model_is_reported_at_first_use(resolver: ModelResolver) -> None:
    llm = LazyLlama("gemma-3-270", resolver=resolver, **LLAMA_KW)  # constructing is fine
    with pytest.raises(UnsupportedModelError, match="gemma-3-270m") as info:
        llm("Hello", max_tokens=2)
    assert info.value.model_id == "gemma-3-270"
    for use in (llm.prefetch, llm.load, lambda: llm.tokenize(b"x"), lambda: llm.n_ctx()):
        with pytest.raises(UnsupportedModelError):
            use()
    assert not llm.is_loaded and llm.model_path is None


def test_unknown_attributes_raise_without_loading(resolver: ModelResolver) -> None:
    llm = make(resolver)
    with pytest.raises(AttributeError, match="did you mean 'create_completion'"):
        llm.create_completon  # noqa: B018
    assert not hasattr(llm, "_private_thing")
    assert not hasattr(llm, "__deepcopy_hook__")
    assert not llm.is_loaded
    assert "create_chat_completion_openai_v1" in dir(llm)


# -- loading and inference -----------------------------------------------------------------------
def test_first_call_loads_once_and_generates(
    store: Store, resolver: ModelResolver, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = Tracker()
    llm = make(resolver, tracker)
    with caplog.at_level(logging.INFO, logger="llmlb_node"):
        out = llm("The capital of France is", max_tokens=4)
    assert text_of(out)
    assert out["usage"]["completion_tokens"] <= 4
    assert llm.is_loaded and llm.model_path == str(store.resolved.path)
    assert len(tracker.built) == 1
    built = tracker.built[0]
    assert built["model_path"] == str(store.resolved.path)
    assert built["n_gpu_layers"] == 0 and built["n_ctx"] == 256 and built["verbose"] is False
    plan_logs = [
        r for r in caplog.records if r.name == "llmlb_node.lazy" and "offload plan" in r.message
    ]
    assert len(plan_logs) == 1 and plan_logs[0].levelno == logging.INFO
    assert str(llm.offload) in plan_logs[0].getMessage()
    assert repr(llm).startswith(f"<LazyLlama {MODEL!r} loaded from {store.resolved.path} (cpu, ")

    text_of(llm.create_completion("Paris is", max_tokens=2))
    assert len(tracker.built) == 1
    llm.close()


def test_auto_offload_plan_is_cpu_here(llm: LazyLlama, tracker: Tracker) -> None:
    plan = llm.offload
    assert plan is not None
    assert (plan.n_gpu_layers, plan.backend) == (0, "cpu")
    assert plan.reason
    assert tracker.built[0]["n_gpu_layers"] == 0


def test_explicit_n_gpu_layers_wins_over_the_environment(
    resolver: ModelResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, "7")
    tracker = Tracker()
    with make(resolver, tracker, n_gpu_layers=0) as llm:
        text_of(llm("Hi", max_tokens=1))
        assert llm.offload is not None
        assert llm.offload.n_gpu_layers == 0 and "explicit n_gpu_layers=0" in llm.offload.reason
    assert tracker.built[0]["n_gpu_layers"] == 0

    monkeypatch.setenv(ENV_VAR, "0")
    with make(resolver, tracker) as llm:  # "auto": the environment decides
        llm.load()
        assert llm.offload is not None and ENV_VAR in llm.offload.reason
    assert tracker.built[1]["n_gpu_layers"] == 0


def test_chat_completion(llm: LazyLlama) -> None:
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert out["object"] == "chat.completion"
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)


def test_tokenize_detokenize_roundtrip(llm: LazyLlama) -> None:
    tokens = llm.tokenize(b"Hello world, this is llmlb.", add_bos=False)
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert llm.detokenize(tokens) == b"Hello world, this is llmlb."
    assert llm.n_ctx() == 256
    assert isinstance(llm.n_tokens, int)  # data attributes are read from the model


def test_embeddings(resolver: ModelResolver) -> None:
    with make(resolver, embedding=True) as llm:
        vectors = llm.embed("hello")
        assert vectors and isinstance(vectors[0], list) and isinstance(vectors[0][0], float)
        out = llm.create_embedding("hello")
        assert out["object"] == "list" and out["data"][0]["embedding"]


def test_loaded_methods_skip_getattr(llm: LazyLlama, monkeypatch: pytest.MonkeyPatch) -> None:
    hits: list[str] = []
    original = LazyLlama.__getattr__

    def counting(self: LazyLlama, name: str) -> Any:
        hits.append(name)
        return original(self, name)

    monkeypatch.setattr(LazyLlama, "__getattr__", counting)
    for _ in range(2):
        text_of(llm("One", max_tokens=1))
        text_of(llm.create_completion("Two", max_tokens=1))
        llm.tokenize(b"three")
        llm.detokenize([1])
        assert llm.n_vocab() > 0
    assert hits == ["n_vocab"]  # bound on first access, then found in the instance __dict__
    bound = vars(llm)
    for name in ("__call__", "create_completion", "create_chat_completion", "tokenize", "n_vocab"):
        assert callable(bound[name])
    assert llm.create_completion is llm.create_completion
    assert "tokens" in inspect.signature(llm.detokenize).parameters  # Llama's own signature


def test_concurrent_first_calls_load_exactly_once(resolver: ModelResolver) -> None:
    tracker = Tracker(delay=0.3)
    with make(resolver, tracker) as llm:
        results = run_threads(8, lambda i: llm(f"Number {i} is", max_tokens=2))
        assert len(tracker.built) == 1
        assert all(text_of(r) is not None for r in results)
        assert tracker.max_active == 1


def test_sixteen_threads_share_one_instance(llm: LazyLlama, tracker: Tracker) -> None:
    tracker.reset()
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(llm, f"Item {i}:", max_tokens=3) for i in range(16)]
        results = [f.result(timeout=JOIN_S) for f in futures]
    assert len(results) == 16
    assert len({r["id"] for r in results}) == 16
    for r in results:
        text_of(r)
    assert tracker.max_active == 1  # never two completions inside the context at once


# -- streams -------------------------------------------------------------------------------------
def test_stream_yields_chunks(llm: LazyLlama) -> None:
    stream = llm("Once upon a time", max_tokens=6, stream=True)
    assert inspect.isgenerator(stream)  # a real generator, as Llama's streams are
    chunks = list(stream)
    assert 1 <= len(chunks) <= 7
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks)

    chat = list(
        llm.create_chat_completion(
            messages=[{"role": "user", "content": "Count to three."}], max_tokens=6, stream=True
        )
    )
    assert chat[0]["object"] == "chat.completion.chunk"
    assert chat[0]["choices"][0]["delta"].get("role") == "assistant"


def test_streams_do_not_interleave(llm: LazyLlama, tracker: Tracker) -> None:
    tracker.reset()
    got: list[int] = []

    def consume(i: int) -> int:
        n = 0
        for _ in llm(f"Story {i}: once upon a time", max_tokens=8, stream=True):
            got.append(i)
            n += 1
            time.sleep(0.005)  # give the other stream every chance to cut in
        return n

    counts = run_threads(2, consume)
    assert all(counts)
    assert got == sorted(got, key=got.index)  # all of one stream, then all of the other
    assert tracker.chunks == sorted(tracker.chunks)
    assert tracker.max_active == 1


def test_stream_consumed_from_a_thread_pool(llm: LazyLlama, tracker: Tracker) -> None:
    """An asyncio server pulling each chunk in whatever worker thread is free."""
    tracker.reset()

    async def consume(i: int) -> int:
        stream = llm(f"Tale {i}:", max_tokens=6, stream=True)
        n = 0
        while await asyncio.to_thread(next, stream, None) is not None:
            n += 1
        return n

    async def main() -> list[int]:
        return await asyncio.wait_for(asyncio.gather(consume(1), consume(2), consume(3)), JOIN_S)

    assert all(asyncio.run(main()))
    assert tracker.chunks == sorted(tracker.chunks)
    assert tracker.max_active == 1


def test_abandoned_streams_release_the_lock(llm: LazyLlama) -> None:
    never_started = llm("Never read", max_tokens=4, stream=True)
    text_of(in_thread(lambda: llm("Still works", max_tokens=1)))

    started = llm("Read once", max_tokens=8, stream=True)
    next(started)
    started.close()
    text_of(in_thread(lambda: llm("Works after close", max_tokens=1)))

    dropped = llm("Dropped", max_tokens=8, stream=True)
    next(dropped)
    del dropped  # finalized at once: no reference cycle keeps it (and the lock) alive
    text_of(in_thread(lambda: llm("Works after drop", max_tokens=1)))
    del never_started


def test_callbacks_may_call_back_into_the_same_instance(llm: LazyLlama) -> None:
    seen: list[bytes] = []

    def stop(tokens: Any, logits: Any) -> bool:
        seen.append(llm.detokenize(list(tokens[-1:])))  # re-enters the lock in the same thread
        return False

    criteria = llama_cpp.StoppingCriteriaList([stop])
    text_of(in_thread(lambda: llm("Hello", max_tokens=2, stopping_criteria=criteria)))
    assert seen
    seen.clear()
    chunks = in_thread(
        lambda: list(llm("Hello", max_tokens=3, stream=True, stopping_criteria=criteria))
    )
    assert chunks and seen


def test_generator_protocol_is_forwarded(llm: LazyLlama) -> None:
    gen = llm.generate(llm.tokenize(b"The sky is"), temp=0.0)
    first = next(gen)
    second = gen.send(None)
    assert isinstance(first, int) and isinstance(second, int)
    gen.close()
    with pytest.raises(StopIteration):
        next(gen)
    text_of(in_thread(lambda: llm("Free again", max_tokens=1)))


# -- closing -------------------------------------------------------------------------------------
def test_close_frees_and_the_next_use_reloads(store: Store, resolver: ModelResolver) -> None:
    tracker = Tracker()
    llm = make(resolver, tracker)
    first = llm.load()
    assert llm.load() is first
    stale = llm.create_completion  # a bound method someone kept
    llm.close()
    assert tracker.closed == [id(first)]
    assert not llm.is_loaded and llm.offload is None
    assert "create_completion" not in vars(llm)
    assert llm.model_path == str(store.resolved.path)
    assert repr(llm).endswith("closed>")
    llm.close()  # idempotent

    text_of(llm("Reloaded", max_tokens=1))
    assert len(tracker.built) == 2 and llm.load() is not first
    text_of(stale("The stale method", max_tokens=1))  # goes to the new model
    assert len(tracker.built) == 2
    second = llm.load()
    llm.close()
    assert {id(first), id(second)} <= set(tracker.closed)  # (Llama.__del__ closes again: fine)


def test_context_manager_closes(resolver: ModelResolver) -> None:
    tracker = Tracker()
    with make(resolver, tracker) as llm:
        assert not llm.is_loaded  # entering does not load
        text_of(llm("Hello", max_tokens=1))
        loaded = llm.load()
    assert not llm.is_loaded and id(loaded) in tracker.closed


def test_dropping_a_loaded_instance_frees_the_model(resolver: ModelResolver) -> None:
    llm = make(resolver)
    ref = weakref.ref(llm.load())
    text_of(llm("Hi", max_tokens=1))
    del llm
    assert ref() is None  # freed by refcounting alone: no cycle waits for the garbage collector


# -- failures ------------------------------------------------------------------------------------
def test_corrupt_gguf_raises_model_load_error(tmp_path: Path) -> None:
    settings = Settings.from_env(env={"LLMLB_HOME": str(tmp_path), **OFFLINE_ENV})
    path = settings.models_dir / "broken-model" / "model.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(make_gguf(16_384))  # structurally whole, but no model llama.cpp knows
    with ModelResolver(settings) as resolver:
        llm = LazyLlama("broken-model", resolver=resolver, **LLAMA_KW)
        assert llm.prefetch().path == path  # the store accepts a whole GGUF placed by hand
        with pytest.raises(ModelLoadError) as info:
            llm("Hello", max_tokens=1)
        message = str(info.value)
        assert str(path) in message and "'broken-model'" in message
        assert "offload plan: cpu" in message
        assert isinstance(info.value.__cause__, (ValueError, RuntimeError))
        assert not llm.is_loaded and llm.offload is None
        with pytest.raises(ModelLoadError):  # nothing cached: the next use tries again
            llm.load()


# -- asyncio -------------------------------------------------------------------------------------
def test_loading_in_a_thread_keeps_the_event_loop_responsive(resolver: ModelResolver) -> None:
    llm = make(resolver, n_ctx=512)

    async def main() -> tuple[float, float, int]:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        await asyncio.to_thread(llm.load)
        load_time = time.perf_counter() - started
        done.set()
        await task
        return load_time, max(gaps), len(gaps)

    try:
        load_time, max_gap, ticks = asyncio.run(main())
    finally:
        llm.close()
    assert load_time > 0.1
    # A blocked loop: one gap of ~load_time. Half of it leaves room for a loaded machine's
    # scheduler pauses (a fixed 0.2 s and a tick rate did not).
    assert max_gap < load_time / 2, (load_time, max_gap)
    assert ticks >= 3


def test_fast_signature_read_matches_a_full_parse_of_llama_py() -> None:
    from llmlb_node import lazy

    source = lazy._find_llama_source()
    assert source is not None
    text = source.read_text(encoding="utf-8")
    assert lazy._parse_init_params(text) == lazy._parse_llama_source(source).params
    # An unusual layout falls back to parsing the function, with the same answer.
    odd = text.replace("\n        verbose: bool = True,", " verbose: bool = True,", 1)
    assert odd != text
    assert lazy._parse_init_params(odd) == lazy._parse_llama_source(source).params


# -- never waiting on this thread's own stream ---------------------------------------------------
def test_readme_pattern_detokenize_each_token_of_generate(llm: LazyLlama) -> None:
    """The README's ``for t in llm.generate(tokens): llm.detokenize([t])`` runs to its end."""

    def readme_pattern() -> list[bytes]:
        pieces = []
        for t in llm.generate(llm.tokenize(b"The capital of France is"), temp=0.0):
            pieces.append(llm.detokenize([t]))
            if len(pieces) == 6:
                break
        return pieces

    pieces = in_thread(readme_pattern)  # fails instead of hanging
    assert len(pieces) == 6 and all(isinstance(p, bytes) for p in pieces)
    assert b"".join(pieces).strip()
    text_of(in_thread(lambda: llm("Free again", max_tokens=1)))  # the break closed the stream


def test_own_open_stream_lets_reads_through_and_refuses_a_second_generation(
    llm: LazyLlama,
) -> None:
    def scenario() -> dict[str, Any]:
        stream = llm("Once upon a time", max_tokens=8, stream=True)
        first = next(stream)
        seen = {
            "first": first["object"],
            "tokens": llm.tokenize(b"hello"),
            "text": llm.detokenize(llm.tokenize(b"hello", add_bos=False)),
            "n_ctx": llm.n_ctx(),
            "metadata": "general.architecture" in llm.metadata,
            "n_tokens": llm.n_tokens,
        }
        errors = []
        for second in (
            lambda: llm("Another", max_tokens=1),
            lambda: next(llm("Another", max_tokens=2, stream=True)),
            lambda: list(zip(llm("A", max_tokens=2, stream=True), stream, strict=False)),
            llm.close,
        ):
            with pytest.raises(RuntimeError, match="stream of this LazyLlama is open") as info:
                second()
            errors.append(str(info.value))
        seen["errors"] = errors
        seen["rest"] = len(list(stream))  # the open stream is unharmed and still finishes
        seen["after"] = text_of(llm("Then", max_tokens=1))
        return seen

    seen = in_thread(scenario)
    assert seen["first"] == "text_completion" and seen["tokens"] and seen["n_ctx"] == 256
    assert seen["text"] == b"hello" and seen["metadata"] and seen["n_tokens"] > 0
    assert len(seen["errors"]) == 4 and "consume or close() it first" in seen["errors"][0]
    assert seen["rest"] >= 1 and isinstance(seen["after"], str)


def test_other_threads_wait_for_an_open_stream(llm: LazyLlama) -> None:
    stream = llm("Once upon a time", max_tokens=8, stream=True)
    next(stream)
    started, done = threading.Event(), threading.Event()

    def other() -> list[int]:
        started.set()
        tokens = llm.tokenize(b"waits its turn")
        done.set()
        return tokens

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(other)
        assert started.wait(JOIN_S)
        assert not done.wait(0.3)  # held back while the stream is open
        stream.close()
        assert future.result(JOIN_S)


# -- behaving like llama_cpp.Llama ---------------------------------------------------------------
def test_attribute_writes_reach_the_model(store: Store, resolver: ModelResolver) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    plain = llama_cpp.Llama(model_path=str(store.resolved.path), **LLAMA_KW)
    plain.chat_format = "chatml"
    want = plain.create_chat_completion(messages=messages, max_tokens=8, temperature=0.0)
    plain.close()

    before = make(resolver)
    before.chat_format = "chatml"  # before the load: kept, applied right after it
    cache = llama_cpp.LlamaRAMCache(capacity_bytes=1 << 20)
    before.cache = cache
    assert before.chat_format == "chatml" and not before.is_loaded
    got = before.create_chat_completion(messages=messages, max_tokens=8, temperature=0.0)
    assert before.llama.chat_format == "chatml" and before.llama.cache is cache
    assert got["choices"][0]["message"] == want["choices"][0]["message"]

    after = make(resolver)
    after.load()
    after.chat_format = "chatml"
    after.verbose = True
    assert after.llama.chat_format == "chatml" and after.llama.verbose is True
    got = after.create_chat_completion(messages=messages, max_tokens=8, temperature=0.0)
    assert got["choices"][0]["message"] == want["choices"][0]["message"]
    after.close()
    after.load()  # a reload keeps what was written
    assert after.llama.chat_format == "chatml"
    for model in (before, after):
        model.close()


def test_pickle_and_copies_are_independent_and_reload_lazily(
    store: Store, resolver: ModelResolver
) -> None:
    import copy
    import pickle

    llm = make(resolver, n_gpu_layers=0)
    llm.chat_format = "chatml"
    want = text_of(llm("The sky is", max_tokens=4, temperature=0.0))

    for clone in (pickle.loads(pickle.dumps(llm)), copy.deepcopy(llm), copy.copy(llm)):
        assert isinstance(clone, LazyLlama) and not clone.is_loaded
        assert clone.model_id == MODEL and clone.llama_kwargs == llm.llama_kwargs
        assert clone.chat_format == "chatml"
        assert text_of(clone("The sky is", max_tokens=4, temperature=0.0)) == want
        assert clone.llama is not llm.llama
        clone.close()  # frees the clone's model only
        assert llm.is_loaded
        assert text_of(llm("The sky is", max_tokens=4, temperature=0.0)) == want
    llm.close()


def test_pickles_carry_no_secrets(store: Store) -> None:
    import pickle

    settings = Settings.from_env(
        env={
            "LLMLB_HOME": str(store.settings.home),
            "HF_TOKEN": "hf_secret_token",
            "LLMLB_API_KEY": "llmlb-secret-key",
            "LLMLB_URL": "http://node:llmlb-secret-password@127.0.0.1:9",
        }
    )
    with ModelResolver(settings) as resolver:
        data = pickle.dumps(LazyLlama(MODEL, resolver=resolver, **LLAMA_KW))
    assert b"hf_secret_token" not in data and b"llmlb-secret-key" not in data
    assert b"llmlb-secret-password" not in data
    clone = pickle.loads(data)
    assert clone.model_path == str(store.resolved.path)  # same store as the original


def test_matches_llama_where_it_is_cheap(store: Store, resolver: ModelResolver) -> None:
    llm = make(resolver)
    plain = llama_cpp.Llama(model_path=str(store.resolved.path), **LLAMA_KW)
    for name in ("create_completion", "create_chat_completion", "tokenize", "embed"):
        # Before the load, without loading: Llama's own signature.
        assert inspect.signature(getattr(llm, name)) == inspect.signature(getattr(plain, name))
    assert not llm.is_loaded
    assert isinstance(llm.model_path, str) and llm.model_path == plain.model_path
    assert inspect.isgenerator(llm("Hi", max_tokens=2, stream=True))
    assert not isinstance(llm, llama_cpp.Llama)  # documented: use .llama for type checks
    assert isinstance(llm.llama, llama_cpp.Llama) and llm.llama is llm.load()
    for name in ("create_completion", "tokenize"):
        assert inspect.signature(getattr(llm, name)) == inspect.signature(getattr(plain, name))
    llm.__del__()  # as callable as Llama.__del__, and frees the model
    assert not llm.is_loaded
    plain.close()


def test_kwargs_check_matches_the_installed_llama_signature() -> None:
    real = set(inspect.signature(llama_cpp.Llama.__init__).parameters)
    real -= {"self", "model_path", "kwargs"}
    assert lazy._llama_params() == real
    for name in real:
        LazyLlama(MODEL, **{name: None})  # every keyword the installed Llama takes is accepted


# -- architectures ---------------------------------------------------------------------------------
def _gguf_with_architecture(arch: str) -> bytes:
    """A structurally whole GGUF (no tensors) naming `arch` as its architecture."""
    import struct

    def text(value: str) -> bytes:
        return struct.pack("<Q", len(value.encode())) + value.encode()

    kv = text("general.architecture") + struct.pack("<I", 8) + text(arch)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv


def test_an_architecture_llama_cpp_does_not_know_is_named(tmp_path: Path) -> None:
    settings = Settings.from_env(env={"LLMLB_HOME": str(tmp_path), **OFFLINE_ENV})
    path = settings.models_dir / "alien-model" / "model.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(_gguf_with_architecture("nonexistent-arch"))
    with ModelResolver(settings) as resolver:
        assert resolver.status("alien-model").architecture == "nonexistent-arch"
        llm = LazyLlama("alien-model", resolver=resolver, **LLAMA_KW)
        with pytest.raises(ModelLoadError) as info:
            llm.load()
    version = llama_cpp.__version__
    assert (
        "architecture 'nonexistent-arch' is not supported by this llama.cpp build "
        f"(llama-cpp-python {version})"
    ) in str(info.value)
    assert lazy._unknown_architecture(path) == "nonexistent-arch"


def test_status_reports_the_architecture_of_the_installed_gguf(
    store: Store, resolver: ModelResolver
) -> None:
    status = resolver.status(MODEL)
    assert status.status in ("local", "completed") and status.architecture == "gemma3"
    assert lazy._unknown_architecture(store.resolved.path) is None  # gemma3 is built in


def test_import_llmlb_node_loads_no_submodule_until_a_name_is_used() -> None:
    code = textwrap.dedent(
        """
        import json, sys
        import llmlb_node
        before = sorted(m for m in sys.modules if m.startswith("llmlb_node."))
        typing_loaded = "typing" in sys.modules
        from llmlb_node import LazyLlama, ModelResolver, UnsupportedModelError
        names = [LazyLlama.__name__, ModelResolver.__name__, UnsupportedModelError.__name__]
        public = sorted(n for n in llmlb_node.__all__ if not n.startswith("_"))
        resolved = all(getattr(llmlb_node, n) is not None for n in public)
        print(json.dumps([before, typing_loaded, names, resolved, "LazyLlama" in dir(llmlb_node)]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    before, typing_loaded, names, resolved, listed = json.loads(out.stdout)
    assert before == [] and not typing_loaded  # `import llmlb_node` alone costs ~1 ms
    assert names == ["LazyLlama", "ModelResolver", "UnsupportedModelError"]
    assert resolved and listed
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        import llmlb_node

        llmlb_node.Nope  # noqa: B018
