"""Model status (llmlb_node/status.py): the one stage -> status table, and what a status file
left by another process says."""

from __future__ import annotations

import os
import socket
import time

import pytest

from llmlb_node.progress import STAGES, ProgressEvent
from llmlb_node.status import STATUS_OF_STAGE, from_event, from_status_file


def test_every_stage_has_one_status() -> None:
    assert set(STATUS_OF_STAGE) == set(STAGES)
    assert set(STATUS_OF_STAGE.values()) <= {
        "waiting",
        "downloading",
        "completed",
        "error",
        "interrupted",
    }


@pytest.mark.parametrize("stage", STAGES)
def test_a_live_event_shows_its_stages_status(stage: str) -> None:
    event = ProgressEvent("m", "m.gguf", "src", stage, downloaded=5, total=10, message="why")

    shown = from_event(event, pid=7)

    assert shown.status == STATUS_OF_STAGE[stage] and shown.pid == 7
    assert shown.error_message == ("why" if shown.status == "error" else None)
    assert shown.local_path == ("why" if shown.status == "completed" else None)


def _file(stage: str, pid: int, age: float) -> dict:
    return {
        "model_id": "m",
        "stage": stage,
        "downloaded": 5,
        "total": 10,
        "pid": pid,
        "host": socket.gethostname(),
        "updated_at": time.time() - age,
    }


def test_a_status_file_of_a_dead_or_silent_writer_says_interrupted() -> None:
    alive, dead = os.getpid(), 2**22 + 12345
    assert from_status_file(_file("downloading", alive, 0), 60).status == "downloading"
    assert from_status_file(_file("downloading", dead, 0), 60).status == "interrupted"
    assert from_status_file(_file("downloading", alive, 120), 60).status == "interrupted"
    assert from_status_file(_file("installed", alive, 0), 60) is None  # the store says
