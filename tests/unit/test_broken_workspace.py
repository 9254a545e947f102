"""One unreadable ``workspace.json`` must not hide the other workspaces: it is listed as
``broken`` with its error, ``status`` says why, and ``delete`` still removes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from microagent.layout import StateLayout
from tests.support.workspaces import make_workspace

MICROAGENT = str(Path(sys.executable).parent / "microagent")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MICROAGENT, *args], capture_output=True, text=True, timeout=60,
                          env=os.environ.copy())


@pytest.fixture
def one_broken(layout: StateLayout) -> str:
    """Workspaces ``alpha`` and ``gamma`` intact, ``beta``'s record cut in half."""
    for name in ("alpha", "beta", "gamma"):
        make_workspace(layout, name)
    record = layout.workspace_record("beta")
    data = record.read_bytes()
    record.write_bytes(data[: len(data) // 2])
    return "beta"


def test_list_shows_the_broken_one_and_the_rest(one_broken: str) -> None:
    result = run("list")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["NAME", "STATE", "BACKEND", "PROFILE", "NETWORK", "RESTART"]
    assert rows[1][:3] == ["alpha", "prepared", "qemu"]
    assert rows[2] == ["beta", "broken", "-", "-", "-", "-"]
    assert rows[3][:3] == ["gamma", "prepared", "qemu"]
    listed = json.loads(run("--json", "list").stdout)["workspaces"]
    assert [w["name"] for w in listed] == ["alpha", "beta", "gamma"]
    broken = listed[1]
    assert broken["state"] == "broken"
    assert "cannot read record" in broken["error"] and "workspace.json" in broken["error"]
    assert "error" not in listed[0]


def test_status_says_why(one_broken: str, layout: StateLayout) -> None:
    text = run("status", one_broken)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[:2] == ["Workspace: beta", "State: broken"]
    assert lines[2].startswith("Error: cannot read record")
    assert "microagent delete beta" in lines[3]
    doc = json.loads(run("--json", "status", one_broken).stdout)
    assert (doc["name"], doc["state"]) == ("beta", "broken")
    assert "cannot read record" in doc["error"]
    assert doc["last_events"][-1]["state"] == "prepared"


def test_verbs_that_need_the_record_say_it_is_broken(one_broken: str) -> None:
    result = run("--json", "start", one_broken)
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "broken"
    assert error["message"].startswith("workspace beta is broken: cannot read record")
    halted = run("halt", one_broken)  # needs no record: says it is not running
    assert halted.returncode == 1 and "is not running" in halted.stderr


def test_a_record_missing_a_field_is_broken_too(layout: StateLayout) -> None:
    make_workspace(layout, "w")
    record = layout.workspace_record("w")
    document = json.loads(record.read_text())
    del document["resources"]
    record.write_text(json.dumps(document))
    listed = json.loads(run("--json", "list").stdout)["workspaces"]
    assert listed[0]["state"] == "broken"
    assert "has no field 'resources'" in listed[0]["error"]


def test_delete_of_a_broken_workspace_works(one_broken: str, layout: StateLayout) -> None:
    result = run("delete", one_broken, "--yes")
    assert result.returncode == 0, result.stderr
    assert not layout.workspace_dir(one_broken).exists()
    names = [w["name"] for w in json.loads(run("--json", "list").stdout)["workspaces"]]
    assert names == ["alpha", "gamma"]
    assert sorted(p.name for p in layout.workspaces_dir.iterdir()) == ["alpha", "gamma"]


def test_logs_events_and_wait_read_a_broken_workspace(one_broken: str) -> None:
    from microagent import Microagent

    logs = run("logs", one_broken)
    assert logs.returncode == 0, logs.stderr
    events = run("--json", "events", one_broken)
    assert events.returncode == 0, events.stderr
    assert json.loads(events.stdout)["events"][-1]["state"] == "prepared"
    ws = Microagent().handle(one_broken)
    assert ws.logs() == "" and ws.events()[-1].state == "prepared"
