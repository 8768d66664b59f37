"""The README's node tables list exactly what the code does: error codes, routes, variables."""

from __future__ import annotations

import re
from pathlib import Path

from llmlb_node.errors import InsufficientDiskSpaceError
from llmlb_node.server.app import error_payload, routes
from llmlb_node.server.errors import ERRORS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _table_after(header: str) -> list[list[str]]:
    lines = README[README.index(header) :].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_error_table_lists_every_status_and_code_the_node_returns() -> None:
    documented = set()
    for status, code, _ in _table_after("| status | `code` | when |"):
        name = re.match(r"`(\w+)`", code)
        code = name.group(1) if name else None
        documented.add((int(status), None if code == "null" else code))
    returned = {(status, code) for status, _, code in ERRORS.values()}
    returned.add((404, "not_found"))  # a path no route serves (Starlette's 404)
    assert documented == returned


def test_a_full_disk_is_507_insufficient_storage() -> None:
    status, body, _ = error_payload(InsufficientDiskSpaceError("/models/x", 10, 1))
    assert (status, body["error"]["code"]) == (507, "insufficient_storage")


def test_route_table_lists_every_route() -> None:
    documented = set()
    for row in _table_after("| route | what it does |"):
        for methods, path in re.findall(r"`((?:[A-Z]+/?)+) (/[^`\[]*)", row[0]):
            for method in methods.split("/"):
                documented.add((method, path.replace("{id}", "{model_id}")))
    served = {
        (m, r.path.replace(":path", "")) for r in routes for m in r.methods or () if m != "HEAD"
    }
    served |= {("HEAD", "/v0/models/blob/{model_id}")}
    assert documented == served


def test_environment_table_lists_exactly_the_variables_the_code_reads() -> None:
    package = Path(__file__).resolve().parents[2] / "llmlb_node"
    read = set()
    for source in package.rglob("*.py"):
        read |= set(re.findall(r"\b((?:LLMLB|HF)_[A-Z_]*[A-Z])\b", source.read_text()))
    read.discard("LLMLB_NODE")  # a prefix in a docstring
    documented = {
        re.match(r"`(\w+)`", row[0]).group(1)  # type: ignore[union-attr]
        for row in _table_after("| variable | default | meaning |")
    }
    assert documented == read
