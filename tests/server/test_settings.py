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
