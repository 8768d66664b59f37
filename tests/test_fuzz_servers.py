"""A lying server through randomized misbehaviours: whatever it does, an install is byte-identical
to a good version it really serves (never one whose tensor layout ggml refuses; as a Hub whose
branch moves, the one of the commit the install record names), and every run ends within its bound.

Seeded and bounded: ``LLMLB_FUZZ_ROUNDS`` (default 200) rounds from ``LLMLB_FUZZ_SEED`` (default
8). A failure prints the round's seed, catalog entry and the server's log, to replay it.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest
from gguf import build_gguf, make_gguf, sha256_hex
from servers import (
    HTML_ERROR_PAGE,
    RecordedRequest,
    Reply,
    ScriptedServer,
    honest_reply,
    requested_range,
)
from world import World

from llmlb_node import ModelResolver
from llmlb_node.errors import LlmlbError

ROUNDS = int(os.environ.get("LLMLB_FUZZ_ROUNDS", "200"))
SEED = int(os.environ.get("LLMLB_FUZZ_SEED", "8"))
ROUND_BOUND_S = 20.0
OUTCOMES: list[str] = []  # with the settings below, no round may take longer than this

MISBEHAVIOURS = {
    "honest": 8,
    "drop": 4,  # cut at a random byte, Content-Length kept (the client sees an early EOF)
    "truncate-no-length": 3,  # cut at a random byte with no Content-Length: looks complete
    "wrong-content-range": 2,  # first byte or total in Content-Range not what is sent
    "ignore-range": 2,  # 200 with the whole file to a Range request
    "change-version": 2,  # from now on serve the other version (new bytes, maybe new size)
    "wrong-length": 2,  # Content-Length off by a few bytes either way
    "wrong-total": 2,  # a size header (Content-Length of a 200, Content-Range total) that lies
    "html": 1,  # a 200 error page instead of the file
    "503": 1,
    "416-on-resume": 2,  # 416 to a Range not from byte 0 (a fresh GET still works)
    "bad-layout": 1,  # from now on serve a GGUF of the same size whose layout ggml refuses
}
# As a Hub, the liar is one repo whose `main` moves with each change of version; a request by
# commit gets that commit's bytes (honest about commits, lying about everything else).
COMMITS = ("a" * 40, "b" * 40, "c" * 40)
# A liar's ETags: none, one per version (strong), or one weak ETag whatever the version.
ETAG_MODES = ("none", "per-version", "weak")


class Liar:
    """Answers each request with a misbehaviour drawn from its own seeded generator."""

    def __init__(
        self, rng: random.Random, versions: list[bytes], etags: str, hub: bool = False
    ) -> None:
        self.rng = rng
        self.versions = versions  # two good ones, then one whose layout ggml refuses
        self.current = 0
        self.etags = etags
        self.hub = hub
        self.log: list[str] = []

    def __call__(self, rec: RecordedRequest) -> Reply:
        kinds, weights = zip(*MISBEHAVIOURS.items(), strict=True)
        kind = self.rng.choices(kinds, weights)[0]
        if kind == "change-version" and self.current < 2:
            self.current = 1 - self.current
        elif kind == "bad-layout":
            self.current = 2
        asked = next((i for i, c in enumerate(COMMITS) if f"/{c}/" in rec.path), None)
        version = self.current if asked is None or not self.hub else asked
        content = self.versions[version]
        etag = {"none": None, "weak": 'W/"v"'}.get(
            self.etags, f'"v{version}-{sha256_hex(content)[:12]}"'
        )
        asked_for = f"{rec.method} {rec.path} {rec.headers.get('range')}"
        self.log.append(f"{asked_for} -> {kind} (v{version})")
        reply = honest_reply(content, rec, etag)
        n = len(reply.body)
        if kind == "drop":
            reply.cut = self.rng.randrange(n)
        elif kind == "truncate-no-length":
            reply.headers.pop("Content-Length")
            reply.cut = self.rng.randrange(n)
        elif kind == "wrong-content-range" and reply.status == 206:
            first, _, total = reply.headers["Content-Range"][6:].replace("/", "-").split("-")
            shift = self.rng.choice([-100, -1, 1, 100])
            if self.rng.random() < 0.5:
                first = str(max(0, int(first) + shift))
            else:
                total = str(int(total) + shift)
            last = int(first) + n - 1
            reply.headers["Content-Range"] = f"bytes {first}-{last}/{total}"
        elif kind == "ignore-range":
            reply = Reply(200, {"Content-Length": str(len(content))}, content)
            if etag:
                reply.headers["ETag"] = etag
        elif kind == "wrong-length":
            off = self.rng.choice([-7, -1, 1, 7])
            reply.headers["Content-Length"] = str(max(0, n + off))
        elif kind == "wrong-total":
            off = self.rng.choice([-4096, -1, 1, 4096])
            if reply.status == 206:
                first_last = reply.headers["Content-Range"].rpartition("/")[0]
                reply.headers["Content-Range"] = f"{first_last}/{len(content) + off}"
            else:
                reply.headers["Content-Length"] = str(len(content) + off)
        elif kind == "html":
            reply = Reply(200, {"Content-Type": "text/html"}, HTML_ERROR_PAGE)
            reply.headers["Content-Length"] = str(len(HTML_ERROR_PAGE))
        elif kind == "503":
            reply = Reply(503, {"Content-Length": "0"})
        elif kind == "416-on-resume" and (requested_range(rec, len(content)) or (0,))[0] > 0:
            reply = Reply(416, {"Content-Range": f"bytes */{len(content)}", "Content-Length": "0"})
        if self.hub and kind != "html":  # an HTML page is a portal's, not the Hub's
            reply.headers["X-Repo-Commit"] = COMMITS[version]
        return reply


def _round(world: World, seed: int) -> None:
    rng = random.Random(seed)
    size_a = rng.choice([30_000, 70_000, 150_000])
    size_b = rng.choice([size_a, size_a + 8192])
    versions = [make_gguf(size_a, seed=seed * 2 + 1), make_gguf(size_b, seed=seed * 2 + 2)]
    versions.append(_bad_layout(rng, size_a))
    hub = rng.random() < 0.4
    liar = Liar(random.Random(seed + 1), versions, etags=rng.choice(ETAG_MODES), hub=hub)
    server = ScriptedServer(liar)
    exact = rng.random() < 0.4
    with_sha = rng.random() < 0.3
    spec: dict[str, Any] = {"filename": "f.gguf"}
    if exact:
        spec["size_bytes"] = size_a
    if with_sha:
        spec["sha256"] = sha256_hex(versions[0])
    model_id = f"fuzz{seed}"
    entry = world.add_model(model_id, {"f.gguf": b""}, on_hub=False, on_proxy=False)
    source = {"type": "url", "url": f"{server.url}/f.gguf"}
    if hub:
        source = {"type": "huggingface", "repo": "liar/f-GGUF"}
        world.monkeypatch.setenv("HF_ENDPOINT", server.url)
    entry.update(files=[spec], sources=[source])
    world.write_catalog()
    settings = world.settings(
        max_retries=3, retry_backoff=0.001, stall_timeout=2.0, max_stalls=2, connect_timeout=2.0
    )

    def context() -> str:  # read when an assertion fails: the server's log as it is by then
        return f"seed {seed}, entry {spec}, etags {liar.etags}, hub {hub}, served: {liar.log}"

    start = time.monotonic()
    try:
        with ModelResolver(settings) as resolver:
            try:
                installed = resolver.resolve(model_id).path.read_bytes()
            except LlmlbError:
                installed = None
                assert resolver.installed(model_id) is None, context()
    finally:
        server.close()
    elapsed = time.monotonic() - start
    assert elapsed < ROUND_BOUND_S, f"{elapsed:.1f}s: {context()}"
    OUTCOMES.append("installed" if installed is not None else "failed")
    if installed is not None:
        good = versions[:2]
        assert installed in good, f"{len(installed)} bytes of no good version, {context()}"
        if hub:  # one commit, recorded: the one whose bytes were installed
            record = world.resolver().store.read_record(model_id)
            revision = record.revision if record is not None else None
            assert revision == COMMITS[good.index(installed)], context()
        if with_sha:
            assert installed == versions[0], context()
        if exact:
            assert len(installed) == size_a, context()


def _bad_layout(rng: random.Random, size: int) -> bytes:
    """A GGUF of exactly `size` bytes whose tensors ggml's loader refuses: misaligned,
    overlapping, at a gap, or of a ggml type it does not know."""
    second = rng.choice([(24, 40), (24, 0), (24, 4096), (77, 32)])  # (ggml type, offset)
    tensors = [("a", 64, 24, 0), ("b", 64, *second)]
    head = len(build_gguf({}, tensors, data=0))
    return build_gguf({}, tensors, data=size - head)


@pytest.mark.timeout(1800)
def test_a_lying_server_never_gets_a_wrong_file_installed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLMLB_URL")  # the liar is the only source
    for i in range(ROUNDS):
        _round(world, SEED * 100_000 + i)
    # The liar is beatable often enough for the installs to prove something, not always.
    assert 0 < OUTCOMES.count("installed") < len(OUTCOMES), OUTCOMES
