"""The node's settings: environment variables that reach llama.cpp."""

from __future__ import annotations

import pytest

from llmlb_node.server.pool import ModelPool
from llmlb_node.server.settings import ServerSettings


def test_llmlb_n_threads_sets_generation_and_prompt_threads(world: object) -> None:
    pool = ModelPool(ServerSettings.from_env({"LLMLB_N_THREADS": "1", "LLMLB_N_CTX": "512"}))
    default = ModelPool(ServerSettings.from_env({}))

    assert pool.llama_kwargs["n_threads"] == 1 and pool.llama_kwargs["n_threads_batch"] == 1
    assert "n_threads" not in default.llama_kwargs  # llama.cpp's own choice


def test_llmlb_n_threads_must_be_a_whole_number() -> None:
    with pytest.raises(ValueError, match="LLMLB_N_THREADS"):
        ServerSettings.from_env({"LLMLB_N_THREADS": "many"})


@pytest.mark.parametrize(
    ("name", "value"), [("LLMLB_N_THREADS", "two"), ("LLMLB_MAX_LOADED_MODELS", "0")]
)
def test_serve_with_a_value_it_cannot_use_exits_2_naming_the_variable(
    llmlb_env: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
) -> None:
    from llmlb_node.cli import main

    monkeypatch.setenv(name, value)

    assert main(["serve", "--port", "0"]) == 2
    assert name in capsys.readouterr().err
