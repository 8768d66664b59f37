"""The seam to llama-cpp-python: import it with an actionable error, route llama.cpp's own log
through `logging`, and check command-line keyword arguments against `Llama.__init__`'s types.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import inspect
import json
import logging
import sys
import threading
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

from .errors import LlamaCppNotInstalledError

log = logging.getLogger(__name__)
native_log = logging.getLogger("llmlb_node.llama_cpp.native")
"""llama.cpp's own messages (model loading, KV cache, ...), at DEBUG unless verbose=True."""

# ggml_log_level in the llama.cpp that llama-cpp-python 0.3.x vendors. (llama-cpp-python's own
# callback still maps the older numbering, where WARN=3 reads as ERROR: that is why warnings
# such as "using full-size SWA cache" reach stderr with verbose=False.)
_GGML_CONT = 5
_INSTALL_HINT = "{python} -m pip install llama-cpp-python"


def import_llama_cpp() -> ModuleType:
    """``llama_cpp``, with llama.cpp's log routed through `logging`.

    Raises `LlamaCppNotInstalledError` (a `ModelLoadError`) with the install command when
    llama-cpp-python is missing or its shared library cannot be loaded.
    """
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:
        raise LlamaCppNotInstalledError(
            f"llama-cpp-python cannot be imported ({type(exc).__name__}: {exc}); install it "
            f"with `{_INSTALL_HINT.format(python=sys.executable)}` (or rebuild it for your GPU "
            "with `llmlb-node backend install --preset NAME`)"
        ) from exc
    route_native_log(llama_cpp)
    _mend_kv_cache_clear(llama_cpp.llama_cpp)
    return llama_cpp


def _mend_kv_cache_clear(native: ModuleType) -> None:
    """llama-cpp-python 0.3.10 dropped the binding `llama_kv_cache_clear` for llama.cpp's
    `llama_memory_clear` but its own `Llama.embed` still calls the old name (every embedding
    failed with AttributeError); give that release the old name, as later ones wrap the new."""
    if hasattr(native, "llama_kv_cache_clear") or not hasattr(native, "llama_memory_clear"):
        return

    def llama_kv_cache_clear(ctx: Any) -> None:
        native.llama_memory_clear(native.llama_get_memory(ctx), True)

    native.llama_kv_cache_clear = llama_kv_cache_clear


# -- llama.cpp's log ------------------------------------------------------------------------------
class _NativeLog:
    """The process-wide llama.cpp log callback: whole lines to `native_log`, or to stderr while a
    ``verbose=True`` load runs (what llama-cpp-python's verbose means)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending = ""
        self.level = logging.DEBUG
        self.verbose_loads = 0
        self.errors: collections.deque[str] = collections.deque(maxlen=3)
        self.callback: Any = None  # the ctypes function: kept referenced while llama.cpp uses it

    def __call__(self, level: int, text: bytes | None, user_data: object) -> None:
        try:
            chunk = (text or b"").decode("utf-8", "replace")
            if self.verbose_loads:
                sys.stderr.write(chunk)
                sys.stderr.flush()
                return
            with self.lock:
                if level != _GGML_CONT:
                    self.level = {1: 10, 2: 20, 3: 30, 4: 40}.get(level, logging.DEBUG)
                self.pending += chunk
                lines = self.pending.split("\n")
                self.pending = lines.pop()
                level_seen = self.level
            for line in lines:
                if line.strip():
                    native_log.debug("%s", line, extra={"llama_cpp_level": level_seen})
                    if level_seen >= logging.ERROR:
                        self.errors.append(line.strip())
        except Exception:  # noqa: BLE001 - an exception must never cross into C
            pass


_NATIVE = _NativeLog()


def native_errors() -> str:
    """llama.cpp's last error lines (say why a load failed), joined; cleared once read."""
    with _NATIVE.lock:
        lines = list(_NATIVE.errors)
        _NATIVE.errors.clear()
    return "; ".join(lines)


def route_native_log(llama_cpp: ModuleType) -> None:
    """Send llama.cpp's log to `native_log` (idempotent; replaces llama-cpp-python's callback)."""
    if _NATIVE.callback is not None:
        return
    with _NATIVE.lock:
        if _NATIVE.callback is not None:
            return
        try:
            callback = llama_cpp.llama_log_callback(_NATIVE)
            llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        except (AttributeError, TypeError, ctypes.ArgumentError) as exc:
            log.debug("could not route llama.cpp's log: %s", exc)
            return
        _NATIVE.callback = callback


@contextlib.contextmanager
def native_log_to_stderr(verbose: bool) -> Iterator[None]:
    """While the block runs, llama.cpp's log goes to stderr as is when `verbose` is true."""
    if not verbose:
        yield
        return
    with _NATIVE.lock:
        _NATIVE.verbose_loads += 1
    try:
        yield
    finally:
        with _NATIVE.lock:
            _NATIVE.verbose_loads -= 1


# -- `-o KEY=VALUE` ---------------------------------------------------------------------------
def llama_options(texts: Sequence[str], llama_class: Any) -> dict[str, Any]:
    """Keyword arguments for `llama_class` from ``KEY=VALUE`` texts, each checked against its
    ``__init__`` (name, and type when annotated). `ValueError` says what is wrong and, for an
    unknown name, the closest one."""
    params = {
        name: p
        for name, p in inspect.signature(llama_class.__init__).parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "self"
    }
    options: dict[str, Any] = {}
    for text in texts:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"-o expects KEY=VALUE, got {text!r}")
        if key == "model_path":
            raise ValueError("-o model_path: the model id chooses the file; it cannot be set")
        if key not in params:
            raise ValueError(_unknown(key, params))
        annotation = params[key].annotation
        if key == "n_gpu_layers":
            annotation = "Union[int, Literal['auto']]"
        if key in _KV_TYPE_PARAMS:
            options[key] = _kv_cache_type(key, raw.strip(), llama_class)
            continue
        options[key] = _convert(key, raw.strip(), annotation)
        if key in _PATH_PARAMS and options[key] is not None:
            _check_file(key, options[key])
    return options


# Values that llama.cpp does not check itself: a wrong one aborts or crashes the process.
_PATH_PARAMS = ("lora_path", "lora_base")
_KV_TYPE_PARAMS = ("type_k", "type_v")
_KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
"""The KV cache types llama.cpp's own command line accepts."""


def _check_file(key: str, value: Any) -> None:
    import os

    if not isinstance(value, str) or not os.path.isfile(os.path.expanduser(value)):
        raise ValueError(f"-o {key}={value!r}: no such file")


def _kv_cache_type(key: str, raw: str, llama_class: Any) -> int | None:
    """`type_k` / `type_v` by name (``q8_0``) or ggml number, among the KV cache types."""
    module = sys.modules.get(llama_class.__module__.split(".")[0])
    known = {
        name: getattr(module, f"GGML_TYPE_{name.upper()}")
        for name in _KV_CACHE_TYPES
        if hasattr(module, f"GGML_TYPE_{name.upper()}")
    }
    if raw.lower() in ("none", "null"):
        return None
    if raw.lower() in known:
        return int(known[raw.lower()])
    with contextlib.suppress(ValueError):
        if int(raw) in known.values():
            return int(raw)
    raise ValueError(f"-o {key}={raw!r}: expected a KV cache type: {', '.join(known)}")


def _unknown(key: str, params: dict[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(params), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"-o {key}: llama_cpp.Llama takes no keyword argument {key!r}{hint}"


def _convert(key: str, raw: str, annotation: Any) -> Any:
    if annotation is inspect.Parameter.empty:
        return _loose(raw)
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    text = text.replace("typing.", "").replace(" ", "")
    if not text:
        return _loose(raw)
    for value in _candidates(text, raw):
        return value
    raise ValueError(f"-o {key}={raw!r}: expected {_describe(text)}")


def _candidates(annotation: str, raw: str) -> Iterator[Any]:
    """Values of `raw` that `annotation` accepts, best first (none: a type error)."""
    alternatives = _alternatives(annotation)
    if "None" in alternatives and raw.lower() in ("none", "null"):
        yield None
        return
    for alt in alternatives:
        value = _parse_as(alt, raw)
        if value is not _NO:
            yield value
            return


_NO = object()
_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False}
_BOOLS.update({"no": False, "off": False})


def _alternatives(annotation: str) -> list[str]:
    """``Optional[Union[int, str]]`` -> ["int", "str", "None"]."""
    if annotation.startswith("Optional[") and annotation.endswith("]"):
        return [*_alternatives(annotation[9:-1]), "None"]
    if annotation.startswith("Union[") and annotation.endswith("]"):
        out: list[str] = []
        for part in _split_top(annotation[6:-1]):
            out.extend(_alternatives(part))
        return out
    return [annotation]


def _split_top(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _parse_as(kind: str, raw: str) -> Any:
    if kind == "bool":
        return _BOOLS.get(raw.lower(), _NO)
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            return _NO
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            return _NO
    if kind == "str":
        return raw
    if kind.startswith("Literal["):
        allowed = [json.loads(a.replace("'", '"')) for a in _split_top(kind[8:-1])]
        return raw if raw in allowed else _NO
    if kind.startswith(("List[", "list[", "Dict[", "dict[")):
        try:
            value = json.loads(raw)
        except ValueError:
            return _NO
        wanted = list if kind[0] in "Ll" else dict
        return value if isinstance(value, wanted) else _NO
    return _NO  # a Python object (chat_handler, draft_model, ...): not from a command line


def _describe(annotation: str) -> str:
    names = {
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "str": "text",
        "None": "none",
    }
    out = []
    for alt in _alternatives(annotation):
        if alt.startswith("Literal["):
            out.append(" or ".join(_split_top(alt[8:-1])))
        elif alt.startswith(("List[", "list[")):
            out.append("a JSON list such as [0.5,0.5]")
        elif alt.startswith(("Dict[", "dict[")):
            out.append('a JSON object such as {"key": 1}')
        else:
            out.append(names.get(alt, f"a Python {alt} (cannot be given on the command line)"))
    return " or ".join(dict.fromkeys(out))


def _loose(raw: str) -> Any:
    """A value without a known type: JSON if it parses, else true/false/none, else the text."""
    try:
        return json.loads(raw)
    except ValueError:
        return {"true": True, "false": False, "none": None}.get(raw.lower(), raw)
