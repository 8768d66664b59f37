"""The operator's page in a real headless Chromium against `llmlb-node serve` with the real Gemma:
the model list, a pull's moving progress bar from a slow loopback Hub, a playground chat streaming
tokens, and a page polling for a while with no growing memory or connections. Each state is a
screenshot under the test's tmp folder (`screenshots/`)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import Tab, open_tab
from node import Node, offline_env, running_node
from servers import refused_url

from llmlb_node.catalog import PACKAGED_CATALOG

from .conftest import GEMMA_FILE, GEMMA_ID, GEMMA_REPO, GemmaWorld

pytestmark = pytest.mark.e2e

GEMMA_ROW = f"tr[data-model={GEMMA_ID}]"


@pytest.fixture(scope="module")
def node(gemma_file: Path) -> Iterator[Node]:
    """A node over the store holding Gemma, with the packaged catalog (read-only tests)."""
    with running_node(offline_env(gemma_file.parents[2], N_CTX="512")) as running:
        yield running


def test_the_page_lists_the_models_with_their_marks_on_a_desktop_and_a_phone(
    node: Node, chromium: object, tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    _, _, catalog = node.get("/v0/supported-models")
    tab = open_tab(chromium, node.url, shots)
    tab.page.wait_for_selector(f"{GEMMA_ROW} .mark.installed")
    tab.page.wait_for_selector(f"{GEMMA_ROW} td:has-text('gemma3')")  # the GGUF's architecture
    rows = tab.page.locator("tr[data-model]")
    ids = [rows.nth(i).get_attribute("data-model") for i in range(rows.count())]
    gemma = tab.page.inner_text(GEMMA_ROW)
    others = [tab.page.inner_text(f"tr[data-model='{i}']") for i in ids if i != GEMMA_ID]
    buttons = tab.page.locator(f"{GEMMA_ROW} button").all_inner_texts()
    pulls = tab.page.locator("button[data-action=pull]").count()
    tab.shot("models-desktop-light")
    dark = open_tab(chromium, node.url, shots, color_scheme="dark")
    dark.page.wait_for_selector(f"{GEMMA_ROW} .mark.installed")
    dark_background = dark.page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    dark.shot("models-desktop-dark")
    phone = open_tab(chromium, node.url, shots, viewport={"width": 360, "height": 780})
    phone.page.wait_for_selector(f"{GEMMA_ROW} .mark.installed")
    phone_width = phone.page.evaluate("() => document.documentElement.scrollWidth")
    phone.shot("models-phone-360")
    errors = tab.errors() + dark.errors() + phone.errors()

    assert sorted(ids) == sorted(m["id"] for m in catalog["models"])
    assert "installed" in gemma and "241.4 MiB" in gemma and "gemma3" in gemma
    assert "python-package:" in gemma  # the source it was installed from
    assert buttons == ["Delete"]  # installed, not loaded: nothing to pull or unload
    assert all("not installed" in row for row in others) and pulls == len(others)
    assert dark_background == "rgb(17, 19, 23)"
    assert phone_width <= 360  # nothing wider than the phone: no sideways scrolling
    assert errors == []


def test_a_playground_chat_streams_tokens_with_its_ttft_and_rate(
    node: Node, chromium: object, tmp_path: Path
) -> None:
    tab = open_tab(chromium, node.url, tmp_path / "screenshots")
    page = tab.page
    page.wait_for_selector(f"#play-model option[value={GEMMA_ID}]", state="attached")
    page.select_option("#play-model", GEMMA_ID)
    page.check("input[name=mode][value=chat]")
    page.fill("#play-max", "48")
    page.fill("#play-prompt", "Tell me a long story about a lighthouse keeper.")
    page.click("#play-send")
    seen = _token_counts_while_streaming(tab)
    page.wait_for_selector("#play-stats:has-text('done')", timeout=120_000)
    stats = page.inner_text("#play-stats")
    answer = page.inner_text("#play-output")
    page.wait_for_selector(f".slot[data-model={GEMMA_ID}]:has-text('0 active')")
    slot = page.inner_text(f".slot[data-model={GEMMA_ID}]")
    loaded = page.inner_text(GEMMA_ROW)
    tab.shot("playground-done")
    errors = tab.errors()

    assert len(seen) >= 3, seen  # the text grew token by token, not all at once
    assert re.fullmatch(r"TTFT \d+ ms · \d+\.\d tok/s · \d+ tokens · done", stats), stats
    assert int(stats.split(" · ")[2].split()[0]) >= max(seen) >= 3  # the node's usage count
    assert answer.strip()
    assert "0 active, 0 queued" in slot and "Keep-alive left" in slot and "RSS growth" in slot
    assert re.search(r"Memory estimate\s+\d+\.\d MiB at n_ctx=512", slot), slot
    assert "loaded" in loaded and "Unload" in loaded
    assert errors == []


def test_stop_ends_the_answer_on_the_node_and_unload_is_refused_until_then(
    node: Node, chromium: object, tmp_path: Path
) -> None:
    tab = open_tab(chromium, node.url, tmp_path / "screenshots")
    page = tab.page
    page.wait_for_selector(f"#play-model option[value={GEMMA_ID}]", state="attached")
    page.check("input[name=mode][value=completion]")
    page.fill("#play-max", "400")
    page.fill("#play-prompt", "Once upon a time")
    lines = re.compile(rf"POST /v1/completions model={GEMMA_ID} status=\d+ .* tokens=(\d+)")
    before = len(lines.findall(node.log))
    page.click("#play-send")

    def tokens() -> int:
        return int(page.get_attribute("#play-output", "data-tokens") or 0)

    tab.wait_until(lambda: tokens() >= 5, 120, "five tokens")
    page.click(f"{GEMMA_ROW} button[data-action=unload]")  # refused: a request uses it
    page.wait_for_selector("#messages li.error")
    busy = page.inner_text("#messages li.error")
    page.click("#play-stop")
    page.wait_for_selector("#play-stats:has-text('stopped')")
    shown = tokens()
    tab.shot("playground-stopped")
    node.wait_for(lambda: len(lines.findall(node.log)) > before, 30, "the request's access line")
    generated = int(lines.findall(node.log)[-1])
    node.wait_for(lambda: all(m["active_requests"] == 0 for m in node.get("/api/ps")[2]["models"]))
    page.click(f"{GEMMA_ROW} button[data-action=unload]")
    page.wait_for_selector(f"#messages li.info:has-text('{GEMMA_ID}: unloaded.')")
    page.wait_for_selector("#slots:has-text('Nothing loaded.')")
    errors = tab.errors(http_statuses=(409,))

    assert 5 <= shown < 400
    assert generated < 400  # the node stopped at the disconnect, not at max_tokens
    assert "409 model_in_use" in busy
    assert node.loaded() == set()
    assert errors == []


def _token_counts_while_streaming(tab: Tab) -> list[int]:
    """The token counts the output showed, read every few ms while Stop is enabled; one
    screenshot mid-stream."""
    tab.wait_until(lambda: tab.page.is_enabled("#play-stop"), 30, "the request to start")
    seen: list[int] = []
    shot = False
    while tab.page.is_enabled("#play-stop"):
        tokens = tab.page.get_attribute("#play-output", "data-tokens")
        if tokens and (not seen or int(tokens) != seen[-1]):
            seen.append(int(tokens))
            if len(seen) == 3 and not shot:
                tab.shot("playground-streaming")
                shot = True
        time.sleep(0.005)
    final = int(tab.page.get_attribute("#play-output", "data-tokens") or 0)
    return seen if seen and seen[-1] == final else [*seen, final]


def test_a_pull_shows_a_moving_progress_bar_the_failed_source_and_a_409_then_installed(
    gemma_world: GemmaWorld, chromium: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = refused_url()
    entry = next(e for e in json.loads(PACKAGED_CATALOG.read_text()) if e["id"] == GEMMA_ID)
    entry["sources"] = [
        {"type": "url", "url": f"{refused}/{GEMMA_FILE}"},  # tried first, refused
        {"type": "huggingface", "repo": GEMMA_REPO},
    ]
    catalog = gemma_world.home / "ui-catalog.json"
    gemma_world.home.mkdir(parents=True, exist_ok=True)
    catalog.write_text(json.dumps([entry]))
    monkeypatch.setenv("LLMLB_SUPPORTED_MODELS", str(catalog))
    gemma_world.hub.cdn.rate_limit(12_000_000)  # 253 MB in about 20 s: a bar to watch
    with running_node(DOWNLOAD_CONNECTIONS="1") as node:
        tab = open_tab(chromium, node.url, tmp_path / "screenshots")
        page = tab.page
        page.click(f"{GEMMA_ROW} button[data-action=pull]")
        bar = f".download[data-model={GEMMA_ID}] progress"
        page.wait_for_selector(bar)
        first = tab.wait_until(lambda: _value(tab, bar), 60, "the first bytes")
        time.sleep(2.0)
        later = _value(tab, bar)
        download = page.inner_text(f".download[data-model={GEMMA_ID}]")
        marks = page.inner_text(f"{GEMMA_ROW} .marks")
        tab.shot("pull-progress")
        page.click(f"{GEMMA_ROW} button[data-action=delete]")
        page.click(f"{GEMMA_ROW} button:has-text('Confirm delete')")
        page.wait_for_selector("#messages li.error")
        refusal = page.inner_text("#messages li.error")
        tab.shot("pull-delete-refused")
        page.wait_for_selector(f"{GEMMA_ROW} .mark.installed", timeout=240_000)
        page.wait_for_selector("#downloads:has-text('No download running')")
        done = page.inner_text("#messages")
        tab.shot("pull-installed")
        errors = tab.errors(http_statuses=(409,))

    assert 0 < first < later < 1, (first, later)  # the bar moved in 2 s
    assert re.search(r"\d+\.\d MiB of 241\.4 MiB", download), download
    assert re.search(r"\d+\.\d+ MiB/s", download) and re.search(r"ETA \d+s", download), download
    assert f"from huggingface:{GEMMA_REPO}" in download
    assert "Sources that failed before this one:" in download
    assert "url:127.0.0.1 [refused]" in download
    assert "downloading" in marks
    assert "409 model_in_use" in refusal
    assert f"{GEMMA_ID}: installed." in done
    assert gemma_world.installed.exists()
    assert errors == []


def _value(tab: Tab, bar: str) -> float:
    """The progress bar's fraction, as the browser holds it."""
    return float(tab.page.eval_on_selector(bar, "el => el.position"))


def test_a_page_polling_for_a_while_keeps_its_memory_and_connections(
    node: Node, chromium: object, tmp_path: Path
) -> None:
    """At ?poll=100 the page makes in a minute the rounds of ten minutes at its default; with
    Gemma loaded each round re-renders the slots (the keep-alive countdown moves)."""
    node.post("/v1/completions", {"model": GEMMA_ID, "prompt": "Hi", "max_tokens": 1})
    tab = open_tab(chromium, f"{node.url}/?poll=100", tmp_path / "screenshots")
    tab.page.wait_for_selector(f".slot[data-model={GEMMA_ID}]")
    cdp = tab.page.context.new_cdp_session(tab.page)
    rounds_before = node.log.count("GET /api/ps ")
    time.sleep(10)  # warm: every path has run, the heap has settled
    start = _heap(cdp)
    first = _client_ports(node.port)
    ports: set[int] = set()
    most = 0
    deadline = time.monotonic() + 50
    while time.monotonic() < deadline:
        open_now = _client_ports(node.port)
        ports |= open_now
        most = max(most, len(open_now))
        time.sleep(0.25)
    end = _heap(cdp)
    rounds = node.log.count("GET /api/ps ") - rounds_before
    tab.shot("after-a-minute-of-polling")
    errors = tab.errors()
    print(f"{rounds} rounds; heap {start} -> {end}; at most {most} connections, {len(ports)} ports")

    assert rounds >= 200, rounds  # under load a round takes longer than 100 ms: still many
    assert end["used"] - start["used"] < 1024 * 1024, (start, end)
    assert end["nodes"] <= start["nodes"] * 1.1 + 50, (start, end)
    assert end["listeners"] <= start["listeners"], (start, end)
    assert most <= 3, most  # the polling one, and the page load's until the node drops them
    assert ports <= first, (first, ports)  # not one new connection in 50 s: kept alive, reused
    assert errors == []


def _heap(cdp: object) -> dict[str, int]:
    """JS heap used after a full garbage collection, and the DOM's node and listener counts."""
    cdp.send("HeapProfiler.collectGarbage")  # type: ignore[attr-defined]
    heap = cdp.send("Runtime.getHeapUsage")  # type: ignore[attr-defined]
    dom = cdp.send("Memory.getDOMCounters")  # type: ignore[attr-defined]
    return {"used": heap["usedSize"], "nodes": dom["nodes"], "listeners": dom["jsEventListeners"]}


def _client_ports(server_port: int) -> set[int]:
    """Local ports of this machine's established IPv4 connections to `server_port`."""
    ports = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and int(remote.split(":")[1], 16) == server_port:
                ports.add(int(local.split(":")[1], 16))
    return ports
