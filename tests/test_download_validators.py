"""Validators and resume rules (llmlb_node/download/validators.py): the one decision as a table,
then the lying loopback servers each rule exists for: a weak ETag over changing bytes, a strong
ETag that lies, and a server answering 416 to every resume."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from gguf import make_gguf
from servers import RecordedRequest, Reply, ScriptedServer, honest_reply, requested_range
from world import World

from llmlb_node import ModelDownloadError
from llmlb_node.download.validators import OVERLAP, Held, Offer, Validator, decide

MIB = 1024 * 1024
S = Validator("v1", strong=True)
S2 = Validator("v2", strong=True)
W = Validator("v1", strong=False)
SRC = "url:example"


def _row(
    held: Held,
    offer: Offer,
    action: str,
    offset: int | None = None,
    range_: str | None = "unchecked",
    split: bool | None = None,
) -> Any:
    """One row of the table: what is held, what is offered, and the plan's fields that matter."""
    return pytest.param(held, offer, action, offset, range_, split)


@pytest.mark.parametrize(
    ("held", "offer", "action", "offset", "range_", "split"),
    [
        # nothing held: from byte 0; split only under a strong validator or a sha256
        _row(Held(), Offer(SRC, S, status=206), "fetch", 0, "bytes=0-", True),
        _row(Held(), Offer(SRC, W, status=206), "fetch", 0, "bytes=0-", False),
        _row(Held(), Offer(SRC, None, status=206), "fetch", 0, "bytes=0-", False),
        _row(Held(), Offer(SRC, W, sha256=True, status=206), "fetch", 0, "bytes=0-", True),
        _row(Held(end=100), Offer(SRC), "fetch", 0, "bytes=0-99", False),
        _row(Held(validator=S), Offer(SRC), "fetch", 0, "bytes=0-", True),  # to be confirmed
        _row(Held(), Offer(SRC, one_stream=True), "fetch", 0, None, False),  # no Range at all
        # a parallel range starts inside its neighbour, and needs a strong answer
        _row(
            Held(4 * MIB, 8 * MIB, 4 * MIB, parts=2, validator=S),
            Offer(SRC),
            "fetch",
            4 * MIB - OVERLAP,
            f"bytes={4 * MIB - OVERLAP}-{8 * MIB - 1}",
            True,
        ),
        _row(
            Held(4 * MIB, None, 4 * MIB, parts=2, validator=S), Offer(SRC, W, status=206), "restart"
        ),
        _row(Held(4 * MIB, None, 4 * MIB, parts=2, validator=S), Offer(SRC, status=206), "restart"),
        # a resume repeats up to OVERLAP held bytes, unless a sha256 proves the file
        _row(Held(done=1000), Offer(SRC), "resume", 0, "bytes=0-", False),
        _row(
            Held(done=MIB, validator=W),
            Offer(SRC),
            "resume",
            MIB - OVERLAP,
            f"bytes={MIB - OVERLAP}-",
        ),
        _row(Held(done=MIB), Offer(SRC, sha256=True), "resume", MIB, f"bytes={MIB}-", True),
        _row(Held(done=MIB, validator=S), Offer(SRC, W, status=206), "resume", MIB - OVERLAP),
        # a split file resumes only under a strong validator (or a sha256)
        _row(Held(done=MIB, parts=4, validator=S), Offer(SRC), "resume", MIB - OVERLAP),
        _row(Held(done=MIB, parts=4, validator=W), Offer(SRC), "restart"),
        _row(Held(done=MIB, parts=4), Offer(SRC), "restart"),
        _row(Held(done=MIB, parts=4, validator=W), Offer(SRC, sha256=True), "resume", MIB),
        # another version: validators or sizes that differ
        _row(Held(done=MIB, validator=S), Offer(SRC, S2), "restart"),
        _row(
            Held(done=MIB, validator=W), Offer(SRC, Validator("v2", False), status=206), "restart"
        ),
        _row(Held(done=MIB, size=10 * MIB), Offer(SRC, size=11 * MIB), "restart"),
        # another source's bytes: only under an equal strong validator, or a sha256
        _row(Held(done=MIB, source="other"), Offer(SRC), "restart"),
        _row(Held(done=MIB, validator=W, source="other"), Offer(SRC, W), "restart"),
        _row(Held(done=MIB, validator=S, source="other"), Offer(SRC, S), "resume", MIB - OVERLAP),
        _row(Held(done=MIB, source="other"), Offer(SRC, sha256=True), "resume", MIB),
        # 416: the end when all is held; to a resume, start from zero in one stream
        _row(Held(done=100, size=100), Offer(SRC, status=416), "finished"),
        _row(Held(done=40), Offer(SRC, status=416), "restart"),
        _row(Held(4 * MIB, None, 4 * MIB, parts=2), Offer(SRC, status=416), "restart"),
        _row(Held(), Offer(SRC, status=416), "fetch"),  # from byte 0: the status is the failure
    ],
)
def test_the_resume_decision(
    held: Held,
    offer: Offer,
    action: str,
    offset: int | None,
    range_: str | None,
    split: bool | None,
) -> None:
    plan = decide(held, offer)

    assert plan.action == action, plan.why
    if offset is not None:
        assert plan.offset == offset
        assert plan.overlap == (held.done - offset if action == "resume" else 0)
        assert plan.lead == (held.start - offset if action == "fetch" else 0)
    if range_ != "unchecked":
        assert plan.range == range_
    if split is not None:
        assert plan.split is split


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ('"abc"', Validator("abc", True)),
        ('W/"abc"', Validator("abc", False)),
        ("w/abc", Validator("abc", False)),  # as recorded in a sidecar
        ("ABC", Validator("abc", True)),
        ("", None),
        (None, None),
        ('W/""', None),
    ],
)
def test_validators_parse_from_headers_and_sidecars(raw: str | None, parsed: Any) -> None:
    assert Validator.parse(raw) == parsed
    if parsed is not None:
        assert Validator.parse(str(parsed)) == parsed


# -- real servers --------------------------------------------------------------------------------


def _as_url(world: World, server: ScriptedServer, model_id: str, **extra: Any) -> str:
    """`model_id` (one file, `model_id`.gguf) served only by `server`, no sha256 in the catalog."""
    world.monkeypatch.delenv("LLMLB_URL", raising=False)
    filename = f"{model_id}.gguf"
    entry = world.add_model(model_id, {filename: b""}, on_hub=False, on_proxy=False)
    entry.update(sources=[{"type": "url", "url": f"{server.url}/{filename}"}], **extra)
    world.write_catalog()
    return filename


def _gets(server: ScriptedServer) -> list[RecordedRequest]:
    return [r for r in server.requests if r.method == "GET"]


def _two_versions(seed: int) -> tuple[bytes, bytes]:
    """Two versions of an 8 MiB GGUF of the same size: what a file replaced on a server is."""
    return make_gguf(8 * MIB, seed=seed), make_gguf(8 * MIB, seed=seed + 1)


def _slow(reply: Reply) -> Reply:
    reply.rate = 4 * MIB  # slow enough that the first connection asks for 4 ranges after 0.25 s
    return reply


def test_a_weak_etag_over_changing_bytes_is_fetched_in_one_stream(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    old, new = _two_versions(60)
    served: list[bytes] = []

    def answer(rec: RecordedRequest) -> Reply:
        content = old if not served else new  # replaced after the first request, same W/ ETag
        served.append(content)
        return _slow(honest_reply(content, rec, 'W/"v1"'))

    server = serve(answer)
    _as_url(world, server, "weak")

    resolved = world.resolver(parallel_threshold=MIB).resolve("weak")

    assert resolved.path.read_bytes() == old  # never spliced from both versions
    assert len(_gets(server)) == 1  # never split: a weak ETag does not say the bytes are equal


def test_a_weak_etag_resume_is_checked_over_an_overlap(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    old, new = make_gguf(300_000, seed=61), make_gguf(300_000, seed=62)
    gets: list[str] = []

    def answer(rec: RecordedRequest) -> Reply:
        gets.append(rec.headers.get("range", ""))
        content = old if len(gets) == 1 else new
        reply = honest_reply(content, rec, 'W/"v1"')
        if len(gets) == 1:
            reply.cut = 120_000  # dropped, Content-Length kept: the client resumes
        return reply

    server = serve(answer)
    _as_url(world, server, "weakresume")

    resolved = world.resolver().resolve("weakresume")

    assert resolved.path.read_bytes() == new
    assert gets[1] == f"bytes={120_000 - OVERLAP}-299999"  # the overlap that caught the change
    assert gets[2] in ("", "bytes=0-", "bytes=0-299999")  # then the new version from zero


def test_a_strong_etag_that_lies_is_caught_where_parallel_ranges_meet(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    old, new = _two_versions(63)

    def answer(rec: RecordedRequest) -> Reply:
        wanted = requested_range(rec, len(old))
        content = old if wanted is None or wanted[0] == 0 else new  # ranges from the new one
        return _slow(honest_reply(content, rec, '"v1"'))  # the same strong ETag for both

    server = serve(answer)
    _as_url(world, server, "liar")

    with pytest.raises(ModelDownloadError) as info:
        world.resolver(parallel_threshold=MIB).resolve("liar")

    failure = info.value.failures[0]
    assert failure.kind == "integrity", failure
    assert "two versions" in failure.message and "liar.gguf" in failure.message
    assert world.resolver().installed("liar") is None
    _assert_ranges_overlap(server, len(old))


def test_honest_parallel_ranges_overlap_their_neighbours_and_install(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = make_gguf(8 * MIB, seed=64)
    server = serve(lambda rec: _slow(honest_reply(content, rec, '"v1"')))
    _as_url(world, server, "honest")

    resolved = world.resolver(parallel_threshold=MIB).resolve("honest")

    assert resolved.path.read_bytes() == content
    _assert_ranges_overlap(server, len(content))
    assert server.bytes_sent <= len(content) * 1.05


def _assert_ranges_overlap(server: ScriptedServer, size: int) -> None:
    """One first stream, then 3 parallel ranges, each asked from 64 KiB before its neighbour's
    end: the bytes both connections receive, which must agree."""
    asked = sorted(requested_range(r, size) or (0, size) for r in _gets(server))
    assert len(asked) == 4, asked
    for (_, end), (start, _) in zip(asked[1:], asked[2:], strict=False):
        assert start == end - OVERLAP, asked


def _refuses_every_resume(content: bytes, cut_first: int | None) -> Callable[..., Reply]:
    """A server whose first answer drops at `cut_first` (if given) and which then answers 416 to
    every Range not from byte 0, while a fresh GET works (a CDN that lost its range index)."""
    seen: list[RecordedRequest] = []

    def answer(rec: RecordedRequest) -> Reply:
        seen.append(rec)
        wanted = requested_range(rec, len(content))
        honest_first = cut_first is not None and len(seen) == 1
        if not honest_first and wanted is not None and wanted[0] > 0:
            return Reply(416, {"Content-Range": f"bytes */{len(content)}", "Content-Length": "0"})
        reply = honest_reply(content, rec, '"v1"')
        if cut_first is not None and len(seen) == 1:
            reply.cut = cut_first
        return reply

    return answer


def test_a_416_to_a_resume_discards_the_partial_and_fetches_from_zero_once(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = make_gguf(500_000, seed=65)
    server = serve(_refuses_every_resume(content, cut_first=200_000))  # dropped at 40%
    _as_url(world, server, "r416")

    resolved = world.resolver().resolve("r416")

    assert resolved.path.read_bytes() == content
    gets = _gets(server)
    assert len(gets) == 3  # the drop, the resume refused, one fetch from zero
    assert "range" not in gets[2].headers  # a plain GET: this server refuses Range from now on


def test_a_partial_left_by_an_earlier_pull_is_replaced_after_a_416(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = make_gguf(500_000, seed=66)
    dead: list[int] = []

    def first_pull(rec: RecordedRequest) -> Reply:
        dead.append(1)
        if len(dead) == 1:
            reply = honest_reply(content, rec, '"v1"')
            reply.cut = 200_000
            return reply
        return Reply(404, {"Content-Length": "0"})  # gone for the rest of that pull

    server = serve(first_pull)
    _as_url(world, server, "later")
    with pytest.raises(ModelDownloadError):
        world.resolver().resolve("later")
    partials = list((world.models_dir / "later").glob(".later.gguf.*.partial"))
    assert partials, "the first pull left its partial file to resume"
    server.respond = _refuses_every_resume(content, cut_first=None)
    before = len(_gets(server))

    resolved = world.resolver().resolve("later")

    assert resolved.path.read_bytes() == content
    ranges = [r.headers.get("range") for r in _gets(server)[before:]]
    assert ranges[0] == f"bytes={200_000 - OVERLAP}-499999" and ranges[1:] == [None], ranges


def test_a_server_refusing_every_resume_and_dropping_every_body_fails_bounded(
    world: World, serve: Callable[..., ScriptedServer]
) -> None:
    content = make_gguf(500_000, seed=67)

    def answer(rec: RecordedRequest) -> Reply:
        wanted = requested_range(rec, len(content))
        if wanted is not None and wanted[0] > 0:
            return Reply(416, {"Content-Range": f"bytes */{len(content)}", "Content-Length": "0"})
        reply = honest_reply(content, rec, '"v1"')
        reply.cut = 200_000
        return reply

    server = serve(answer)
    _as_url(world, server, "never")

    with pytest.raises(ModelDownloadError) as info:
        world.resolver().resolve("never")

    failure = info.value.failures[0]
    assert failure.kind == "http" and "416" in failure.message, failure
    assert len(_gets(server)) == 4  # drop, 416, from zero (drop), 416: from zero only once
