"""The node's settings: environment variables that reach llama.cpp."""

from __future__ import annotations

import pytest

from llmlb_node.server.pool import ModelPool
from llmlb_node.server.settings import FOREVER, ServerSettings, parse_duration


def test_llmlb_n_threads_sets_generation_and_prompt_threads(world: object) -> None:
    pool = ModelPool(ServerSettings.from_env({"LLMLB_N_THREADS": "1", "LLMLB_N_CTX": "512"}))
    default = ModelPool(ServerSettings.from_env({}))

    assert pool.llama_kwargs["n_threads"] == 1 and pool.llama_kwargs["n_threads_batch"] == 1
    assert "n_threads" not in default.llama_kwargs  # llama.cpp's own choice


def test_llmlb_n_threads_must_be_a_whole_number() -> None:
    with pytest.raises(ValueError, match="LLMLB_N_THREADS"):
        ServerSettings.from_env({"LLMLB_N_THREADS": "many"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LLMLB_N_THREADS", "two"),
        ("LLMLB_MAX_LOADED_MODELS", "0"),
        ("LLMLB_ADVERTISE", "all"),
        ("LLMLB_NODE_CORS_ORIGINS", "app.example.org"),
        ("LLMLB_NODE_CORS_ORIGINS", "https://app.example.org/page"),
    ],
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


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5m", 300.0), (30, 30.0), ("1.5h", 5400.0), (0, 0.0), (-1, -1.0), ("-5s", -1.0)],
)
def test_durations_read_as_seconds_and_negative_is_forever(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [1e12, "99999999h", 10**30, FOREVER])
def test_ten_years_or_more_is_forever_not_a_timer_no_clock_holds(value: object) -> None:
    assert parse_duration(value) == -1.0
    assert ServerSettings.from_env({"LLMLB_KEEP_ALIVE": str(value)}).keep_alive == -1.0


def test_just_under_ten_years_is_kept_as_given() -> None:
    assert parse_duration(FOREVER - 1) == FOREVER - 1


def test_llmlb_load_wait_defaults_below_the_load_balancers_timeout() -> None:
    from lb import INFERENCE_TIMEOUT

    settings = ServerSettings.from_env({})

    assert settings.load_wait == 60.0 < INFERENCE_TIMEOUT  # a 503 reaches the client first
    assert settings.advertise == "installed"
    assert ServerSettings.from_env({"LLMLB_ADVERTISE": "Catalog"}).advertise == "catalog"
