"""Hub references (``hf:ORG/REPO[:QUANT | /FILE.gguf][@REV]``) against the loopback Hub: the file
list from its model API, the quantization picked, split GGUFs, and every typed refusal."""

from __future__ import annotations

import json

import pytest
from gguf import make_gguf, sha256_hex
from node import running_node
from test_cli import cli
from world import World

from llmlb_node import ModelResolver
from llmlb_node.errors import (
    HubAccessError,
    HubReferencesDisabledError,
    HubRepoNotFoundError,
    InvalidModelIdError,
    ModelDownloadError,
    NoGGUFError,
    QuantNotFoundError,
)
from llmlb_node.hubref import QUANT_PREFERENCE, parse_reference, quant_of

REPO = "test-org/Many-GGUF"
QUANTS = {"Q8_0": 1, "Q4_K_M": 2, "Q2_K": 3, "IQ4_XS": 4}


@pytest.fixture
def hub_repo(world: World) -> dict[str, bytes]:
    """A repo with four quantizations, a projector and a README; references allowed."""
    files = {f"many-{q.lower()}.gguf": make_gguf(20_000 + s, seed=s) for q, s in QUANTS.items()}
    files["mmproj-many-f16.gguf"] = make_gguf(5_000, seed=9)
    files["README.md"] = b"# Many\n"
    for name, data in files.items():
        world.hub.add_file(REPO, name, data, lfs=name.endswith(".gguf"))
    world.monkeypatch.setenv("LLMLB_ALLOW_HF", "1")
    world.monkeypatch.delenv("LLMLB_URL")  # the Hub alone: a proxy fallback would hide errors
    return files


def _resolver(world: World) -> ModelResolver:
    return world.resolver(max_retries=2)


def test_a_bare_reference_installs_q4_k_m_under_its_derived_id(
    world: World, hub_repo: dict[str, bytes]
) -> None:
    resolved = _resolver(world).resolve(f"hf:{REPO}")

    assert resolved.model_id == "hf--test-org--Many-GGUF"
    assert resolved.path.name == "many-q4_k_m.gguf"
    assert resolved.path.read_bytes() == hub_repo["many-q4_k_m.gguf"]
    record = world.resolver().store.read_record(resolved.model_id)
    assert record is not None and record.files[0].sha256 == sha256_hex(hub_repo["many-q4_k_m.gguf"])
    assert record.source == f"huggingface:{REPO}"
    # The file list came from the model API with its LFS metadata, and the file pinned to the
    # commit the API named.
    api = [r for r in world.hub.requests if r.path.startswith("/api/models/")]
    assert [r.path for r in api] == [f"/api/models/{REPO}/revision/main"]
    assert api[0].params == {"blobs": "true"}
    commit = world.hub.commit_of(REPO)
    assert any(f"/resolve/{commit}/many-q4_k_m.gguf" in r.path for r in world.hub.requests)


def test_the_quant_tag_is_case_insensitive_and_names_the_id(
    world: World, hub_repo: dict[str, bytes]
) -> None:
    resolved = _resolver(world).resolve(f"hf:{REPO}:q8_0")

    assert resolved.model_id == "hf--test-org--Many-GGUF--Q8_0"
    assert resolved.path.read_bytes() == hub_repo["many-q8_0.gguf"]
    # Written the other way, it is the same model: installed, no request at all.
    world.hub.reset_counters()
    again = _resolver(world).resolve(f"hf:{REPO}:Q8_0")
    assert again.path == resolved.path and world.hub.total_requests() == 0


def test_a_file_reference_and_a_pinned_revision(world: World, hub_repo: dict[str, bytes]) -> None:
    old = world.hub.commit_of(REPO)
    world.hub.change_content(make_gguf(21_000, seed=77), REPO, "many-q2_k.gguf")

    resolved = _resolver(world).resolve(f"hf:{REPO}/many-q2_k.gguf@{old}")

    assert resolved.model_id == f"hf--test-org--Many-GGUF--many-q2_k.gguf--at-{old}"
    assert resolved.path.read_bytes() == hub_repo["many-q2_k.gguf"]  # the old commit's bytes
    latest = _resolver(world).resolve(f"hf:{REPO}/many-q2_k.gguf")
    assert latest.path.read_bytes() == make_gguf(21_000, seed=77)


def test_a_split_gguf_is_one_model_of_every_shard(world: World) -> None:
    world.monkeypatch.setenv("LLMLB_ALLOW_HF", "1")
    shards = {
        f"Q4_K_M/big-Q4_K_M-0000{i}-of-00003.gguf": make_gguf(10_000 + i, seed=i) for i in (1, 2, 3)
    }
    for name, data in shards.items():
        world.hub.add_file("test-org/Split-GGUF", name, data)
    world.hub.add_file("test-org/Split-GGUF", "big-Q8_0-00001-of-00002.gguf", make_gguf(9_000))

    resolved = _resolver(world).resolve("hf:test-org/Split-GGUF")  # Q8_0 lacks a shard

    assert [p.name for p in resolved.paths] == [n.split("/")[1] for n in shards]
    assert resolved.path == resolved.paths[0]
    assert [p.read_bytes() for p in resolved.paths] == list(shards.values())


def test_an_installed_reference_is_listed_has_status_and_is_removed(
    world: World, hub_repo: dict[str, bytes]
) -> None:
    model_id = _resolver(world).resolve(f"hf:{REPO}:IQ4_XS").model_id
    resolver = _resolver(world)

    listed = {m.id: m for m in resolver.models()}
    assert listed[model_id].installed and listed[model_id].catalog == f"hf:{REPO}:IQ4_XS"
    assert resolver.status(f"hf:{REPO}:iq4_xs").status == "completed"
    assert model_id in {s.model_id for s in resolver.status()}
    # The derived id resolves offline too: the file list was kept beside the install.
    world.hub.reset_counters()
    assert resolver.resolve(model_id).path.name == "many-iq4_xs.gguf"
    assert world.hub.total_requests() == 0

    assert resolver.remove(f"hf:{REPO}:IQ4_XS")
    assert resolver.installed(model_id) is None
    assert model_id not in {m.id for m in resolver.models()}


def test_without_the_flag_a_reference_is_unsupported_naming_it(world: World) -> None:
    with pytest.raises(HubReferencesDisabledError, match="LLMLB_ALLOW_HF=1"):
        world.resolver().resolve(f"hf:{REPO}")
    assert world.requests() == 0

    done = cli("pull", f"hf:{REPO}:Q4_K_M")
    assert done.returncode == 3 and "LLMLB_ALLOW_HF" in done.stderr


def test_a_missing_repo_is_not_found_and_exits_3(world: World, hub_repo: dict[str, bytes]) -> None:
    with pytest.raises(HubRepoNotFoundError, match="not found"):
        _resolver(world).resolve("hf:test-org/Nothing-GGUF")

    done = cli("pull", "hf:test-org/Nothing-GGUF")
    assert done.returncode == 3 and "test-org/Nothing-GGUF" in done.stderr


def test_a_gated_repo_says_to_set_hf_token_and_accept_the_terms(
    world: World, hub_repo: dict[str, bytes]
) -> None:
    world.hub.require_token(REPO, "granted")

    with pytest.raises(HubAccessError) as info:
        _resolver(world).resolve(f"hf:{REPO}")
    assert "HF_TOKEN" in str(info.value) and "accept" in str(info.value)
    assert info.value.failures[0].kind == "unauthorized"
    assert cli("pull", f"hf:{REPO}").returncode == 4

    # A token without access: the listing is public, the file's 403 says the same.
    world.monkeypatch.setenv("HF_TOKEN", "not-granted")
    with pytest.raises(ModelDownloadError) as refused:
        _resolver(world).resolve(f"hf:{REPO}")
    assert "HF_TOKEN" in str(refused.value) and "accept" in str(refused.value)
    assert refused.value.failures[0].kind == "forbidden"

    world.monkeypatch.setenv("HF_TOKEN", "granted")
    assert _resolver(world).resolve(f"hf:{REPO}").path.name == "many-q4_k_m.gguf"


def test_a_token_the_hub_rejects_is_an_access_error(
    world: World, hub_repo: dict[str, bytes]
) -> None:
    world.hub.reject_token("revoked")
    world.monkeypatch.setenv("HF_TOKEN", "revoked")
    with pytest.raises(HubAccessError, match="HF_TOKEN"):
        _resolver(world).resolve(f"hf:{REPO}")


def test_a_safetensors_only_repo_lists_what_it_holds(world: World) -> None:
    world.monkeypatch.setenv("LLMLB_ALLOW_HF", "1")
    for name in ("config.json", "model-00001-of-00002.safetensors", "tokenizer.json"):
        world.hub.add_file("test-org/Weights", name, b"{}", lfs=name.endswith(".safetensors"))

    with pytest.raises(NoGGUFError) as info:
        _resolver(world).resolve("hf:test-org/Weights")

    assert "safetensors only" in str(info.value)
    assert "model-00001-of-00002.safetensors" in info.value.files
    assert not (world.models_dir / "hf--test-org--Weights").exists()


def test_a_quant_the_repo_lacks_lists_the_quants_it_has(
    world: World, hub_repo: dict[str, bytes]
) -> None:
    with pytest.raises(QuantNotFoundError) as info:
        _resolver(world).resolve(f"hf:{REPO}:Q5_K_M")

    assert info.value.quants == ("Q4_K_M", "IQ4_XS", "Q8_0", "Q2_K")  # preference order
    assert "Q5_K_M" in str(info.value) and "Q4_K_M, IQ4_XS, Q8_0, Q2_K" in str(info.value)


@pytest.mark.parametrize(
    "bad",
    ["hf:", "hf:org", "hf:org/re--po", "hf:org/repo/notes.txt", "hf:org/repo:Q4 K", "hf:o/r@a..b"],
)
def test_malformed_references_are_invalid_ids(bad: str) -> None:
    with pytest.raises(InvalidModelIdError, match="Hub reference"):
        parse_reference(bad)


def test_quant_tags_are_read_from_names_and_folders() -> None:
    assert quant_of("gemma-3-270m-q4_k_m.gguf") == "Q4_K_M"
    assert quant_of("Q8_0/model-00001-of-00002.gguf") == "Q8_0"
    assert quant_of("Qwen3-8B-UD-Q4_K_XL.gguf") == "UD-Q4_K_XL"
    assert quant_of("model.BF16.gguf") == "BF16"
    assert quant_of("tiny.gguf") is None
    assert QUANT_PREFERENCE[0] == "Q4_K_M"


def test_a_long_reference_gets_a_short_unique_id() -> None:
    name = "r" * 90
    a = parse_reference(f"hf:org/{name}/{'a' * 60}.gguf").model_id
    b = parse_reference(f"hf:org/{name}/{'a' * 59}b.gguf").model_id
    assert len(a) <= 128 and len(b) <= 128 and a != b


def test_the_node_pulls_lists_and_reports_a_reference(
    world: World, hub_repo: dict[str, bytes]
) -> None:
    with running_node() as node:
        status, _, body = node.post("/api/models/pull", {"model": f"hf:{REPO}", "stream": False})
        assert (status, body) == (200, {"status": "success"})
        _, _, listing = node.get("/v1/models")
        _, _, state = node.get("/v0/models/hf--test-org--Many-GGUF/status")
        _, _, tags = node.get("/api/tags")

    assert "hf--test-org--Many-GGUF" in {m["id"] for m in listing["data"]}
    assert state["status"] == "completed"
    assert [t["id"] for t in tags["models"]] == ["hf--test-org--Many-GGUF"]


def test_the_node_refuses_a_reference_without_the_flag(world: World) -> None:
    chat = {"model": f"hf:{REPO}", "messages": [{"role": "user", "content": "hi"}]}
    with running_node() as node:
        status, _, body = node.post("/v1/chat/completions", chat)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert "LLMLB_ALLOW_HF" in body["error"]["message"]
    assert json.dumps(body).count("Traceback") == 0
