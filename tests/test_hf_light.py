"""The Hub source builds the URLs and finds the token huggingface_hub would, without importing
huggingface_hub's HTTP client when it has nothing to add (a pull's import bill)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import hf_hub_url

from llmlb_node.catalog import ModelFile
from llmlb_node.errors import CatalogError
from llmlb_node.settings import Settings
from llmlb_node.sources.huggingface import HuggingFaceSource

REPOS = ["org/My-Model.v2_GGUF", "unsloth/gemma-3-270m-it-GGUF", "solo", "a/b.gitx", "_a/b_"]
REFUSED = ["a--b/c", "a..b", "a.git", ".a/b", "a-/b", "a/b/c", "café/x", "a" * 97]


@pytest.mark.parametrize("repo", REPOS)
@pytest.mark.parametrize("revision", ["main", "refs/pr/1", "a" * 40])
def test_urls_equal_hf_hub_url(repo: str, revision: str, tmp_path: Path) -> None:
    settings = Settings.from_env({"LLMLB_HOME": str(tmp_path), "HF_ENDPOINT": "http://h:9/m/"})
    file = ModelFile(filename="sub dir/m#1 ü%.gguf")
    url = HuggingFaceSource(settings, repo)._url(None, file, revision)  # type: ignore[arg-type]
    assert url == hf_hub_url(repo, file.filename, revision=revision, endpoint=settings.hf_endpoint)


@pytest.mark.parametrize("repo", REFUSED)
def test_ids_hf_refuses_are_still_refused_by_it(repo: str, tmp_path: Path) -> None:
    settings = Settings.from_env({"LLMLB_HOME": str(tmp_path)})
    source = HuggingFaceSource(settings, repo)
    try:  # what the installed huggingface_hub says (older releases accept some of these)
        expected = hf_hub_url(repo, "x.gguf", revision="main", endpoint=settings.hf_endpoint)
    except ValueError:
        expected = None
    if expected is not None:  # it builds a URL: ours is the same one
        assert source._url(_entry(), ModelFile(filename="x.gguf"), "main") == expected
        return
    with pytest.raises(CatalogError, match="model 'm'"):
        source._url(_entry(), ModelFile(filename="x.gguf"), "main")


def _entry() -> SimpleNamespace:
    return SimpleNamespace(id="m")  # only its id is read, in the refusal


_CHILD = """
import json, sys
from llmlb_node.settings import Settings
from llmlb_node.sources.huggingface import HuggingFaceSource, login_token
from llmlb_node.catalog import ModelFile
from llmlb_node.errors import CatalogError
src = HuggingFaceSource(Settings.from_env(), "org/model-GGUF")
url = src._url(None, ModelFile(filename="m.gguf"), "main")
print(json.dumps([login_token(), "huggingface_hub.file_download" in sys.modules]))
"""


def _child(tmp_path: Path, **env: str) -> list:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    base.update(HF_HOME=str(tmp_path / "hf"), LLMLB_HOME=str(tmp_path / "home"), **env)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=base, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_no_token_anywhere_imports_no_client(tmp_path: Path) -> None:
    assert _child(tmp_path) == [None, False]


def test_token_file_is_still_read(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "token").write_text("hf_fromfile\n")
    assert _child(tmp_path)[0] == "hf_fromfile"


def test_token_variable_is_still_read(tmp_path: Path) -> None:
    assert _child(tmp_path, HUGGING_FACE_HUB_TOKEN="hf_legacy")[0] == "hf_legacy"
