"""The resolution chain end to end against loopback servers: local -> Hub -> proxy."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import pytest
from gguf import make_gguf, sha256_hex
from world import FILENAME, MODEL_ID, REPO, World

from llmlb_node import (
    InsufficientDiskSpaceError,
    ModelDownloadError,
    ModelNotInstalledError,
    UnsupportedModelError,
)
from llmlb_node.errors import InvalidModelIdError
from llmlb_node.store import hostname


def _kinds(exc: ModelDownloadError) -> dict[str, str]:
    return {f.source: f.kind for f in exc.failures}


def test_hub_download_installs_verified_file(world: World) -> None:
    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.path == world.installed_path()
    assert resolved.path.read_bytes() == world.content
    assert resolved.source == f"huggingface:{REPO}"
    assert world.proxy.request_count == 0
    # The Hub answered the metadata request and redirected the bytes to its CDN host.
    assert any(r.host == "127.0.0.2" for r in world.hub.cdn.requests)
    record = world.resolver().store.read_record(MODEL_ID)
    assert record is not None and record.files[0].sha256 == world.sha256
    leftovers = [p.name for p in resolved.path.parent.iterdir() if p.name != FILENAME]
    assert leftovers == []


def test_local_hit_makes_zero_requests(world: World) -> None:
    world.resolver().resolve(MODEL_ID)
    world.hub.reset_counters()
    world.proxy.reset_counters()

    again = world.resolver().resolve(MODEL_ID)

    assert again.source == "local"
    assert again.path.read_bytes() == world.content
    assert world.requests() == 0


def test_unknown_id_fails_at_once_with_suggestions(world: World) -> None:
    world.add_model("tiny-chat", {"chat.gguf": make_gguf(1000)})
    resolver = world.resolver()
    assert len(resolver.catalog) == 2  # loaded once; the lookup itself is what must be fast

    start = time.perf_counter()
    with pytest.raises(UnsupportedModelError) as info:
        resolver.resolve("tiny-chatt")
    elapsed = time.perf_counter() - start

    # The plan's bar, with room for a loaded machine; the speed itself is benchmark 2.
    assert elapsed < 1.0
    message = str(info.value)
    assert "tiny-chatt" in message and str(world.catalog_path) in message
    assert "tiny-chat" in info.value.suggestions
    assert world.requests() == 0


@pytest.mark.parametrize("bad", ["../etc", "a/b", "/abs", "..", "", ".hidden", "a\\b"])
def test_ids_that_could_escape_the_store_are_refused(world: World, bad: str) -> None:
    with pytest.raises(InvalidModelIdError):
        world.resolver().resolve(bad)
    assert world.requests() == 0


def test_hub_down_falls_back_to_proxy(world: World) -> None:
    world.hub.refuse()

    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.source == "llmlb-proxy"
    assert resolved.path.read_bytes() == world.content
    (request,) = [r for r in world.proxy.requests if r.method == "GET"]
    assert request.path == f"/v0/models/blob/{MODEL_ID}"
    assert request.authorization == "Bearer test-key"


def test_hub_blocked_by_allowlist_falls_back_to_proxy(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMLB_ORIGIN_ALLOWLIST", "*.example.org, huggingface.co")

    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.source == "llmlb-proxy"
    assert world.hub.total_requests() == 0


def test_allowlist_pattern_that_matches_lets_the_hub_through(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMLB_ORIGIN_ALLOWLIST", "127.0.0.*")
    assert world.resolver().resolve(MODEL_ID).source.startswith("huggingface:")


def test_hf_hub_offline_skips_the_hub(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.source == "llmlb-proxy"
    assert world.hub.total_requests() == 0


def test_hub_wrong_bytes_are_not_installed_and_proxy_is_used(world: World) -> None:
    world.hub.cdn.serve_wrong_bytes()

    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.source == "llmlb-proxy"
    assert hashlib.sha256(resolved.path.read_bytes()).hexdigest() == world.sha256


def test_hub_wrong_bytes_with_no_fallback_installs_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLMLB_URL")
    world.hub.cdn.serve_wrong_bytes()

    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve(MODEL_ID)

    assert _kinds(info.value) == {f"huggingface:{REPO}": "integrity", "llmlb-proxy": "skipped"}
    assert "LLMLB_URL is not set" in str(info.value)
    model_dir = world.installed_path().parent
    assert not world.installed_path().exists()
    assert not [p for p in model_dir.iterdir()] if model_dir.exists() else True


def test_html_error_page_with_200_is_never_installed(world: World) -> None:
    world.hub.cdn.serve_html()
    world.proxy.serve_html()

    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve(MODEL_ID)

    assert set(_kinds(info.value).values()) == {"integrity"}
    assert "GGUF" in str(info.value)
    assert not world.installed_path().exists()


def test_everything_down_names_each_source(world: World) -> None:
    world.hub.refuse()
    world.proxy.refuse()

    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve(MODEL_ID)

    assert _kinds(info.value) == {f"huggingface:{REPO}": "refused", "llmlb-proxy": "refused"}
    text = str(info.value)
    assert f"huggingface:{REPO}" in text and "llmlb-proxy" in text and "refused" in text


def test_5xx_is_retried_then_succeeds(world: World) -> None:
    world.hub.cdn.fail_5xx(2, status=503)

    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.source.startswith("huggingface:")
    statuses = [r.status for r in world.hub.cdn.requests]
    assert statuses[:2] == [503, 503] and statuses[-1] in (200, 206)


def test_429_honours_retry_after(world: World) -> None:
    world.hub.cdn.fail_5xx(1, status=429, retry_after=0.3)

    start = time.monotonic()
    world.resolver().resolve(MODEL_ID)

    assert time.monotonic() - start >= 0.3


def test_hub_metadata_5xx_is_retried(world: World) -> None:
    world.hub.fail_5xx(2, status=502, methods=("HEAD",))
    assert world.resolver().resolve(MODEL_ID).source.startswith("huggingface:")


def test_persistent_5xx_gives_up_after_bounded_retries(world: World) -> None:
    world.hub.cdn.fail_5xx(1000, status=500)
    world.proxy.fail_5xx(1000, status=500)

    with pytest.raises(ModelDownloadError) as info:
        world.resolver(max_retries=3).resolve(MODEL_ID)

    assert set(_kinds(info.value).values()) == {"http"}
    assert len([r for r in world.hub.cdn.requests if r.method == "GET"]) == 3
    assert len([r for r in world.proxy.requests if r.method == "GET"]) == 3


def test_401_from_hub_is_not_retried_and_advises_hf_token(world: World) -> None:
    world.hub.require_token(REPO, "secret-token", kind="gated")
    world.proxy.fail_status(401)

    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve(MODEL_ID)

    hub_failure, proxy_failure = info.value.failures
    assert hub_failure.kind in ("unauthorized", "forbidden")
    assert "HF_TOKEN" in hub_failure.message
    assert proxy_failure.kind == "unauthorized" and "LLMLB_API_KEY" in proxy_failure.message
    assert len([r for r in world.hub.requests if r.method == "HEAD"]) == 1
    assert len(world.proxy.requests) == 1


def test_gated_repo_with_token_downloads(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.hub.require_token(REPO, "secret-token", kind="gated")
    monkeypatch.setenv("HF_TOKEN", "secret-token")

    assert world.resolver().resolve(MODEL_ID).source.startswith("huggingface:")


def test_without_hf_token_the_token_file_of_hf_auth_login_is_used(
    world: World, llmlb_env: Any
) -> None:
    world.hub.require_token(REPO, "file-token", kind="gated")
    llmlb_env.hf_home.mkdir(parents=True, exist_ok=True)
    (llmlb_env.hf_home / "token").write_text("file-token\n")  # what `hf auth login` writes

    assert world.resolver().resolve(MODEL_ID).source.startswith("huggingface:")
    assert {r.authorization for r in world.hub.requests} == {"Bearer file-token"}


def test_tokens_go_only_to_their_own_hosts(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    world.hub.require_token(REPO, "hf-secret", kind="private")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    caplog.set_level(logging.DEBUG)
    world.resolver().resolve(MODEL_ID)
    # And a second model that only the proxy has, so the proxy sees a request too.
    world.add_model("proxied", {"p.gguf": make_gguf(5000)}, on_hub=False)
    world.resolver().resolve("proxied")

    hub_auth = {r.authorization for r in world.hub.requests}
    cdn_auth = {r.authorization for r in world.hub.cdn.requests}
    proxy_auth = {r.authorization for r in world.proxy.requests}
    assert hub_auth == {"Bearer hf-secret"}
    assert cdn_auth == {None}  # the CDN host never sees the Hub token
    assert proxy_auth == {"Bearer test-key"}  # nor does the proxy, and it gets its own key
    assert "hf-secret" not in caplog.text and "test-key" not in caplog.text


def test_secrets_stay_out_of_error_messages(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.hub.require_token(REPO, "right-token", kind="gated")
    monkeypatch.setenv("HF_TOKEN", "wrong-token")
    monkeypatch.setenv("LLMLB_API_KEY", "wrong-key")

    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve(MODEL_ID)

    text = str(info.value) + repr(info.value.failures) + repr(world.settings())
    assert "wrong-token" not in text and "wrong-key" not in text


def test_hub_sha_differs_from_catalog_falls_back(world: World) -> None:
    other = make_gguf(len(world.content), seed=99)
    world.add_model(MODEL_ID, {FILENAME: world.content}, repo=REPO, sha256=world.sha256)
    world.hub.add_file(REPO, FILENAME, other)  # the Hub now serves different bytes

    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.source == "llmlb-proxy"
    assert resolved.path.read_bytes() == world.content
    assert not [r for r in world.hub.cdn.requests if r.method == "GET"]  # refused before GET


def test_missing_file_on_hub_is_not_found(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMLB_URL")
    world.add_model("ghost", {"ghost.gguf": make_gguf(100)}, on_hub=False, on_proxy=False)

    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("ghost")
    assert info.value.failures[0].kind == "not_found"
    assert "test-org/ghost-GGUF" in info.value.failures[0].message

    world.hub.add_file("test-org/ghost-GGUF", "other.gguf", make_gguf(100))
    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("ghost")
    assert info.value.failures[0].kind == "not_found"
    assert "ghost.gguf not found" in info.value.failures[0].message


def test_multi_file_model_through_hub_and_proxy(world: World) -> None:
    files = {
        "big-00001-of-00002.gguf": make_gguf(40_000, seed=5),
        "big-00002-of-00002.gguf": make_gguf(30_000, seed=6),
    }
    world.add_model("big", files)

    resolved = world.resolver().resolve("big")
    assert resolved.path.name == "big-00001-of-00002.gguf"
    assert [p.read_bytes() for p in resolved.paths] == list(files.values())

    world.resolver().remove("big")
    world.hub.refuse()
    resolved = world.resolver().resolve("big")
    assert resolved.source == "llmlb-proxy"
    assert {r.params.get("file") for r in world.proxy.requests} == set(files)


def test_disk_space_precheck_fails_before_any_byte(world: World) -> None:
    world.add_model(MODEL_ID, {FILENAME: world.content}, repo=REPO, size_bytes=2**60)

    with pytest.raises(InsufficientDiskSpaceError) as info:
        world.resolver().resolve(MODEL_ID)

    assert info.value.needed == 2**60 and info.value.free > 0
    assert world.requests() == 0


def test_hand_placed_model_gguf_is_accepted_once_it_is_a_gguf(world: World) -> None:
    manual = world.models_dir / "my-own" / "model.gguf"
    manual.parent.mkdir(parents=True)
    manual.write_bytes(b"<html>not a model</html>")
    with pytest.raises(UnsupportedModelError):
        world.resolver().resolve("my-own")

    manual.write_bytes(make_gguf(2048))
    resolved = world.resolver().resolve("my-own")

    assert resolved.path == manual and resolved.source == "local"
    assert world.requests() == 0


def test_path_never_touches_the_network(world: World) -> None:
    resolver = world.resolver()
    with pytest.raises(ModelNotInstalledError, match="llmlb-node pull tiny"):
        resolver.path(MODEL_ID)
    assert world.requests() == 0
    resolver.resolve(MODEL_ID)
    assert resolver.path(MODEL_ID) == world.installed_path()


def test_removed_file_is_downloaded_again(world: World) -> None:
    resolver = world.resolver()
    resolver.resolve(MODEL_ID).path.unlink()
    assert resolver.installed(MODEL_ID) is None
    assert resolver.resolve(MODEL_ID).path.read_bytes() == world.content


def test_tampered_file_is_not_served_from_cache(world: World) -> None:
    resolver = world.resolver()
    path = resolver.resolve(MODEL_ID).path
    path.write_bytes(b"GGUF" + b"\0" * (len(world.content) - 4))  # same size, new mtime
    fresh = resolver.resolve(MODEL_ID)
    assert sha256_hex(fresh.path.read_bytes()) == world.sha256


def test_hub_endpoint_answering_html_is_not_the_hub(world: World) -> None:
    world.hub.serve_html(methods=("HEAD",))

    resolved = world.resolver().resolve(MODEL_ID)

    assert resolved.source == "llmlb-proxy"


def test_the_llmlb_key_never_follows_a_redirect_to_another_host(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from servers import LoopbackServer, ProxyServer

    mirror = LoopbackServer(host="127.0.0.2")
    mirror.add_path("/blobs/tiny.gguf", world.content)

    class RedirectingProxy(ProxyServer):
        def handle_request(self, h, rec) -> None:  # noqa: ANN001
            self.send_bytes(h, rec, 302, b"", headers={"Location": f"{mirror.url}/blobs/tiny.gguf"})

    proxy = RedirectingProxy(api_key="test-key")
    try:
        monkeypatch.setenv("LLMLB_URL", proxy.url)
        world.hub.refuse()

        resolved = world.resolver().resolve(MODEL_ID)

        assert resolved.path.read_bytes() == world.content
        assert {r.authorization for r in proxy.requests} == {"Bearer test-key"}
        assert {r.authorization for r in mirror.requests} == {None}
    finally:
        proxy.close()
        mirror.close()


def test_a_128_character_id_with_a_200_character_filename(world: World) -> None:
    model_id, filename = "i" * 128, "f" * 195 + ".gguf"
    content = make_gguf(200_000, seed=8)
    world.add_model(model_id, {filename: content}, repo="test-org/long-GGUF")
    world.hub.cdn.drop_after(50_000)  # an interrupted first attempt leaves a partial + sidecar

    resolved = world.resolver().resolve(model_id)

    assert resolved.path.name == filename and resolved.path.read_bytes() == content
    ranges = [r.headers.get("range") for r in world.hub.cdn.requests if r.method == "GET"]
    assert len(ranges) == 2 and ranges[1].startswith("bytes=50000-")  # resumed, not restarted
    assert world.resolver().status(model_id).status == "completed"
    assert world.resolver().remove(model_id) is True


def test_a_repo_name_the_hub_refuses_is_a_catalog_error(world: World) -> None:
    from llmlb_node import CatalogError

    world.add_model("bad-repo", {"b.gguf": make_gguf(1000)}, repo="org/" + "r" * 100)
    with pytest.raises(CatalogError, match="'bad-repo'"):
        world.resolver().resolve("bad-repo")


def test_a_fallback_that_succeeds_is_info_naming_both_sources(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.hub.refuse()
    caplog.set_level(logging.DEBUG, logger="llmlb_node")

    assert world.resolver().resolve(MODEL_ID).source == "llmlb-proxy"

    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    installed = [r for r in caplog.records if "installed from" in r.getMessage()]
    assert len(installed) == 1 and installed[0].levelno == logging.INFO
    line = installed[0].getMessage()
    assert line.startswith("tiny: installed from llmlb-proxy at ")
    assert f"(after huggingface:{REPO} failed: [refused] " in line


def test_a_failed_download_leaves_no_empty_model_directory(world: World) -> None:
    world.hub.refuse()
    world.proxy.refuse()
    with pytest.raises(ModelDownloadError):
        world.resolver().resolve(MODEL_ID)
    assert not (world.models_dir / MODEL_ID).exists()
    status = world.resolver().status(MODEL_ID)
    assert status.status == "error" and len(status.failures) == 2
    assert status.to_dict()["failures"][1]["kind"] == "refused"


def test_a_download_whose_process_died_reports_interrupted(world: World) -> None:
    import json
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    resolver = world.resolver()
    status_path = resolver.store.status_path(MODEL_ID)
    status_path.parent.mkdir(parents=True)
    status_path.write_text(
        json.dumps(
            {
                "model_id": MODEL_ID,
                "filename": FILENAME,
                "source": f"huggingface:{REPO}",
                "stage": "downloading",
                "downloaded": 1000,
                "total": 300_000,
                "pid": dead.pid,
                "host": hostname(),
                "updated_at": time.time(),
            }
        )
    )
    status = resolver.status(MODEL_ID)
    assert status.status == "interrupted" and status.error_message is None
    assert status.downloaded_bytes == 1000


def test_aresolve_runs_in_a_worker_thread_while_the_loop_keeps_ticking(world: World) -> None:
    import asyncio
    import threading

    world.hub.cdn.rate_limit(300_000)  # the 300 kB file takes about a second
    resolver = world.resolver()
    ticks: list[float] = []
    loop_thread = threading.get_ident()
    download_threads: set[int] = set()

    async def main() -> object:
        async def tick() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)  # the first tick
        started = time.monotonic()
        resolved = await resolver.aresolve(
            MODEL_ID, progress=lambda e: download_threads.add(threading.get_ident())
        )
        took = time.monotonic() - started
        ticker.cancel()
        return resolved, started, took

    resolved, started, took = asyncio.run(main())

    assert resolved.path.read_bytes() == world.content
    assert download_threads and loop_thread not in download_threads
    assert took > 0.5
    # The loop kept ticking all along: a resolve blocking it would leave one gap as long as the
    # download. The margin holds on a loaded machine (the scheduler may pause a thread a while).
    during = [t for t in ticks if t >= started]
    assert len(during) >= 5
    gaps = [b - a for a, b in zip([started, *during], [*during, started + took], strict=False)]
    assert max(gaps) < took / 2, (max(gaps), took)


def test_cancelling_aresolve_leaves_the_download_running_to_the_end(world: World) -> None:
    import asyncio

    world.hub.cdn.rate_limit(300_000)  # the 300 kB file takes about a second
    resolver = world.resolver()
    events: list[str] = []

    async def main() -> None:
        task = asyncio.create_task(
            resolver.aresolve(MODEL_ID, progress=lambda e: events.append(e.stage))
        )
        while "downloading" not in events:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())  # waits for the worker thread: the download was not stopped

    assert resolver.path(MODEL_ID).read_bytes() == world.content
    assert resolver.status(MODEL_ID).status == "completed"


def test_remove_refuses_while_this_process_downloads_the_model(world: World) -> None:
    import threading

    from llmlb_node import ModelBusyError

    world.hub.cdn.rate_limit(200_000)  # about 1.5 s
    resolver = world.resolver()
    events: list[str] = []
    worker = threading.Thread(
        target=lambda: resolver.resolve(MODEL_ID, progress=lambda e: events.append(e.stage))
    )
    worker.start()
    deadline = time.monotonic() + 30
    while "downloading" not in events:
        assert time.monotonic() < deadline
        time.sleep(0.01)

    with pytest.raises(ModelBusyError, match=r"'tiny' is being downloaded by this process"):
        resolver.remove(MODEL_ID)
    worker.join()

    assert events[-1] == "installed"
    assert world.installed_path().read_bytes() == world.content
    assert resolver.remove(MODEL_ID) is True and not world.installed_path().exists()


_COLD_PATH = """
from llmlb_node import LazyLlama, ModelResolver
resolver = ModelResolver()
resolver.resolve({id!r})
resolver.path({id!r})
resolver.installed({id!r})
LazyLlama({id!r}, n_ctx=64)
import json, sys
print(json.dumps(sorted(sys.modules)))
"""
# What an installed model's path must never load: the download machinery and what only it needs.
_DOWNLOAD_ONLY = (
    "httpx",
    "httpcore",
    "huggingface_hub",
    "filelock",
    "tqdm",
    "llmlb_node.download",
    "llmlb_node.sources",
    "llmlb_node.progress",
    "llmlb_node.status",
    "llmlb_node.gguf",
)


def test_an_installed_models_path_imports_nothing_of_the_download_machinery(
    world: World,
) -> None:
    import json
    import os
    import subprocess
    import sys

    world.resolver().resolve(MODEL_ID)  # installed, with its record

    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _COLD_PATH.format(id=MODEL_ID)],
        env={**os.environ, **world.env()},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    # -X importtime lists what `import` statements load; the package's lazy names load through
    # importlib (not listed there), so the interpreter's own list at the end counts too.
    imported = {
        line.rpartition("|")[2].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "llmlb_node.store" in imported
    imported.update(json.loads(done.stdout.splitlines()[-1]))
    assert "llmlb_node.resolver" in imported and "llmlb_node.lazy" in imported
    loaded = sorted(m for m in imported if m.startswith(_DOWNLOAD_ONLY))
    assert loaded == [], loaded
