"""LazyLlama: a `llama_cpp.Llama` stand-in that resolves, fetches and loads its model on first use.

Construction is free (no I/O, no llama_cpp import); the first inference call loads exactly once.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import inspect
import logging
import re
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator
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
    from .settings import Settings

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


# -- explaining a failed load ---------------------------------------------------------------------
def _unknown_architecture(path: Path) -> str | None:
    """The GGUF's ``general.architecture`` if the installed llama.cpp does not know it, else None.

    llama.cpp keeps every architecture name it supports as a C string in its library; llama-cpp-
    python only says "Failed to load model", so the name missing from the library is the proof.
    """
    from .resolver import architecture

    arch = architecture(path)
    if not arch:
        return None
    lib = _llama_library()
    if lib is None:
        return None
    try:
        data = lib.read_bytes()
    except OSError:
        return None
    return None if arch.encode() + b"\0" in data else arch


def _llama_library() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    for location in (spec.submodule_search_locations or ()) if spec else ():
        for folder in (Path(location) / "lib", Path(location)):
            found = sorted(folder.glob("*llama.*")) if folder.is_dir() else []
            if found:
                return found[0]
    return None


def _llama_cpp_version() -> str:
    from .backend import installed_version

    return installed_version() or "unknown version"


# -- the lock -----------------------------------------------------------------------------------
_TAKEN, _NESTED, _SKIPPED = 0, 1, 2

# Calls that read the vocabulary or sizes but never the context's decoding state: they may run
# while this thread's own stream is paused between items (the README's
# ``for t in llm.generate(tokens): llm.detokenize([t])``), as they may with a plain Llama.
_NON_DECODING = frozenset(
    (
        "tokenize",
        "detokenize",
        "n_ctx",
        "n_embd",
        "n_vocab",
        "token_bos",
        "token_eos",
        "token_nl",
        "tokenizer",
    )
)


class _ModelLock:
    """Serializes use of one llama.cpp context.

    Re-entrant per thread (a stopping criterion or logits processor may call back into the same
    LazyLlama), releasable from any thread, and holdable by an open stream between items: a
    stream `detach`es (held, no owning thread) before yielding and `attach`es to whichever
    thread resumes it, so a stream may be consumed from a thread pool. The thread that last
    advanced a paused stream is its `_streamer`: that thread never waits on its own stream
    (which only it could resume): it may tokenize and detokenize, and a second generation
    raises `RuntimeError` instead of hanging. Other threads wait their turn.
    """

    __slots__ = ("_lock", "_owner", "_depth", "_streamer")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._streamer: int | None = None

    def acquire(self, decoding: bool = True, what: str = "start another generation") -> int:
        """Take the lock: `_TAKEN` (outermost), `_NESTED`, or `_SKIPPED` (not taken)."""
        me = threading.get_ident()
        if self._owner == me:  # only this thread ever stores its own ident
            self._depth += 1
            return _NESTED
        if self._streamer == me:
            if decoding:
                raise RuntimeError(
                    f"cannot {what}: a stream of this LazyLlama is open on this thread "
                    "(paused between items); consume or close() it first (llama.cpp has one "
                    "decoding state per model, and waiting here would wait forever)"
                )
            return _SKIPPED
        self._lock.acquire()
        self._owner = me
        self._depth = 1
        return _TAKEN

    def try_acquire(self) -> bool:
        """Take the lock if it is free (for finalizers, which must never wait)."""
        if not self._lock.acquire(blocking=False):
            return False
        self._owner = threading.get_ident()
        self._depth = 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if not self._depth:
            self._owner = None
            self._streamer = None
            self._lock.release()

    def detach(self) -> None:
        self._streamer = self._owner
        self._owner = None

    def attach(self) -> None:
        self._owner = threading.get_ident()
        self._streamer = None

    def __enter__(self) -> _ModelLock:
        self.acquire(what="close this LazyLlama")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_PLAIN = frozenset({dict, list, tuple, str, bytes, int, float, bool, type(None)})


def _locked_stream(lock: _ModelLock, start: Callable[[], Any]) -> Generator[Any, Any, Any]:
    """A streamed result holding the model lock from its first item until it ends or closes.

    A real generator (``send``, ``throw`` and ``close`` reach the inner iterator:
    ``Llama.generate`` uses ``send``). Nothing runs until the first item, so creating a stream
    never blocks (an event loop may create one while another stream is open) and a stream that
    is never iterated never holds the lock; `start` makes the inner iterator under the lock.
    """
    taken = lock.acquire()  # a second stream on this thread raises instead of waiting
    outer = taken == _TAKEN
    it: Any = None
    try:
        it = _as_iterator(start())
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                if error is not None:
                    throw = getattr(it, "throw", None)
                    if throw is None:
                        raise error
                    item = throw(error)
                elif value is None:
                    item = next(it)
                else:
                    item = it.send(value)
            except StopIteration as stop:
                return stop.value
            if outer:
                lock.detach()
            try:
                value, error = (yield item), None
            except GeneratorExit:
                raise
            except BaseException as exc:  # thrown in by the consumer: forward it inside
                value, error = None, exc
            finally:
                if outer:
                    lock.attach()
    finally:
        try:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # still under the lock
        finally:
            lock.release()


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


class _LlamaMethod:
    """A ``llama_cpp.Llama`` method as reached before the model is loaded (loading binds a
    locked wrapper of the same name in the instance ``__dict__``, which shadows this)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.__doc__ = f"``llama_cpp.Llama.{name}``, loading the model first if needed."

    def __get__(self, obj: LazyLlama | None, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return _PendingCall(obj, self.name)


class _PendingCall:
    """``llm.create_completion`` before the load: calling it loads the model and calls it;
    ``inspect.signature`` shows Llama's own signature (importing llama_cpp only then)."""

    __slots__ = ("_owner", "__name__")

    def __init__(self, owner: LazyLlama, name: str) -> None:
        self._owner = owner
        self.__name__ = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._owner._bound(self.__name__)(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        from llama_cpp import Llama

        sig = inspect.signature(getattr(Llama, self.__name__))
        return sig.replace(parameters=list(sig.parameters.values())[1:])  # without self

    def __repr__(self) -> str:
        return f"<unloaded method LazyLlama.{self.__name__} of {self._owner!r}>"


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
    ``stream=True`` call returns a generator at once; it takes the lock at its first item and
    holds it until it is exhausted or closed, so two streams never interleave (a stream may be
    pulled from any thread). Nothing ever waits on its own thread's open stream: ``tokenize``,
    ``detokenize`` and attribute reads proceed, while a second generation (or ``close()``) on
    that thread raises `RuntimeError`; other threads wait their turn.

    Not a subclass: ``isinstance(llm, llama_cpp.Llama)`` is False. `llama` is the loaded
    ``llama_cpp.Llama`` for code that checks types. Attribute writes (``llm.chat_format =
    "chatml"``, ``llm.verbose = True``) reach the model, and before the load are applied right
    after it. Pickling and copying give an independent LazyLlama for the same id, keyword
    arguments and store that loads again on first use (secrets and the progress callback are not
    pickled: the unpickled one reads ``HF_TOKEN``/``LLMLB_API_KEY`` from its environment).

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
        if model_id[:3].lower() == "hf:":  # a Hub reference (`hubref`): its syntax, now
            from .hubref import parse_reference

            parse_reference(model_id)
        else:
            check_id(model_id)  # a malformed id is a programming error: report it now
        n_gpu_layers = llama_kwargs.pop("n_gpu_layers", "auto")
        _check_gpu_layers(n_gpu_layers)
        _check_kwargs(llama_kwargs)
        self._model_id = model_id
        self._resolver = resolver
        self._owns_resolver = resolver is None
        self._settings: Settings | None = None  # for the resolver built on first use
        self._writes: dict[str, Any] = {}  # Llama attributes set on us: applied at every load
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
    def model_path(self) -> str | None:
        """The main GGUF file (a str, as ``Llama.model_path``): once resolved, or when installed.

        None for a model that is not installed yet (finding out never uses the network).
        """
        resolved = self._resolved
        if resolved is None:
            installed = self._get_resolver().installed(self._model_id)
            if installed is None:
                return None
            self._resolved = resolved = installed
        return str(resolved.path)

    @property
    def llama(self) -> Llama:
        """The loaded ``llama_cpp.Llama`` (loading it if needed), for code that checks its type.

        Calls made on it directly bypass this LazyLlama's serialization of threads.
        """
        return self.load()

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

    async def aload(self) -> Llama:
        """`load` in a worker thread: ``await llm.aload()`` keeps an asyncio event loop running
        while the model downloads and loads."""
        import asyncio

        return await asyncio.to_thread(self.load)

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

    create_completion = _LlamaMethod()
    create_chat_completion = _LlamaMethod()
    create_embedding = _LlamaMethod()
    embed = _LlamaMethod()
    tokenize = _LlamaMethod()
    detokenize = _LlamaMethod()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not found normally: private names never load anything (copy,
        # pickle and friends probe them), nor do names llama_cpp.Llama does not have.
        if name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if self._slot.llama is None and name in self._writes:
            return self._writes[name]  # written before the load: reading it loads nothing
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

    def __setattr__(self, name: str, value: Any) -> None:
        # Our own state and API stay ours; any other name is a Llama attribute (chat_format,
        # verbose, cache, ...): it must reach the model, now and after every (re)load.
        if name.startswith("_") or hasattr(type(self), name):
            object.__setattr__(self, name, value)
            return
        with self._bind_lock:
            self._writes[name] = value
            llama = self._slot.llama
            if llama is not None:
                setattr(llama, name, value)

    def __delattr__(self, name: str) -> None:
        if name.startswith("_") or hasattr(type(self), name) or name in self.__dict__:
            object.__delattr__(self, name)
            return
        with self._bind_lock:
            self._writes.pop(name, None)
            llama = self._slot.llama
            if llama is not None:
                delattr(llama, name)

    # -- copies and pickles: an independent instance that loads on first use ----------------
    def __getstate__(self) -> dict[str, Any]:
        resolver = self._resolver
        settings = resolver.settings if resolver is not None else self._settings
        if settings is not None:  # secrets never go into a pickle
            settings = settings.without_secrets()
        return {
            "model_id": self._model_id,
            "llama_kwargs": self.llama_kwargs,
            "settings": settings,
            "writes": dict(self._writes),
            "llama_factory": self.__dict__.get("llama_factory"),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        LazyLlama.__init__(self, state["model_id"], **state["llama_kwargs"])
        settings = state.get("settings")
        if settings is not None:
            from .settings import Settings

            self._settings = settings.with_secrets_of(Settings.from_env())
        self._writes.update(state.get("writes") or {})
        if state.get("llama_factory") is not None:
            self.llama_factory = state["llama_factory"]

    def __copy__(self) -> LazyLlama:
        clone = type(self).__new__(type(self))
        LazyLlama.__init__(
            clone,
            self._model_id,
            resolver=None if self._owns_resolver else self._resolver,
            progress=self._progress,
            **self.llama_kwargs,
        )
        if self._owns_resolver:
            clone._settings = self._resolver.settings if self._resolver else self._settings
        clone._writes.update(self._writes)
        if "llama_factory" in self.__dict__:
            clone.llama_factory = self.__dict__["llama_factory"]
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> LazyLlama:
        clone = self.__copy__()
        clone._writes = copy.deepcopy(self._writes, memo)
        return clone

    def __del__(self) -> None:
        """Free the model now if no call or stream is using it (a finalizer never waits)."""
        try:
            slot = self.__dict__.get("_slot")
            if slot is None or slot.llama is None or not slot.lock.try_acquire():
                return
            try:
                llama, slot.llama = slot.llama, None
                close = getattr(llama, "close", None)
                if close is not None:
                    close()
            finally:
                slot.lock.release()
        except Exception:  # noqa: BLE001 - nothing may escape a finalizer
            pass

    def __dir__(self) -> list[str]:
        names = set(super().__dir__())
        names.update(_llama_api().attributes or ())
        return sorted(names)

    def __repr__(self) -> str:
        slot = self._slot
        plan = slot.plan
        path = self._resolved.path if self._resolved is not None else None
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

                    self._resolver = ModelResolver(self._settings)
                resolver = self._resolver
        return resolver

    def _factory(self) -> Callable[..., Any]:
        # getattr_static: a plain function set on a subclass must not be bound to self.
        factory = inspect.getattr_static(self, "llama_factory", None)
        if isinstance(factory, (staticmethod, classmethod)):
            factory = factory.__get__(self, type(self))
        if factory is None:
            from .llamacpp import import_llama_cpp  # LlamaCppNotInstalledError, log routing

            factory = import_llama_cpp().Llama
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
        decoding = name not in _NON_DECODING
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
                return _locked_stream(lock, functools.partial(invoke, args, kwargs))
            taken = acquire(decoding)
            try:
                if slot.llama is llama:
                    result = fn(*args, **kwargs)
                else:
                    result = _reload_and_call(owner_ref, name, args, kwargs)
            finally:
                if taken != _SKIPPED:
                    release()
            if type(result) in _PLAIN or not isinstance(result, Iterator):
                return result
            return _locked_stream(lock, lambda: result)  # a stream we could not foresee

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
        from .offload import plan_for_model

        entry = resolved.entry
        plan = plan_for_model(
            resolved.path,  # layer count, weights and KV cache from the GGUF header
            n_ctx=self._llama_kwargs.get("n_ctx"),
            n_gpu_layers=self._n_gpu_layers,
            required_memory_bytes=entry.required_memory_bytes if entry is not None else None,
            type_k=self._llama_kwargs.get("type_k"),
            type_v=self._llama_kwargs.get("type_v"),
        )
        log.info("%s: loading %s with offload plan: %s", self._model_id, resolved.path, plan)
        kwargs = {**self._llama_kwargs, "n_gpu_layers": plan.n_gpu_layers}
        chat_format = resolved.entry.raw.get("chat_format") if resolved.entry else None
        if isinstance(chat_format, str) and "chat_format" not in kwargs:
            # The catalog knows the template for models whose GGUF carries none.
            kwargs["chat_format"] = chat_format
        started = time.perf_counter()
        llama = self._construct(resolved.path, kwargs, plan)
        log.info(
            "%s: loaded in %.2fs (%s)",
            self._model_id,
            time.perf_counter() - started,
            plan.layers_text,
        )
        self._publish(llama, plan)
        return llama

    def _construct(self, path: Path, kwargs: dict[str, Any], plan: Any) -> Llama:
        """`Llama(model_path=path, **kwargs)` with llama.cpp's log routed, or ModelLoadError
        naming what llama.cpp said (an unknown architecture by name)."""
        factory = self._factory()
        from .llamacpp import native_errors, native_log_to_stderr, route_native_log

        if "llama_cpp" in sys.modules:  # also for a llama_factory of the caller's
            route_native_log(sys.modules["llama_cpp"])
        verbose = kwargs.get("verbose", True)
        try:
            # llama.cpp's own log goes to `logging` (DEBUG), or to stderr for verbose=True.
            with native_log_to_stderr(verbose):
                if verbose:
                    return factory(model_path=str(path), **kwargs)
                with _QUIET_LOAD_LOCK:
                    return factory(model_path=str(path), **kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            why = native_errors()
            arch = _unknown_architecture(path)
            if arch is not None:
                raise ModelLoadError(
                    f"llama.cpp could not load model {self._model_id!r} from {path}: "
                    f"architecture {arch!r} is not supported by this llama.cpp build "
                    f"(llama-cpp-python {_llama_cpp_version()}); a newer llama-cpp-python may "
                    "support it (`pip install -U llama-cpp-python`)"
                ) from exc
            raise ModelLoadError(
                f"llama.cpp could not load model {self._model_id!r} from {path}: "
                f"{exc}{f' ({why})' if why else ''} (offload plan: {plan})"
            ) from exc

    def _publish(self, llama: Llama, plan: Any) -> None:
        """Make `llama` the loaded model: attribute writes made before the load reach it."""
        slot = self._slot
        with self._bind_lock:
            for name, value in self._writes.items():
                setattr(llama, name, value)
            slot.plan = plan
            slot.llama = llama
            self._closed = False
            for name in _EAGER_METHODS:
                if callable(getattr(llama, name, None)):
                    self._bind(name, llama)

    def _no_attribute(self, name: str, known: frozenset[str]) -> str:
        import difflib

        close = difflib.get_close_matches(name, sorted(known | set(dir(type(self)))), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return (
            f"{type(self).__name__!r} object has no attribute {name!r} "
            f"(nor does llama_cpp.Llama){hint}"
        )
