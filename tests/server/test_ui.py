"""The operator's page on a real node: its files open without the key and no data does, the
downloads route shows a live download with the sources that failed before it, and a wrong key
typed into the page in a real Chromium is an error while the right one shows the models.

The page with the real Gemma (listing, a pull's progress bar, the playground, memory over time)
is in tests/e2e/test_ui.py.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

from browser import HIDDEN_SWITCH, open_tab
from node import running_node
from servers import refused_url
from world import FILENAME, MODEL_ID, REPO, SIZE, World

from llmlb_node.server import ui

KEY = "s3cret-key"


def test_the_page_and_its_files_open_without_the_key_and_no_data_does(world: World) -> None:
    with running_node(api_key=KEY) as node:
        no_key = {"Authorization": ""}
        page = node.get("/", headers=no_key)
        files = {name: node.get(f"/ui/{name}", headers=no_key) for name in ui.assets()}
        missing = node.get("/ui/nothing.js", headers=no_key)
        walking = node.get("/ui/..%2Fapp.py", headers=no_key)
        data = [
            node.get(path, headers=no_key)[0]
            for path in ("/v0/downloads", "/api/ps", "/api/health", "/v0/supported-models")
        ]
        with_key = node.get("/v0/downloads")

    status, headers, html = page
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in headers["content-security-policy"]
    assert {name: r[0] for name, r in files.items()} == dict.fromkeys(ui.assets(), 200)
    assert files["app.js"][1]["content-type"].startswith("text/javascript")
    assert missing[0] == 404 and walking[0] == 404
    assert data == [401, 401, 401, 401]
    assert with_key[0] == 200 and with_key[2] == {"downloads": []}


def test_the_page_loads_only_its_own_files_and_nothing_from_another_host() -> None:
    html = (ui.UI_DIR / "index.html").read_text()
    loaded = set(re.findall(r'(?:src|href)="/ui/([^"]+)"', html))
    texts = [p.read_text() for p in ui.assets().values() if p.suffix in (".html", ".css", ".js")]

    assert loaded == {"app.js", "style.css"} and loaded <= set(ui.assets())
    assert not [t for t in texts if re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", t)]


def test_downloads_shows_a_live_download_with_the_sources_that_failed_before(
    world: World,
) -> None:
    refused = refused_url()
    world.entry()["sources"] = [
        {"type": "url", "url": f"{refused}/{FILENAME}"},
        {"type": "huggingface", "repo": REPO},
    ]
    world.write_catalog()
    world.hub.cdn.rate_limit(60_000)  # 300 kB in 5 s: the download is seen in flight
    with running_node(DOWNLOAD_CONNECTIONS="1") as node:
        pull = threading.Thread(
            target=node.post, args=("/api/models/pull", {"model": MODEL_ID, "stream": False})
        )
        pull.start()

        def moving() -> dict | None:
            rows = node.get("/v0/downloads")[2]["downloads"]
            return rows[0] if rows and rows[0]["downloaded_bytes"] > 0 else None

        node.wait_for(moving, 30, "a download with bytes")
        live = moving()
        _, _, catalog = node.get("/v0/supported-models")
        pull.join(60)
        after = node.get("/v0/downloads")[2]

    assert live is not None and live["model_id"] == MODEL_ID
    assert live["status"] == live["stage"] == "downloading"
    assert live["total_bytes"] == SIZE and 0 < live["downloaded_bytes"] < SIZE
    assert live["source"] == f"huggingface:{REPO}" and live["bytes_per_s"] > 0
    assert [(f["source"], f["kind"]) for f in live["failures"]] == [("url:127.0.0.1", "refused")]
    assert catalog["models"][0]["size_bytes"] == SIZE
    assert after == {"downloads": []}


def test_a_wrong_key_is_an_error_on_the_page_and_the_right_key_shows_the_models(
    world: World, chromium: object, tmp_path: Path
) -> None:
    with running_node(api_key=KEY) as node:
        tab = open_tab(chromium, node.url, tmp_path / "screenshots")
        page = tab.page
        page.wait_for_selector("#auth:not([hidden])")
        asked = page.is_visible("#auth-error")
        page.fill("#auth-key", "not-the-key")
        page.press("#auth-key", "Enter")
        page.wait_for_selector("#auth-error:not([hidden])")
        refused = page.inner_text("#auth-error")
        tab.shot("wrong-key")
        page.fill("#auth-key", KEY)
        page.click("#auth button[type=submit]")
        page.wait_for_selector(f"tr[data-model={MODEL_ID}]")
        page.wait_for_selector("#auth", state="hidden")
        page.wait_for_selector("#health-badge[data-status=online]")
        kept = page.evaluate("() => sessionStorage.getItem('llmlb-node-api-key')")
        page.reload()
        page.wait_for_selector(f"tr[data-model={MODEL_ID}]")
        asked_again = page.is_visible("#auth")
        tab.shot("right-key")
        errors = tab.errors(http_statuses=(401,))

    assert not asked  # no key tried yet: a question, not an error
    assert "refused this key" in refused and "401 invalid_api_key" in refused
    assert kept == KEY and not asked_again  # asked once: the tab keeps the key
    assert errors == []


def test_an_unusable_entry_has_no_pull_button_and_a_pull_installs_a_model(
    world: World, chromium: object, tmp_path: Path
) -> None:
    world.add_model("tiny-st", {"tiny.safetensors": b"x" * 1000}, format="safetensors")
    with running_node() as node:
        tab = open_tab(
            chromium, node.url, tmp_path / "screenshots", viewport={"width": 360, "height": 700}
        )
        page = tab.page
        page.wait_for_selector("tr[data-model=tiny-st] .mark.unusable")
        unusable = page.locator("tr[data-model=tiny-st] button").all_inner_texts()
        page.click(f"tr[data-model={MODEL_ID}] button[data-action=pull]")
        page.wait_for_selector(f"tr[data-model={MODEL_ID}] .mark.installed")
        page.wait_for_selector("#messages li.info")
        said = page.inner_text("#messages")
        choices = page.locator("#play-model option").all_inner_texts()
        tab.shot("unusable-and-pulled-360")
        errors = tab.errors()

    assert unusable == []  # nothing to pull: this node cannot run it
    assert f"{MODEL_ID}: installed." in said
    assert choices == [MODEL_ID]  # the playground offers installed, runnable models only
    assert world.installed_path().exists()
    assert errors == []


def test_a_hidden_tab_sends_no_request_until_it_is_shown_again(
    world: World, chromium: object, tmp_path: Path
) -> None:
    with running_node() as node:
        url = f"{node.url}/?poll=200"
        tab = open_tab(chromium, url, tmp_path / "screenshots", init_script=HIDDEN_SWITCH)
        tab.page.wait_for_selector(f"tr[data-model={MODEL_ID}]")
        tab.page.evaluate("() => window.setHidden(true)")
        time.sleep(1.0)  # the round in flight ends
        hidden_from = _polls(node)
        time.sleep(3.0)
        while_hidden = _polls(node) - hidden_from
        tab.page.evaluate("() => window.setHidden(false)")
        node.wait_for(lambda: _polls(node) > hidden_from + 3, 10, "polling to resume")
        errors = tab.errors()

    assert while_hidden == 0
    assert errors == []


def _polls(node: object) -> int:
    return node.log.count("GET /api/ps ")  # type: ignore[attr-defined]


def test_a_hung_or_stopped_node_is_unreachable_on_the_page_until_it_answers_again(
    world: World, chromium: object, tmp_path: Path
) -> None:
    with running_node() as node:
        tab = open_tab(chromium, f"{node.url}/?poll=200", tmp_path / "screenshots")
        page = tab.page
        page.wait_for_selector("#health-badge[data-status=online]")
        node.proc.send_signal(signal.SIGSTOP)  # connections open, nothing answers
        try:
            page.wait_for_selector("#health-badge:has-text('unreachable')", timeout=30_000)
            hung = page.inner_text("#health")
            tab.shot("unreachable")
        finally:
            node.proc.send_signal(signal.SIGCONT)
        page.wait_for_selector("#health-badge[data-status=online]", timeout=30_000)
        before_stop = tab.errors()
        node.stop()  # now connections are refused
        page.wait_for_selector("#health-badge:has-text('unreachable')", timeout=30_000)
        # A poll on a connection still open while the node stops gets its 503 shutting_down
        # (README: Stopping and restarting); after that, connections are refused.
        errors = tab.errors(http_statuses=(503,), refused=True)

    assert "no answer: the node did not answer in time" in hung and "Last answer" in hung
    assert before_stop == []
    assert errors == []
