"""The second review's attacks (issue 16): layouts ggml refuses, a store shared by two catalogs,
secrets a server or a `.env` file tries to leak. Real loopback servers, the real command."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from gguf import build_gguf, make_gguf, make_shard, sha256_hex
from servers import RecordedRequest, Reply, ScriptedServer, honest_reply, refused_url
from test_lying_servers import LLMLB_NODE, _as_url, _entry, _nothing_installed, cli
from world import FILENAME, MODEL_ID, SIZE, World

from llmlb_node import ModelDownloadError

# -- 2. a revision that moves mid-download --------------------------------------------------------
SHARDS = ("m-00001-of-00002.gguf", "m-00002-of-00002.gguf")


def _split_on_hub(world: World, lfs: bool = True) -> tuple[str, dict[str, bytes]]:
    """A 2-shard model on the Hub only, without sha256s in the catalog (as llmlb's entries are):
    only the revision can keep its shards together. Returns the repo and the shards' bytes."""
    shards = {name: make_shard(i, 2) for i, name in enumerate(SHARDS)}
    repo = "test-org/split-GGUF"
    entry = world.add_model("split", shards, repo=repo, on_proxy=False)
    for name, data in shards.items():
        world.hub.add_file(repo, name, data, lfs=lfs)
    entry["files"] = [{"filename": name} for name in SHARDS]
    world.write_catalog()
    world.monkeypatch.delenv("LLMLB_URL")
    return repo, shards


def _move_when(world: World, repo: str, filename: str, happens: Callable[[Any], bool]):
    """A progress callback that moves `main` (new bytes for `filename`) the first time
    `happens(event)`: the Hub changes while the model downloads."""
    moved: list[str] = []

    def progress(event: Any) -> None:
        if not moved and happens(event):
            world.hub.change_content(
                make_shard(SHARDS.index(filename), 2, name="v2"), repo, filename
            )
            moved.append(world.hub.commit_of(repo))

    return progress, moved


def test_a_branch_moving_between_shards_never_mixes_two_commits(world: World) -> None:
    repo, shards = _split_on_hub(world)
    commit_a = world.hub.commit_of(repo)
    progress, moved = _move_when(world, repo, SHARDS[1], lambda e: e.filename == SHARDS[1])

    resolved = world.resolver().resolve("split", progress=progress)

    assert moved and moved[0] != commit_a  # main moved before shard 2 was asked for
    for path, name in zip(resolved.paths, SHARDS, strict=True):
        assert path.read_bytes() == shards[name]  # both shards from commit A
    heads = [r for r in world.hub.requests if r.method == "HEAD"]
    assert f"/resolve/{commit_a}/{SHARDS[1]}" in heads[-1].path  # asked by commit, not `main`
    record = json.loads((world.models_dir / ".llmlb" / "split" / "install.json").read_text())
    assert record["revision"] == commit_a


def test_a_resume_after_the_branch_moved_asks_for_the_pinned_commit(world: World) -> None:
    # Files the Hub serves itself (no LFS, no CDN): a resume goes back to /resolve/...
    repo, shards = _split_on_hub(world, lfs=False)
    commit_a = world.hub.commit_of(repo)
    world.hub.drop_after(20_000)  # the first body breaks: the file is resumed
    progress, moved = _move_when(world, repo, SHARDS[0], lambda e: e.downloaded > 0)

    resolved = world.resolver().resolve("split", progress=progress)

    assert moved
    assert resolved.paths[0].read_bytes() == shards[SHARDS[0]]
    gets = [r for r in world.hub.requests if r.method == "GET"]
    assert len(gets) >= 3 and all(f"/resolve/{commit_a}/" in r.path for r in gets[1:])


def test_a_hub_answering_another_commit_than_the_pinned_one_fails_the_source(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = make_gguf(40_000, seed=5)
    answers = iter(["a" * 40, "b" * 40])

    def hub(rec: RecordedRequest) -> Reply:
        reply = honest_reply(content, rec, etag=f'"{sha256_hex(content)}"')
        if rec.method == "HEAD":
            reply.headers["X-Repo-Commit"] = next(answers)
        return reply

    liar = serve(hub)
    world.monkeypatch.setenv("HF_ENDPOINT", liar.url)
    world.monkeypatch.delenv("LLMLB_URL")
    entry = world.add_model("two", {"a.gguf": content, "b.gguf": content}, on_hub=False)
    entry["files"] = [{"filename": "a.gguf"}, {"filename": "b.gguf"}]
    world.write_catalog()

    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("two")
    failure = info.value.failures[0]
    assert failure.kind == "integrity" and "not mixing two commits" in failure.message
    assert _nothing_installed(world, "two")


# -- 3. a layout ggml will refuse ----------------------------------------------------------------
I8, F32, Q4_0 = 24, 0, 2
BAD_LAYOUTS = {
    # name: (tensors as the header states them, general.alignment), all within the file
    "misaligned": ([("a", 100, I8, 0), ("b", 64, I8, 100)], 32),
    "same-offset": ([("a", 64, I8, 0), ("b", 64, I8, 0)], 32),
    "overlap": ([("a", 4096, I8, 0), ("b", 64, I8, 2048)], 32),
    "unknown-type": ([("a", 64, 77, 0)], 32),
    "gap": ([("a", 64, I8, 0), ("b", 64, I8, 4096)], 32),
    "alignment-4096-ignored": ([("a", 64, I8, 0), ("b", 64, I8, 64)], 4096),
}


@pytest.mark.parametrize("layout", BAD_LAYOUTS, ids=BAD_LAYOUTS)
def test_a_gguf_ggml_would_refuse_is_never_installed_even_when_its_sha256_matches(
    world: World, serve: Callable[..., ScriptedServer], layout: str
) -> None:
    tensors, alignment = BAD_LAYOUTS[layout]
    meta: dict[str, Any] = {"general.architecture": "llama"}
    if alignment != 32:
        meta["general.alignment"] = alignment
    content = build_gguf(meta, tensors, data=16_384, alignment=32)
    server = serve(lambda rec: honest_reply(content, rec))
    files = [{"filename": "bad.gguf", "size_bytes": len(content), "sha256": sha256_hex(content)}]
    _as_url(world, server, "bad", "bad.gguf", files=files)

    done = cli("pull", "bad")

    assert done.returncode == 5, done.stderr
    assert "[integrity]" in done.stderr and "bad.gguf" in done.stderr
    assert "tensor '" in done.stderr  # names the tensor ggml would stop at
    assert _nothing_installed(world, "bad")


def test_an_unknown_ggml_type_is_refused_naming_it(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = build_gguf({}, [("blk.0.attn_q.weight", 256, 36, 0)], data=1024)  # 36: removed
    server = serve(lambda rec: honest_reply(content, rec))
    _as_url(world, server, "oddtype", "oddtype.gguf")
    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("oddtype")
    failure = info.value.failures[0]
    assert failure.kind == "integrity"
    assert "'blk.0.attn_q.weight' has ggml type 36, which ggml does not know" in failure.message


def test_a_real_layout_still_installs(world: World, serve: Callable[..., ScriptedServer]) -> None:
    tensors = [("a", 256, Q4_0, 0), ("b", 10, F32, 160), ("c", 7, I8, 224)]  # 144 -> 160, 40
    content = build_gguf({"general.architecture": "llama"}, tensors, data=231)
    server = serve(lambda rec: honest_reply(content, rec))
    _as_url(world, server, "good", "good.gguf")
    assert world.resolver().resolve("good").path.read_bytes() == content


# -- 4. split sets that do not belong together ----------------------------------------------------
STRANGERS = {
    # shard 2 as a liar serves it: from another set, or another model
    "another-count": lambda: make_shard(1, 3),
    "same-number": lambda: make_shard(0, 2, name="v1-again"),
    "another-tensor-total": lambda: make_shard(1, 2, total=5),
    "another-architecture": lambda: make_shard(1, 2, arch="qwen2"),
    "not-a-shard": lambda: make_gguf(60_000, seed=4),
}


@pytest.mark.parametrize("stranger", STRANGERS, ids=STRANGERS)
def test_a_shard_of_another_set_installs_nothing_of_the_set(
    world: World, serve: Callable[..., ScriptedServer], stranger: str
) -> None:
    shards = {SHARDS[0]: make_shard(0, 2), SHARDS[1]: STRANGERS[stranger]()}
    server = serve(lambda rec: honest_reply(shards[rec.path.rsplit("/", 1)[-1]], rec))
    urls = {name: f"{server.url}/{name}" for name in SHARDS}
    files = [{"filename": name} for name in SHARDS]
    _entry(world, "split", SHARDS[0], files=files, sources=[{"type": "url", "urls": urls}])
    world.monkeypatch.delenv("LLMLB_URL")

    done = cli("pull", "split")

    assert done.returncode == 5, done.stderr
    assert "[integrity]" in done.stderr and "split" in done.stderr
    assert _nothing_installed(world, "split")  # neither shard: a set is whole or absent
    assert cli("path", "split").returncode == 1


def test_the_shards_of_one_model_never_come_from_two_sources(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    # The first source has shard 1 only; the proxy has both, of another version (another
    # general.name, same counts: every shard check alone passes). Mixing would install v1+v2.
    v1 = make_shard(0, 2)
    first = serve(lambda rec: honest_reply(v1, rec) if SHARDS[0] in rec.path else Reply(404))
    v2 = {name: make_shard(i, 2, name="v2") for i, name in enumerate(SHARDS)}
    world.proxy.add_model("split", v2)
    urls = {name: f"{first.url}/{name}" for name in SHARDS}
    files = [{"filename": name} for name in SHARDS]
    _entry(world, "split", SHARDS[0], files=files, sources=[{"type": "url", "urls": urls}])

    resolved = world.resolver().resolve("split")

    assert [p.read_bytes() for p in resolved.paths] == [v2[n] for n in SHARDS]
    assert resolved.source == "llmlb-proxy"


def test_a_whole_split_set_installs(world: World, serve: Callable[..., ScriptedServer]) -> None:
    shards = {name: make_shard(i, 2) for i, name in enumerate(SHARDS)}
    server = serve(lambda rec: honest_reply(shards[rec.path.rsplit("/", 1)[-1]], rec))
    files = [{"filename": name} for name in SHARDS]
    urls = {name: f"{server.url}/{name}" for name in SHARDS}
    _entry(world, "split", SHARDS[0], files=files, sources=[{"type": "url", "urls": urls}])
    resolved = world.resolver().resolve("split")
    assert [p.read_bytes() for p in resolved.paths] == [shards[n] for n in SHARDS]


# -- 5. a store shared by two catalogs -----------------------------------------------------------
def _second_catalog(world: World, **file_fields: Any) -> Path:
    """Catalog B: `tiny` again, with other identities for its file; made the one in force."""
    entry = json.loads(json.dumps(world.entry()))
    entry["files"] = [{"filename": FILENAME, **file_fields}]
    path = world.home / "catalog-b.json"
    path.write_text(json.dumps([entry]))
    world.monkeypatch.setenv("LLMLB_SUPPORTED_MODELS", str(path))
    return path


@pytest.mark.parametrize(
    "identity",
    [
        pytest.param({"size_bytes": SIZE + 1}, id="size"),
        pytest.param({"sha256": "ab" * 32}, id="sha256"),
        pytest.param({"size_bytes": SIZE, "sha256": "cd" * 32}, id="size-agrees-sha256-not"),
    ],
)
def test_an_install_made_for_catalog_a_is_not_catalog_bs(
    world: World, identity: dict[str, Any]
) -> None:
    assert cli("pull", MODEL_ID).returncode == 0  # catalog A: no exact size or sha256
    _second_catalog(world, **identity)
    before = world.requests()

    path = cli("path", MODEL_ID)
    status = cli("status", MODEL_ID, "--json")

    assert path.returncode == 1, path.stdout
    assert "installed for another catalog entry" in path.stderr
    assert json.loads(status.stdout)["status"] == "error"
    assert "installed for another catalog entry" in json.loads(status.stdout)["error_message"]
    assert world.requests() == before  # path and status never touch the network
    pulled = cli("pull", MODEL_ID)
    assert pulled.returncode == 5, pulled.stderr  # replaced from the sources: they disagree
    assert world.requests() > before


def test_pull_under_catalog_b_replaces_catalog_as_install(world: World) -> None:
    assert cli("pull", MODEL_ID).returncode == 0
    new = make_gguf(SIZE, seed=99)
    world.hub.change_content(new, "test-org/tiny-GGUF", FILENAME)
    world.proxy.add_model(MODEL_ID, {FILENAME: new})
    _second_catalog(world, size_bytes=SIZE, sha256=sha256_hex(new))

    assert cli("pull", MODEL_ID).returncode == 0
    assert world.installed_path().read_bytes() == new
    assert cli("path", MODEL_ID).returncode == 0
    record = json.loads((world.models_dir / ".llmlb" / MODEL_ID / "install.json").read_text())
    assert record["files"][0]["sha256"] == sha256_hex(new)


def test_both_catalogs_agreeing_share_the_install(world: World) -> None:
    assert cli("pull", MODEL_ID).returncode == 0
    _second_catalog(world, size_bytes=SIZE, sha256=world.sha256)
    before = world.requests()
    assert cli("pull", MODEL_ID).returncode == 0
    assert cli("path", MODEL_ID).returncode == 0
    assert world.requests() == before


# -- 7. pull-through of bytes not yet verified ----------------------------------------------------
def test_a_node_whose_etag_disagrees_with_its_bytes_is_never_installed_downstream(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    # An upstream node sends the sha256 it expects as its ETag and bytes that do not hash to
    # it (it had not verified them yet); the catalog here knows no sha256 of its own.
    sent, expected = make_gguf(200_000, seed=71), make_gguf(200_000, seed=72)
    node = serve(lambda rec: honest_reply(sent, rec, etag=f'"{sha256_hex(expected)}"'))
    world.monkeypatch.setenv("LLMLB_URL", node.url)
    world.monkeypatch.setenv("LLMLB_API_KEY", "test-key")
    world.hub.refuse()

    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve(MODEL_ID)
    failure = next(f for f in info.value.failures if f.source == "llmlb-proxy")
    assert failure.kind == "integrity" and sha256_hex(expected) in failure.message
    assert not world.installed_path().exists()


def test_a_node_whose_etag_matches_its_bytes_installs_downstream(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = make_gguf(200_000, seed=73)
    node = serve(lambda rec: honest_reply(content, rec, etag=f'"{sha256_hex(content)}"'))
    world.monkeypatch.setenv("LLMLB_URL", node.url)
    world.hub.refuse()
    assert world.resolver().resolve(MODEL_ID).path.read_bytes() == content


def test_an_upstream_download_failing_verification_ends_every_open_body_short(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    from node import running_node

    # Node A pulls a GGUF that is truncated (its one tensor declares 4096 bytes more than the
    # file holds) and serves it to two readers while it arrives. Its header is slow to parse
    # (1.4M vocabulary strings), so every byte is hashed well before the check fails: neither
    # reader may ever hold the whole body.
    content = build_gguf({}, [("w", 1 << 20, 24, 0)], data=(1 << 20) - 4096, vocab=1_400_000)
    size = len(content)
    source = serve(lambda rec: Reply(**{**vars(honest_reply(content, rec)), "rate": 4 << 20}))
    _as_url(world, source, "cut", "cut.gguf")
    world.proxy.refuse()
    key = {"Authorization": "Bearer node-key"}
    got = [bytearray(), bytearray()]
    with running_node(api_key="node-key") as a, httpx.Client(base_url=a.url, timeout=60) as c:
        with (
            c.stream("GET", "/v0/models/blob/cut", headers=key) as one,
            c.stream("GET", "/v0/models/blob/cut", headers=key) as two,
        ):
            for response, into in ((one, got[0]), (two, got[1])):
                with pytest.raises(httpx.RemoteProtocolError):  # ended short
                    for chunk in response.iter_bytes():
                        into += chunk
        a.wait_for(lambda: a.get("/v0/models/cut/status")[2]["status"] == "error")
    for body in got:
        assert 0 < len(body) < size and bytes(body) == content[: len(body)]


# -- 9. secrets ----------------------------------------------------------------------------------
def test_secrets_from_a_crlf_env_file_are_stripped_with_a_warning(world: World) -> None:
    world.monkeypatch.setenv("LLMLB_API_KEY", "test-key\r")  # the proxy's key, as CRLF left it
    world.monkeypatch.setenv("HF_TOKEN", "hf_crlf_token_1234\r\n")
    world.hub.refuse()  # the model must come through the proxy, with the stripped key

    done = cli("pull", MODEL_ID)

    assert done.returncode == 0, done.stderr
    assert "LLMLB_API_KEY has whitespace around its value" in done.stderr
    assert "HF_TOKEN has whitespace around its value" in done.stderr
    assert "test-key" not in done.stderr and "hf_crlf_token_1234" not in done.stderr
    assert world.installed_path().read_bytes() == world.content
    assert {r.authorization for r in world.proxy.requests} == {"Bearer test-key"}


@pytest.mark.parametrize(
    "variable, value",
    [
        ("HF_TOKEN", "hf_t\u00f6ken_secret"),
        ("LLMLB_API_KEY", "sk-\u2028secret-key"),
        ("LLMLB_API_KEY", "sk-in\x00side"),
        ("HF_TOKEN", "hf_tab\tinside"),
    ],
)
def test_a_secret_no_header_can_carry_exits_2_naming_the_variable_not_the_value(
    world: World, variable: str, value: str
) -> None:
    world.monkeypatch.setenv(variable, value.replace("\x00", "\x01"))  # env cannot hold NUL
    before = world.requests()

    done = cli("pull", MODEL_ID)

    assert done.returncode == 2, done.stderr
    assert variable in done.stderr and "not shown" in done.stderr
    assert "secret" not in done.stderr and "inside" not in done.stderr
    assert "Traceback" not in done.stderr and "codec" not in done.stderr
    assert world.requests() == before  # refused before any request


def test_userinfo_of_llmlb_url_is_checked_too(world: World) -> None:
    world.monkeypatch.setenv("LLMLB_URL", world.proxy.url.replace("//", "//me:p%C3%A4ss-secret@"))
    done = cli("pull", MODEL_ID)
    assert done.returncode == 2, done.stderr
    assert "LLMLB_URL" in done.stderr and "secret" not in done.stderr


def test_a_node_api_key_no_header_can_carry_stops_serve_with_exit_2(world: World) -> None:
    env = {**os.environ, "LLMLB_NODE_API_KEY": "n\u00f6de-secret", "LLMLB_NODE_PORT": "0"}
    done = subprocess.run(
        [str(LLMLB_NODE), "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "LLMLB_NODE_API_KEY" in done.stderr and "secret" not in done.stderr


SECRET_KEY = "sk-live-7f3a9c2e51d04b8e"
SECRET_TOKEN = "hf_Zq8XwV3mN5bT1yR7uK2p"
SECRET_PASS = "s3cr3t-pa55w0rd-9"


def _echoing(secrets: list[str]) -> Callable[[RecordedRequest], Reply]:
    """A server that puts the secrets it knows into every place a client may quote, in turn:
    the Location it redirects to, an error page, an HTML page instead of the file."""
    refused = refused_url()
    answers = [
        Reply(302, {"Location": f"ftp://{secrets[0]}@files.example/{secrets[1]}"}),
        Reply(302, {"Location": f"{refused}/{secrets[0]}?token={secrets[1]}"}),
        Reply(500, {"Content-Type": "text/plain"}, f"bad key {secrets}".encode()),
    ]
    answers.append(Reply(200, {"Content-Type": "text/html"}, f"<html>{secrets}</html>".encode()))
    count = iter(range(1 << 30))
    return lambda rec: answers[next(count) % len(answers)]


def _grep_tree(root: Path, needles: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.name.endswith(".gguf"):
            text = path.read_bytes().decode("utf-8", "replace")
            found += [f"{path}: {n}" for n in needles if n in text]
    return found


def test_no_secret_leaves_in_any_output_file_or_route(
    world: World, serve: Callable[..., ScriptedServer], tmp_path: Path
) -> None:
    secrets = [SECRET_KEY, SECRET_TOKEN, SECRET_PASS]
    hostile = serve(_echoing(secrets))
    proxy_url = hostile.url.replace("//", f"//llmlb:{SECRET_PASS}@")
    world.monkeypatch.setenv("LLMLB_URL", proxy_url)
    world.monkeypatch.setenv("LLMLB_API_KEY", SECRET_KEY)
    world.monkeypatch.setenv("HF_TOKEN", SECRET_TOKEN)
    world.monkeypatch.setenv("HF_ENDPOINT", hostile.url)
    world.monkeypatch.setenv("LLMLB_NODE_API_KEY", SECRET_KEY)
    entry = world.entry()
    entry["sources"] = [
        {"type": "huggingface"},
        {"type": "url", "url": f"{hostile.url}/tiny.gguf"},
    ]
    world.write_catalog()

    outputs = []
    started = time.monotonic()
    for args in (["pull", MODEL_ID], ["-v", "pull", MODEL_ID], ["status", "--json"], ["status"]):
        done = cli(*args)
        outputs += [done.stdout, done.stderr]
    assert "every source failed" in outputs[1]  # the attack ran: the sources were tried
    print(f"cli took {time.monotonic() - started:.1f}s")
    outputs += _node_routes(world, tmp_path)

    leaks = [f"output {i}: {s}" for i, text in enumerate(outputs) for s in secrets if s in text]
    leaks += _grep_tree(world.home, secrets)
    assert not leaks, leaks


def _node_routes(world: World, tmp_path: Path) -> list[str]:
    """Every route's body (and the node's log) while the node fails to pull the model."""
    log_path = tmp_path / "node.log"
    port = _free_port()
    env = {**os.environ, "LLMLB_NODE_PORT": str(port), "LLMLB_LOAD_WAIT": "20"}
    with open(log_path, "wb") as log:
        node = subprocess.Popen([str(LLMLB_NODE), "-v", "serve"], env=env, stderr=log)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {SECRET_KEY}"}
    bodies = []
    try:
        _wait_up(base, auth)
        with httpx.Client(base_url=base, headers=auth, timeout=60) as client:
            pull = {"model": MODEL_ID, "stream": False}
            bodies.append(client.post("/api/models/pull", json=pull).text)
            bodies.append(client.post("/api/models/pull", json={"model": MODEL_ID}).text)
            chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}
            bodies.append(client.post("/v1/chat/completions", json=chat).text)
            for route in (
                f"/v0/models/{MODEL_ID}/status",
                "/v1/models",
                f"/v1/models/{MODEL_ID}",
                "/v0/supported-models",
                "/api/health",
                "/api/system",
                "/api/tags",
                "/api/ps",
                "/metrics",
                f"/v0/models/blob/{MODEL_ID}",
            ):
                bodies.append(f"{route}: {client.get(route).text}")
    finally:
        node.terminate()
        node.wait(timeout=60)
    return [*bodies, log_path.read_text("utf-8", "replace")]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(base: str, auth: dict[str, str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base}/api/health", headers=auth, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("the node did not start")


def test_the_token_file_of_hf_auth_login_is_a_secret_too(
    world: World, serve: Callable[..., ScriptedServer], llmlb_env: Any
) -> None:
    token = "hf_FromTheTokenFile9Xq2"
    llmlb_env.hf_home.mkdir(parents=True, exist_ok=True)
    (llmlb_env.hf_home / "token").write_text(token)
    moved = f"ftp://files.example/{token}/tiny.gguf"
    hub = serve(lambda rec: Reply(302, {"Location": moved, "X-Repo-Commit": "d" * 40}))
    world.monkeypatch.setenv("HF_ENDPOINT", hub.url)
    world.proxy.refuse()

    done = cli("-v", "pull", MODEL_ID)

    assert done.returncode != 0
    assert hub.requests[0].authorization == f"Bearer {token}"  # the token was in use
    assert token not in done.stderr + done.stdout
    assert not _grep_tree(world.home, [token])


def test_route_bodies_mask_secrets_in_values_never_in_keys_or_codes() -> None:
    from llmlb_node import redact

    redact.remember("e")
    try:
        body = json.dumps(
            {
                "error": {
                    "message": "key e",
                    "type": "invalid_request_error",
                    "code": "model_not_found",
                    "failures": [{"url": "x?e"}],
                }
            }
        )
        clean = json.loads(redact.redact_json(body))
        assert clean["error"]["code"] == "model_not_found"
        assert clean["error"]["type"] == "invalid_request_error"
        assert clean["error"]["message"] == "k***y ***"
        assert clean["error"]["failures"] == [{"url": "x?***"}]
        sse = "data: " + body + "\n\ndata: [DONE]\n\n"
        lines = redact.redact_lines(sse).split("\n")
        assert json.loads(lines[0][6:])["error"]["message"] == "k***y ***"
        assert lines[2:] == ["data: [DONE]", "", ""]
    finally:
        redact._SECRETS.discard("e")
        redact._ORDERED[:] = sorted(redact._SECRETS, key=len, reverse=True)
