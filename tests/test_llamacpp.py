"""The seam to llama-cpp-python: `-o` values read as Llama's parameter types, the install hint,
and llama.cpp's log routed through `logging` (the real library and its real callback)."""

from __future__ import annotations

import ctypes
import logging
import sys

import llama_cpp  # a hard dependency: missing, these tests fail rather than skip
import pytest
from world import MODEL_ID, World

from llmlb_node import LazyLlama, LlamaCppNotInstalledError, ModelLoadError
from llmlb_node.llamacpp import import_llama_cpp, llama_options, native_errors


def test_values_are_read_as_their_parameter_s_type() -> None:
    options = llama_options(
        [
            "n_ctx=4096",
            "rope_freq_base=10000",
            "use_mmap=false",
            "flash_attn=yes",
            "tensor_split=[0.5, 0.5]",
            'kv_overrides={"a": 1}',
            "n_threads=none",
            "chat_format=chatml",
            "n_gpu_layers=auto",
            "type_k=q8_0",
            "seed=-1",
        ],
        llama_cpp.Llama,
    )
    assert options == {
        "n_ctx": 4096,
        "rope_freq_base": 10000.0,
        "use_mmap": False,
        "flash_attn": True,
        "tensor_split": [0.5, 0.5],
        "kv_overrides": {"a": 1},
        "n_threads": None,
        "chat_format": "chatml",
        "n_gpu_layers": "auto",
        "type_k": llama_cpp.GGML_TYPE_Q8_0,
        "seed": -1,
    }
    assert isinstance(options["rope_freq_base"], float)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("n_ctxx=1", "did you mean 'n_ctx'?"),
        ("n_ctx=1.5", "expected an integer"),
        ("n_threads=many", "expected an integer or none"),
        ("use_mlock=2", "expected true or false"),
        ("kv_overrides=[1]", "a JSON object"),
        ("draft_model=x", "cannot be given on the command line"),
        ("type_v=i32", "expected a KV cache type"),
    ],
)
def test_a_wrong_key_or_value_is_a_value_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace("(", r"\(")):
        llama_options([text], llama_cpp.Llama)


def test_without_llama_cpp_the_error_gives_the_install_command(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = LazyLlama(MODEL_ID, resolver=world.resolver())
    llm.prefetch()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails

    with pytest.raises(LlamaCppNotInstalledError) as info:
        llm.load()
    assert isinstance(info.value, ModelLoadError)
    assert f"{sys.executable} -m pip install llama-cpp-python" in str(info.value)
    with pytest.raises(LlamaCppNotInstalledError):
        import_llama_cpp()


def test_llama_cpp_s_log_reaches_logging_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    lib = import_llama_cpp()  # installs the callback into the real library
    caplog.set_level(logging.DEBUG, logger="llmlb_node.llama_cpp.native")
    # llama.cpp reports through the callback it was given; call it as llama.cpp would, in
    # pieces, with a warning (3) and an error (4) in the current ggml numbering.
    from llmlb_node.llamacpp import _NATIVE

    callback = ctypes.cast(_NATIVE.callback, ctypes.c_void_p).value
    assert callback  # a real C function pointer handed to llama_log_set
    for level, text in ((3, b"llama_kv_cache_iswa: using full-size "), (5, b"SWA cache\n")):
        _NATIVE.callback(level, text, None)
    _NATIVE.callback(4, b"llama_init_from_model: n_ctx_seq == 0\n", None)

    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (logging.DEBUG, "llama_kv_cache_iswa: using full-size SWA cache"),
        (logging.DEBUG, "llama_init_from_model: n_ctx_seq == 0"),
    ]
    assert native_errors() == "llama_init_from_model: n_ctx_seq == 0"
    assert native_errors() == ""  # read once
    assert lib is llama_cpp
