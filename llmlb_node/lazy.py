"""LazyLlama: a `llama_cpp.Llama` stand-in that resolves, fetches and loads its model on first use.

Construction is free (no I/O, no llama_cpp import); the first inference call loads exactly once.
"""

from __future__ import annotations

import ast
import collections.abc
import functools
import importlib.util
import inspect
import logging
import re
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .catalog import check_id
from .errors import ModelLoadError

if TYPE_CHECKING:
    from llama_cpp import Llama

    from .offload import OffloadPlan
    from .progress import ProgressCallback
    from .resolver import ModelResolver, ResolvedModel

log = logging.getLogger(__name__)

__all__ = ["LazyLlama"]

# Keyword arguments of llama_cpp.Llama.__init__ in llama-cpp-python 0.3.x (minus model_path):
# used only when the installed llama_cpp source cannot be read.
# fmt: off
_FALLBACK_PARAMS = frozenset(
    (
        "n_gpu_layers", "split_mode", "main_gpu", "tensor_split", "vocab_only", "use_mmap",
        "use_mlock", "kv_overrides", "seed", "n_ctx", "n_batch", "n_ubatch", "n_threads",
        "n_threads_batch", "rope_scaling_type", "pooling_type", "attention_type", "rope_freq_base",
        "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast",
        "yarn_beta_slow", "yarn_orig_ctx", "logits_all", "embedding", "offload_kqv", "flash_attn",
        "op_offload",
        "swa_full", "no_perf", "last_n_tokens_size", "lora_base", "lora_scale", "lora_path", "numa",
        "chat_format", "chat_handler", "draft_model", "tokenizer", "type_k", "type_v", "spm_infill",
        "verbose",
    )
)
# fmt: on

# Bound eagerly into the instance __dict__ at load, so the first call after it is already fast.
_EAGER_METHODS = (
    "__call__",
    "create_completion",
    "create_chat_completion",
    "create_embedding",
    "embed",
    "tokenize",
    "detokenize",
)

# Llama.__init__ prints through these fds when verbose=False: llama-cpp-python's
# suppress_stdout_stderr dup2()s fds 1 and 2 process-wide, and two overlapping quiet loads can
# leave stdout/stderr pointing at /dev/null for good. Quiet constructions take turns.
_QUIET_LOAD_LOCK = threading.Lock()


# -- llama_cpp.Llama's API, read from its source without importing it ---------------------------
@dataclass(frozen=True)
class _LlamaApi:
    """What `llama_cpp.Llama` accepts and exposes, as read from the installed source."""

    params: frozenset[str]
    """Keyword arguments of ``Llama.__init__`` except ``self`` and ``model_path``."""
    attributes: frozenset[str] | None
    """Public attributes (methods, properties, ``self.x`` assignments); None if unknown."""
    origin: str
    """The file they were read from, or ``fallback``."""


def _find_llama_source() -> Path | None:
    """``llama_cpp/llama.py`` of the installed package, located without importing it."""
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        path = Path(location) / "llama.py"
        if path.is_file():
            return path
    return None


def _parse_llama_source(path: Path) -> _LlamaApi | None:
    """Parse `path` and return `Llama.__init__`'s parameters and `Llama`'s public attributes."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    cls = next(
        (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Llama"),
        None,
    )
    if cls is None:
        return None
    functions = [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    init = next((f for f in functions if f.name == "__init__"), None)
    if init is None:
        return None
    args = init.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    params = frozenset(names[1:]) - {"model_path"}  # names[0] is self

    attributes: set[str] = {f.name for f in functions}
    for node in cls.body:
        if isinstance(node, ast.Assign):
            attributes.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            attributes.add(node.target.id)
    for node in ast.walk(cls):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        ):
            attributes.add(node.attr)
    inherits = any(not (isinstance(b, ast.Name) and b.id == "object") for b in cls.bases)
    public = frozenset(a for a in attributes if not a.startswith("_"))
    return _LlamaApi(params, None if inherits else public, str(path))


@functools.lru_cache(maxsize=1)
def _llama_api() -> _LlamaApi:
    """The installed `llama_cpp.Llama`'s API (read once per process), or a known 0.3.x list."""
    path = _find_llama_source()
    if path is not None:
        try:
            api = _parse_llama_source(path)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError) as exc:
            log.debug("could not parse %s: %s", path, exc)
            api = None
        if api is not None and api.params:
            return api
        log.debug("no Llama.__init__ found in %s; using the built-in parameter list", path)
    return _LlamaApi(_FALLBACK_PARAMS, None, "fallback")


_NEXT_MEMBER = re.compile(r"\n    (?:@|def |async def |class )")
_SIGNATURE_END = re.compile(r"^    \)(?:\s*->\s*[^:\n]+)?:\s*$", re.M)
_PARAM_LINE = re.compile(r"^ {8}(\w+)\s*[:=,]", re.M)  # not *args / **kwargs: they take any name


def _parse_init_params(text: str) -> frozenset[str] | None:
    """``Llama.__init__``'s keyword names from the source text, parsing only that function.

    A fraction of the cost of parsing the whole module (which the attribute list needs, and
    which is left for the rare moment it is needed), so constructing a LazyLlama stays cheap.
    """
    cls = re.search(r"^class Llama\b", text, re.M)
    if cls is None:
        return None
    start = text.find("\n    def __init__(", cls.end())
    if start < 0:
        return None
    # The signature's lines are "        name: type = default," in every release: a regex reads
    # them in a fraction of a millisecond. Anything unusual goes to the parser below.
    close = _SIGNATURE_END.search(text, start)
    if close is not None:
        names = set(_PARAM_LINE.findall(text, start, close.start()))
        if {"n_ctx", "n_gpu_layers", "verbose"} <= names:
            return frozenset(names - {"self", "model_path"})
    end = _NEXT_MEMBER.search(text, start + 1)
    source = textwrap.dedent(text[start + 1 : end.start() if end else len(text)])
    func = ast.parse(source).body[0]
    if not isinstance(func, ast.FunctionDef):
        return None
    args = func.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    return frozenset(names[1:]) - {"model_path"}


@functools.lru_cache(maxsize=1)
def _llama_params() -> frozenset[str]:
    """Keyword arguments `llama_cpp.Llama` takes (read once per process)."""
    path = _find_llama_source()
    if path is not None:
        try:
            params = _parse_init_params(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError, IndexError) as exc:
            log.debug("could not read Llama.__init__ from %s: %s", path, exc)
            params = None
        if params:
            return params
    return _llama_api().params


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    """`TypeError` for any keyword `llama_cpp.Llama` does not take, with the closest name."""
    if "model_path" in kwargs:
        raise TypeError(
            "LazyLlama() does not take model_path: the resolver supplies the file; "
            "pass a model id instead (use llama_cpp.Llama directly for a file of your own)"
        )
    params = _llama_params()
    unknown = [k for k in kwargs if k not in params]
    if not unknown:
        return
    import difflib

    problems = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(params), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"{name!r}{hint}")
    raise TypeError(
        f"LazyLlama() got keyword argument(s) that llama_cpp.Llama does not take: "
        f"{', '.join(problems)}"
    )


def _check_gpu_layers(value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"n_gpu_layers must be an int or 'auto', not {type(value).__name__}")
    if isinstance(value, str) and value.strip().lower() != "auto":
        try:
            int(value.strip())
        except ValueError:
            raise ValueError(f"n_gpu_layers={value!r} must be an integer or 'auto'") from None


# -- the lock -----------------------------------------------------------------------------------
class _ModelLock:
    """Serializes use of one llama.cpp context.

    Re-entrant per thread (a stopping criterion or logits processor may call back into the same
    LazyLlama), releasable from any thread, and holdable by an open stream between chunks: a
    stream `detach`es (held, no owning thread) before yielding and `attach`es to whichever
    thread resumes it, so a stream may be consumed from a thread pool.
    """

    __slots__ = ("_lock", "_owner", "_depth")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0

    def acquire(self) -> bool:
        """Take the lock; True if this is the outermost acquisition."""
        me = threading.get_ident()
        if self._owner == me:  # only this thread ever stores its own ident
            self._depth += 1
            return False
        self._lock.acquire()
        self._owner = me
        self._depth = 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if not self._depth:
            self._owner = None
            self._lock.release()

    def detach(self) -> None:
        self._owner = None

    def attach(self) -> None:
        self._owner = threading.get_ident()

    def __enter__(self) -> _ModelLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_NEW, _OPEN, _DONE = 0, 1, 2
_PLAIN = frozenset({dict, list, tuple, str, bytes, int, float, bool, type(None)})


class _LockedStream(collections.abc.Generator):  # type: ignore[type-arg]
    """A streamed result that holds the model lock from its first item until it ends or closes.

    Forwards ``send``/``throw``/``close`` (``Llama.generate`` uses ``send``). The lock is taken
    lazily, at the first item, so creating a stream never blocks (an event loop may create one
    while another stream is open) and a stream that is never iterated never holds the lock.
    With `start`, the call that makes the inner iterator is itself deferred to the first item.
    """

    __slots__ = ("_it", "_start", "_lock", "_state", "_outer", "_busy", "__weakref__")

    def __init__(
        self,
        lock: _ModelLock,
        it: Iterator[Any] | None = None,
        start: Callable[[], Any] | None = None,
    ) -> None:
        self._it = it
        self._start = start
        self._lock = lock
        self._state = _NEW
        self._outer = False
        self._busy = threading.Lock()

    def send(self, value: Any) -> Any:
        return self._step(value, None)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if isinstance(typ, BaseException):
            exc = typ
        elif isinstance(val, BaseException):
            exc = val
        else:
            exc = typ() if val is None else typ(val)
        if tb is not None:
            exc = exc.with_traceback(tb)
        return self._step(None, exc)

    def _step(self, value: Any, exc: BaseException | None) -> Any:
        if not self._busy.acquire(blocking=False):
            raise ValueError("generator already executing")
        try:
            if self._state == _DONE:
                if exc is not None:
                    raise exc
                raise StopIteration
            if self._state == _NEW:
                if exc is not None:  # like a generator that never started
                    self._state = _DONE
                    raise exc
                self._outer = self._lock.acquire()
                self._state = _OPEN
                if self._start is not None:
                    try:
                        self._it = _as_iterator(self._start())
                    except BaseException:
                        self._state = _DONE
                        self._lock.release()
                        raise
                    finally:
                        self._start = None
            elif self._outer:
                self._lock.attach()
            try:
                if exc is not None:
                    if not hasattr(self._it, "throw"):
                        raise exc
                    item = self._it.throw(exc)
                elif value is None:
                    item = next(self._it)
                else:
                    item = self._it.send(value)  # type: ignore[union-attr]
            except BaseException:
                self._finish()
                raise
            if self._outer:
                self._lock.detach()
            return item
        finally:
            self._busy.release()

    def close(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise ValueError("generator already executing")
        try:
            if self._state == _OPEN:
                if self._outer:
                    self._lock.attach()
                self._finish()
            elif self._state == _NEW:
                self._state = _DONE
                self._start = None
        finally:
            self._busy.release()

    def _finish(self) -> None:
        """Close the inner iterator (still under the lock), then release the lock."""
        self._state = _DONE
        try:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
        finally:
            self._lock.release()

    def __del__(self) -> None:
        try:  # noqa: SIM105 - contextlib may be gone at interpreter shutdown
            self.close()
        except Exception:
            pass


def _as_iterator(result: Any) -> Iterator[Any]:
    if not isinstance(result, Iterator):
        raise TypeError(f"a stream=True call returned {type(result).__name__}, not an iterator")
    return result


class _Slot:
    """The loaded model: shared with the bound wrappers (which must not reference the LazyLlama,
    so that dropping it frees the model at once instead of at the next cyclic GC)."""

    __slots__ = ("lock", "llama", "plan")

    def __init__(self) -> None:
        self.lock = _ModelLock()
        self.llama: Any = None
        self.plan: OffloadPlan | None = None


def _parameters(fn: Callable[..., Any]) -> frozenset[str] | None:
    """`fn`'s parameter names, or None when it takes **kwargs (or has no readable signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


def _reload_and_call(owner_ref: weakref.ref[LazyLlama], name: str, args: Any, kwargs: Any) -> Any:
    """A bound method outlived its model (close()): load again and call the fresh one."""
    owner = owner_ref()
    if owner is None:
        raise ReferenceError("the LazyLlama this method was bound to no longer exists")
    return getattr(owner._load_locked(), name)(*args, **kwargs)


# -- LazyLlama ----------------------------------------------------------------------------------
class LazyLlama:
    """A model by id that behaves like `llama_cpp.Llama`, loading itself on first use.

    ``LazyLlama("gemma-3-270m", n_ctx=2048)`` costs nothing: no file or network access and no
    ``llama_cpp`` import (its keyword arguments are checked against ``llama_cpp.Llama.__init__``
    as read from the installed source). The first inference call (``llm(...)``,
    ``create_completion``, ``create_chat_completion``, ``create_embedding``, ``embed``,
    ``tokenize``, ``detokenize`` or any other public ``Llama`` attribute) resolves the model
    through the resolver chain (local store, Hugging Face, llmlb proxy), plans the GPU offload,
    loads it once, and delegates. Later calls go straight to a bound method cached on the
    instance.

    One llama.cpp context is not thread-safe, so calls on one LazyLlama are serialized. A
    ``stream=True`` call returns at once; the stream takes the lock at its first item and holds
    it until it is exhausted or closed, so two streams never interleave (a stream may be pulled
    from any thread). Consume or close a stream before calling ``close()`` from its thread.

    In an asyncio server, load and infer in a worker thread so the event loop keeps running::

        llm = LazyLlama("gemma-3-270m")
        await asyncio.to_thread(llm.load)  # the loop keeps serving while the model loads
        out = await asyncio.to_thread(llm.create_chat_completion, messages=messages)

    ``n_gpu_layers`` takes an int (always wins) or ``"auto"`` (the default: ``LLMLB_N_GPU_LAYERS``
    or GPU detection decides, see `llmlb_node.offload`). ``model_path`` is not accepted.
    Errors: resolution errors propagate as they are (`UnsupportedModelError`,
    `ModelDownloadError`, ...); a llama.cpp failure to load raises `ModelLoadError`.
    """

    llama_factory: Callable[..., Llama] | None = None
    """What builds the model, called as ``factory(model_path=..., n_gpu_layers=..., **kwargs)``;
    None means ``llama_cpp.Llama``. Set it on an instance or subclass to use a Llama subclass or
    to observe construction."""

    def __init__(
        self,
        model_id: str,
        *,
        resolver: ModelResolver | None = None,
        progress: ProgressCallback | None = None,
        **llama_kwargs: Any,
    ) -> None:
        check_id(model_id)  # a malformed id is a programming error: report it now
        n_gpu_layers = llama_kwargs.pop("n_gpu_layers", "auto")
        _check_gpu_layers(n_gpu_layers)
        _check_kwargs(llama_kwargs)
        self._model_id = model_id
        self._resolver = resolver
        self._owns_resolver = resolver is None
        self._progress = progress
        self._n_gpu_layers: int | str | None = n_gpu_layers
        self._llama_kwargs = llama_kwargs
        self._resolved: ResolvedModel | None = None
        self._slot = _Slot()
        self._bound_names: set[str] = set()
        self._closed = False
        self._init_lock = threading.Lock()
        self._bind_lock = threading.Lock()

    # -- state ------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def model_path(self) -> Path | None:
        """The resolved main GGUF file, or None before resolution."""
        resolved = self._resolved
        return None if resolved is None else resolved.path

    @property
    def is_loaded(self) -> bool:
        return self._slot.llama is not None

    @property
    def offload(self) -> OffloadPlan | None:
        """The offload plan the loaded model uses, or None when not loaded."""
        slot = self._slot
        return slot.plan if slot.llama is not None else None

    @property
    def llama_kwargs(self) -> dict[str, Any]:
        """The keyword arguments passed to ``llama_cpp.Llama`` (``n_gpu_layers`` as requested)."""
        return {**self._llama_kwargs, "n_gpu_layers": self._n_gpu_layers}

    # -- explicit lifecycle -----------------------------------------------------------------
    def prefetch(self) -> ResolvedModel:
        """Resolve the model (download and verify it if needed) without loading it."""
        resolved = self._get_resolver().resolve(self._model_id, progress=self._progress)
        self._resolved = resolved
        return resolved

    def load(self) -> Llama:
        """Resolve and load the model now (once); return the underlying ``llama_cpp.Llama``."""
        llama = self._slot.llama
        if llama is not None:
            return llama
        with self._slot.lock:
            return self._load_locked()

    def close(self) -> None:
        """Free the llama.cpp model (waits for calls in progress); the next use loads again."""
        slot = self._slot
        with slot.lock:
            with self._bind_lock:
                llama = slot.llama
                slot.llama = None
                slot.plan = None
                for name in self._bound_names:
                    self.__dict__.pop(name, None)
                self._bound_names.clear()
            if llama is not None:
                self._closed = True
                close = getattr(llama, "close", None)
                if close is not None:
                    close()  # frees the model and context now, not whenever GC runs
                log.info("%s: model closed", self._model_id)
        if self._owns_resolver and self._resolver is not None:
            self._resolver.close()

    def __enter__(self) -> LazyLlama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- delegation -------------------------------------------------------------------------
    # These are reached only before the model is loaded (or after close()): loading binds a
    # locked wrapper of the same name in the instance __dict__, which shadows them.
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``llama_cpp.Llama.__call__``: a text completion (see ``create_completion``)."""
        call = self.__dict__.get("__call__")  # special methods are looked up on the type
        if call is None:
            call = self._bound("__call__")
        return call(*args, **kwargs)

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        """``llama_cpp.Llama.create_completion``, loading the model first if needed."""
        return self._bound("create_completion")(*args, **kwargs)

    def create_chat_completion(self, *args: Any, **kwargs: Any) -> Any:
        """``llama_cpp.Llama.create_chat_completion``, loading the model first if needed."""
        return self._bound("create_chat_completion")(*args, **kwargs)

    def create_embedding(self, *args: Any, **kwargs: Any) -> Any:
        """``llama_cpp.Llama.create_embedding``, loading the model first if needed."""
        return self._bound("create_embedding")(*args, **kwargs)

    def embed(self, *args: Any, **kwargs: Any) -> Any:
        """``llama_cpp.Llama.embed``, loading the model first if needed."""
        return self._bound("embed")(*args, **kwargs)

    def tokenize(self, *args: Any, **kwargs: Any) -> Any:
        """``llama_cpp.Llama.tokenize``, loading the model first if needed."""
        return self._bound("tokenize")(*args, **kwargs)

    def detokenize(self, *args: Any, **kwargs: Any) -> Any:
        """``llama_cpp.Llama.detokenize``, loading the model first if needed."""
        return self._bound("detokenize")(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not found normally: private names never load anything (copy,
        # pickle and friends probe them), nor do names llama_cpp.Llama does not have.
        if name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        known = _llama_api().attributes
        if known is not None and name not in known and self._slot.llama is None:
            raise AttributeError(self._no_attribute(name, known))
        llama = self.load()
        try:
            value = getattr(llama, name)
        except AttributeError:
            raise AttributeError(self._no_attribute(name, known or frozenset())) from None
        if inspect.ismethod(value) and value.__self__ is llama:
            return self._bound(name)
        return value  # data attributes are read live, never cached

    def __dir__(self) -> list[str]:
        names = set(super().__dir__())
        names.update(_llama_api().attributes or ())
        return sorted(names)

    def __repr__(self) -> str:
        slot = self._slot
        plan = slot.plan
        path = self.model_path
        if slot.llama is not None and plan is not None:
            state = f"loaded from {path} ({plan.backend}, {plan.layers_text})"
        elif path is not None:
            state = f"resolved to {path}, " + ("closed" if self._closed else "not loaded")
        else:
            state = "not loaded"
        return f"<LazyLlama {self._model_id!r} {state}>"

    # -- internals --------------------------------------------------------------------------
    def _get_resolver(self) -> ModelResolver:
        resolver = self._resolver
        if resolver is None:
            with self._init_lock:
                if self._resolver is None:
                    from .resolver import ModelResolver

                    self._resolver = ModelResolver()
                resolver = self._resolver
        return resolver

    def _factory(self) -> Callable[..., Any]:
        # getattr_static: a plain function set on a subclass must not be bound to self.
        factory = inspect.getattr_static(self, "llama_factory", None)
        if isinstance(factory, (staticmethod, classmethod)):
            factory = factory.__get__(self, type(self))
        if factory is None:
            from llama_cpp import Llama

            factory = Llama
        return factory

    def _bound(self, name: str) -> Callable[..., Any]:
        """The locked wrapper of the model's method `name`, loading the model first if needed.

        Binding does not take the model lock (it may be held by an open stream for long).
        """
        slot = self._slot
        while True:
            llama = slot.llama
            if llama is None:
                with slot.lock:
                    llama = self._load_locked()
            with self._bind_lock:
                if slot.llama is not llama:  # closed in between: start over
                    continue
                wrapper = self.__dict__.get(name) if name in self._bound_names else None
                return wrapper if wrapper is not None else self._bind(name, llama)

    def _bind(self, name: str, llama: Any) -> Callable[..., Any]:
        """Cache in the instance __dict__ a wrapper calling `llama.name` under the model lock.

        The wrapper costs one lock round trip and one identity check over the plain call; if
        the model was closed since, it loads again and calls the new one. Streaming calls
        (``stream=True``, generator methods) return at once and do all their work, the call
        itself included, under the lock while being iterated. Caller holds `_bind_lock`.
        """
        fn = getattr(llama, name)
        slot = self._slot
        lock = slot.lock
        acquire, release = lock.acquire, lock.release
        owner_ref = weakref.ref(self)
        params = _parameters(fn)
        generator = inspect.isgeneratorfunction(fn)
        may_stream = params is None or "stream" in params

        def invoke(args: Any, kwargs: Any) -> Any:  # the caller holds the lock
            if slot.llama is llama:
                return fn(*args, **kwargs)
            return _reload_and_call(owner_ref, name, args, kwargs)

        def call(*args: Any, **kwargs: Any) -> Any:
            if generator or (may_stream and kwargs.get("stream")):
                return _LockedStream(lock, start=functools.partial(invoke, args, kwargs))
            acquire()
            try:
                if slot.llama is llama:
                    result = fn(*args, **kwargs)
                else:
                    result = _reload_and_call(owner_ref, name, args, kwargs)
            finally:
                release()
            if type(result) in _PLAIN or not isinstance(result, Iterator):
                return result
            return _LockedStream(lock, it=result)  # a stream we could not foresee

        functools.update_wrapper(call, fn)
        self.__dict__[name] = call
        self._bound_names.add(name)
        return call

    def _load_locked(self) -> Llama:
        """Resolve, plan and load; the caller holds the model lock."""
        slot = self._slot
        if slot.llama is not None:
            return slot.llama
        resolved = self.prefetch()
        from .gguf import block_count
        from .offload import plan_offload

        plan = plan_offload(
            self._required_memory(resolved),
            n_gpu_layers=self._n_gpu_layers,
            n_layers=block_count(resolved.path),  # exact partial offload, not a guess
        )
        log.info("%s: loading %s with offload plan: %s", self._model_id, resolved.path, plan)
        kwargs = {**self._llama_kwargs, "n_gpu_layers": plan.n_gpu_layers}
        chat_format = resolved.entry.raw.get("chat_format") if resolved.entry else None
        if isinstance(chat_format, str) and "chat_format" not in kwargs:
            # The catalog knows the template for models whose GGUF carries none.
            kwargs["chat_format"] = chat_format
        factory = self._factory()
        started = time.perf_counter()
        try:
            if kwargs.get("verbose", True):
                llama = factory(model_path=str(resolved.path), **kwargs)
            else:
                with _QUIET_LOAD_LOCK:
                    llama = factory(model_path=str(resolved.path), **kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not load model {self._model_id!r} from {resolved.path}: "
                f"{exc} (offload plan: {plan})"
            ) from exc
        log.info(
            "%s: loaded in %.2fs (%s)",
            self._model_id,
            time.perf_counter() - started,
            plan.layers_text,
        )
        with self._bind_lock:
            slot.plan = plan
            slot.llama = llama
            self._closed = False
            for name in _EAGER_METHODS:
                if callable(getattr(llama, name, None)):
                    self._bind(name, llama)
        return llama

    @staticmethod
    def _required_memory(resolved: ResolvedModel) -> int | None:
        """The catalog's memory estimate, else the files' total size (a lower bound)."""
        entry = resolved.entry
        if entry is not None and entry.required_memory_bytes:
            return entry.required_memory_bytes
        try:
            return sum(p.stat().st_size for p in resolved.paths) or None
        except OSError:
            return None

    def _no_attribute(self, name: str, known: frozenset[str]) -> str:
        import difflib

        close = difflib.get_close_matches(name, sorted(known | set(dir(type(self)))), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return (
            f"{type(self).__name__!r} object has no attribute {name!r} "
            f"(nor does llama_cpp.Llama){hint}"
        )
