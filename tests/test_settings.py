"""Settings from the environment: every LLMLB_* URL and number is checked when it is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmlb_node import ConfigurationError, LlmlbError, Settings


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"LLMLB_HOME": str(tmp_path), **values}


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("LLMLB_STALL_TIMEOUT", "inf", "positive, finite"),
        ("LLMLB_STALL_TIMEOUT", "nan", "positive, finite"),
        ("LLMLB_STALL_TIMEOUT", "-1", "positive, finite"),
        ("LLMLB_STALL_TIMEOUT", "30s", "is not a number"),
        ("LLMLB_MAX_CONCURRENT_DOWNLOADS", "0", "at least 1"),
        ("LLMLB_MAX_CONCURRENT_DOWNLOADS", "2.5", "not a whole number"),
        ("LLMLB_DOWNLOAD_CONNECTIONS", "-4", "between 1 and 64"),
        ("LLMLB_DOWNLOAD_CONNECTIONS", "65", "between 1 and 64"),
        ("LLMLB_URL", "notaurl", "is not an http(s) URL"),
        ("LLMLB_URL", "lb.example:8080", "is not an http(s) URL"),
        ("LLMLB_URL", "file:///tmp/x", "is not an http(s) URL"),
        ("LLMLB_URL", "http://", "is not an http(s) URL"),
        ("LLMLB_URL", "http://lb:port", "not a valid URL"),
        ("LLMLB_URL", "http://lb.example/?a=1", "no '?query'"),
        ("HF_ENDPOINT", "huggingface.co", "is not an http(s) URL"),
        ("LLMLB_ORIGIN_ALLOWLIST", "huggingface.co,https://cdn.example", "not a host pattern"),
        ("LLMLB_N_GPU_LAYERS", "many", "an integer (-1: all layers) or 'auto'"),
    ],
)
def test_a_bad_value_names_its_variable(
    tmp_path: Path, variable: str, value: str, says: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(_env(tmp_path, **{variable: value}))
    message = str(info.value)
    assert message.startswith(variable) and says in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, LlmlbError)


def test_credentials_in_a_bad_url_are_not_repeated(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(_env(tmp_path, LLMLB_URL="ftp://user:s3cret@lb.example"))
    assert "s3cret" not in str(info.value) and "LLMLB_URL" in str(info.value)


def test_good_values_are_read(tmp_path: Path) -> None:
    settings = Settings.from_env(
        _env(
            tmp_path,
            LLMLB_URL="http://lb.example:8080/",
            HF_ENDPOINT="https://hub.example/",
            LLMLB_STALL_TIMEOUT="2.5",
            LLMLB_MAX_CONCURRENT_DOWNLOADS="3",
            LLMLB_DOWNLOAD_CONNECTIONS="64",
            LLMLB_ORIGIN_ALLOWLIST=" huggingface.co , *.Example.org ,",
            LLMLB_N_GPU_LAYERS="-1",
        )
    )
    assert settings.llmlb_url == "http://lb.example:8080"
    assert settings.hf_endpoint == "https://hub.example"
    assert settings.stall_timeout == 2.5
    assert settings.max_concurrent_downloads == 3 and settings.download_connections == 64
    assert settings.origin_allowlist == ("huggingface.co", "*.example.org")


def test_empty_values_mean_the_defaults(tmp_path: Path) -> None:
    settings = Settings.from_env(
        _env(tmp_path, LLMLB_URL="", LLMLB_STALL_TIMEOUT="", LLMLB_N_GPU_LAYERS="auto")
    )
    assert settings.llmlb_url is None and settings.stall_timeout == 30.0
