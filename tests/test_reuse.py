"""Reuse of files other tools downloaded: real huggingface_hub-cache, Ollama and LM Studio layouts
built in a temporary home, installed by hard link (or copy across file systems), always verified."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from gguf import make_gguf, sha256_hex
from world import FILENAME, MODEL_ID, REPO, World

import llmlb_node.store
from llmlb_node.resolver import ModelResolver

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def home(world: World, tmp_path: Path) -> Path:
    """A user's home for the other tools (HOME, HF_HOME, OLLAMA_MODELS unset: their defaults);
    the catalog's `tiny` carries its sha256."""
    user = tmp_path / "user"
    user.mkdir()
    world.monkeypatch.setenv("HOME", str(user))
    world.monkeypatch.delenv("HF_HOME")
    world.monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    world.monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    world.entry()["sha256"] = world.sha256
    world.write_catalog()
    return user


def hf_cache(
    root: Path, repo: str, filename: str, data: bytes, blob_name: str | None = None
) -> Path:
    """What huggingface_hub leaves after hf_hub_download: the blob named by its sha256, a
    snapshot symlink to it, and refs/main naming the commit. Returns the blob."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    blob = repo_dir / "blobs" / (blob_name or sha256_hex(data))
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo_dir / "snapshots" / COMMIT / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return blob


def ollama_blob(root: Path, data: bytes) -> Path:
    """Ollama's store: blobs/sha256-<hex> and the manifest that names it."""
    blob = root / "blobs" / f"sha256-{sha256_hex(data)}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    manifest.parent.mkdir(parents=True)
    layer = {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{blob.name[7:]}"}
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [{**layer, "size": len(data)}]}))
    return blob


def _record_source(world: World, model_id: str = MODEL_ID) -> str:
    record = world.resolver().store.read_record(model_id)
    assert record is not None
    return record.source


def test_a_file_in_the_hf_cache_installs_by_hard_link_with_no_network(
    world: World, home: Path
) -> None:
    blob = hf_cache(home / ".cache" / "huggingface" / "hub", "other/repo", "x.gguf", world.content)

    resolved = world.resolver().resolve(MODEL_ID)

    assert world.requests() == 0
    assert resolved.source == "reused:huggingface-cache"
    assert _record_source(world) == "reused:huggingface-cache"
    assert os.path.samefile(resolved.path, blob)  # a hard link: no byte copied
    # The other tool deleting its copy leaves ours installed and whole.
    shutil.rmtree(home / ".cache" / "huggingface")
    assert world.resolver().installed(MODEL_ID) is not None
    assert resolved.path.read_bytes() == world.content


def test_hf_hub_cache_and_hf_home_are_honoured(world: World, home: Path, tmp_path: Path) -> None:
    world.monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    hf_cache(tmp_path / "elsewhere", "other/repo", "x.gguf", world.content)

    assert world.resolver().resolve(MODEL_ID).source == "reused:huggingface-cache"
    assert world.requests() == 0


def test_an_ollama_blob_is_reused(world: World, home: Path) -> None:
    blob = ollama_blob(home / ".ollama" / "models", world.content)

    resolved = world.resolver().resolve(MODEL_ID)

    assert (resolved.source, world.requests()) == ("reused:ollama", 0)
    assert os.path.samefile(resolved.path, blob)


def test_lm_studio_files_are_matched_by_size_then_hash(
    world: World, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = home / ".lmstudio" / "models"
    wrong = root / "a-publisher" / "tiny-GGUF" / "tiny-a.gguf"
    right = root / "b-publisher" / "tiny-GGUF" / "tiny-b.gguf"
    other = root / "c-publisher" / "big-GGUF" / "big.gguf"
    for path, data in ((wrong, make_gguf(len(world.content), seed=5)), (right, world.content)):
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
    other.parent.mkdir(parents=True)
    other.write_bytes(make_gguf(len(world.content) + 1))
    hashed: list[str] = []
    real = llmlb_node.store.sha256_file
    monkeypatch.setattr(llmlb_node.store, "sha256_file", lambda p: hashed.append(str(p)) or real(p))

    resolved = world.resolver().resolve(MODEL_ID)

    assert (resolved.source, world.requests()) == ("reused:lm-studio", 0)
    assert os.path.samefile(resolved.path, right)
    assert len(hashed) == 2  # the two files of the right size; the other one only stat'ed
    assert wrong.read_bytes() == make_gguf(len(world.content), seed=5)  # left as it was


def test_by_name_in_the_hf_cache_snapshot_of_the_entrys_own_repo(world: World, home: Path) -> None:
    del world.entry()["sha256"]  # no catalog sha256: the snapshot's repo and name find it
    world.write_catalog()
    hf_cache(home / ".cache" / "huggingface" / "hub", REPO, FILENAME, world.content)

    resolved = world.resolver().resolve(MODEL_ID)

    assert (resolved.source, world.requests()) == ("reused:huggingface-cache", 0)
    record = world.resolver().store.read_record(MODEL_ID)
    assert record is not None and record.files[0].sha256 == world.sha256


def test_foreign_bytes_that_fail_verification_are_not_used(world: World, home: Path) -> None:
    hub_root = home / ".cache" / "huggingface" / "hub"
    bad = make_gguf(len(world.content), seed=99)
    hf_cache(hub_root, "liar/repo", "x.gguf", bad, blob_name=world.sha256)  # named, not hashing
    del world.entry()["sha256"]
    world.write_catalog()
    cut = world.content[: len(world.content) // 2]  # a truncated GGUF under its own hash
    hf_cache(hub_root, REPO, FILENAME, cut)

    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.source == f"huggingface:{REPO}"  # downloaded after all
    assert resolved.path.read_bytes() == world.content
    assert not any(p.name.endswith(".reuse") for p in resolved.path.parent.iterdir())


def test_llmlb_reuse_0_turns_it_off(world: World, home: Path) -> None:
    hf_cache(home / ".cache" / "huggingface" / "hub", "other/repo", "x.gguf", world.content)
    world.monkeypatch.setenv("LLMLB_REUSE", "0")

    assert world.resolver().resolve(MODEL_ID).source == f"huggingface:{REPO}"


def test_odd_foreign_folders_are_skipped_with_a_debug_line(
    world: World, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub_root = home / ".cache" / "huggingface" / "hub"
    (hub_root / "models--odd--file").parent.mkdir(parents=True)
    (hub_root / "models--odd--file").write_text("not a folder")
    (home / ".ollama" / "models").mkdir(parents=True)
    (home / ".ollama" / "models" / "blobs").write_text("not a folder either")
    lm = home / ".lmstudio" / "models" / "pub" / "repo"
    lm.mkdir(parents=True)
    (lm / "dangling.gguf").symlink_to(home / "gone.gguf")
    (home / ".cache" / "lm-studio").mkdir(parents=True)
    (home / ".cache" / "lm-studio" / "models").write_text("a file where a folder should be")
    hf_cache(hub_root, "good/repo", "x.gguf", world.content)

    with caplog.at_level(logging.DEBUG, logger="llmlb_node.reuse"):
        resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.source == "reused:huggingface-cache"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_across_file_systems_it_is_a_verified_copy(world: World, home: Path) -> None:
    other = tempfile.mkdtemp(dir="/dev/shm") if os.path.isdir("/dev/shm") else None
    if other is None or os.stat(other).st_dev == os.stat(world.home).st_dev:
        pytest.skip("no second file system here to copy across (/dev/shm)")
    try:
        world.monkeypatch.setenv("HF_HUB_CACHE", other)
        blob = hf_cache(Path(other), "other/repo", "x.gguf", world.content)

        resolved = world.resolver().resolve(MODEL_ID)

        assert (resolved.source, world.requests()) == ("reused:huggingface-cache", 0)
        assert not os.path.samefile(resolved.path, blob)
        assert resolved.path.read_bytes() == world.content
    finally:
        shutil.rmtree(other)


def test_a_second_install_of_the_same_file_is_not_hashed_again(
    world: World, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf_cache(home / ".cache" / "huggingface" / "hub", "other/repo", "x.gguf", world.content)
    hashed: list[str] = []
    real = llmlb_node.store.sha256_file
    monkeypatch.setattr(llmlb_node.store, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    resolver = world.resolver()
    resolver.resolve(MODEL_ID)
    assert len(hashed) == 1
    assert resolver.remove(MODEL_ID)

    resolved = resolver.resolve(MODEL_ID)

    assert resolved.source == "reused:huggingface-cache" and len(hashed) == 1
    # A changed file is hashed again (and here refused: its bytes are no longer the model's).
    assert resolver.remove(MODEL_ID)
    blob = next((home / ".cache" / "huggingface" / "hub").rglob(world.sha256))
    with open(blob, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff")
    assert resolver.resolve(MODEL_ID).source == f"huggingface:{REPO}"
    assert len(hashed) == 2


def test_a_hub_reference_reuses_by_the_hubs_sha256(world: World, home: Path) -> None:
    data = make_gguf(40_000, seed=3)
    world.hub.add_file("test-org/Reused-GGUF", "reused-Q4_K_M.gguf", data)
    hf_cache(home / ".cache" / "huggingface" / "hub", "test-org/Reused-GGUF", "x.gguf", data)
    world.monkeypatch.setenv("LLMLB_ALLOW_HF", "1")
    world.hub.reset_counters()

    resolved = ModelResolver().resolve("hf:test-org/Reused-GGUF")

    assert resolved.source == "reused:huggingface-cache"
    assert world.hub.cdn.request_count == 0  # the file list only: no byte of the file
    assert [r.path for r in world.hub.requests] == [
        "/api/models/test-org/Reused-GGUF/revision/main"
    ]
