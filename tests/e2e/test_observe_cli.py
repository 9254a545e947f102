"""`logs`, `events` and `wait` through the installed CLI, as a user runs them.

No VM: the workspace is a record as ``create`` writes it, its console capture is written
with the real ConsoleCapture, and a running supervisor is a child process holding the
supervisor lock (tests/unit/test_watch.py). tests/vm/test_observe.py does the same on
real boots.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.events import append_event
from microagent.layout import StateLayout
from microagent.vm.console import ConsoleCapture
from tests.support.fixtures import MICROAGENT, microagent
from tests.support.workspaces import LockHolder, make_workspace

CONSOLE = (b"[    0.000000] Linux version 6.1.0\r\n"
           b"microagent-init: ready\r\n"
           b"progress 10%\rprogress 100%\r\n"
           b"\xff\xfe not utf-8\r\n")


@pytest.fixture
def workspace(layout: StateLayout) -> str:
    """A halted workspace with a console capture and a short history."""
    make_workspace(layout, "w")
    ConsoleCapture(layout.workspace_serial_log("w")).write(CONSOLE)
    events = layout.workspace_events("w")
    append_event(events, "starting", "boot (tcg)")
    append_event(events, "running", "ready in 1.2s")
    append_event(events, "halting", "")
    append_event(events, "halted", "the guest powered off")
    return "w"


@pytest.fixture
def running(layout: StateLayout) -> Iterator[LockHolder]:
    """A running workspace ``r``: its supervisor is a child holding the lock."""
    make_workspace(layout, "r")
    ConsoleCapture(layout.workspace_serial_log("r")).write(b"booted\r\n")
    append_event(layout.workspace_events("r"), "running", "ready")
    holder = LockHolder(layout.run_files("r").lock)
    yield holder
    holder.release()


def raw(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([MICROAGENT, *args], capture_output=True, timeout=60,
                          env=os.environ)


def test_logs_prints_the_console_with_lf_line_ends(workspace: str) -> None:
    result = raw("logs", workspace)
    assert result.returncode == 0, result.stderr
    assert result.stdout == CONSOLE.replace(b"\r\n", b"\n")  # the lone CR and raw bytes stay
    assert raw("logs", workspace, "--tail", "2").stdout == \
        b"progress 10%\rprogress 100%\n\xff\xfe not utf-8\n"
    assert raw("logs", "--name", workspace, "-n", "0").stdout == b""
    doc = json.loads(microagent("--json", "logs", workspace).stdout)
    assert doc == {"name": "w", "log": CONSOLE.replace(b"\r\n", b"\n").decode(errors="replace")}


def test_logs_of_a_workspace_never_started(layout: StateLayout) -> None:
    make_workspace(layout, "fresh")
    result = microagent("logs", "fresh")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_events_lines_and_json(workspace: str) -> None:
    result = microagent("events", workspace)
    assert result.returncode == 0, result.stderr
    rows = [line.split(None, 2) for line in result.stdout.splitlines()]
    assert [row[1] for row in rows] == ["prepared", "starting", "running", "halting",
                                        "halted"]
    assert rows[-1][2] == "the guest powered off" and len(rows[3]) == 2
    assert all(row[0].endswith("+00:00") for row in rows)
    doc = json.loads(microagent("--json", "events", workspace).stdout)
    assert doc["name"] == "w"
    assert [e["state"] for e in doc["events"]] == [row[1] for row in rows]
    assert set(doc["events"][0]) == {"time", "state", "detail"}
    # a settled workspace: -f prints the history and ends
    followed = microagent("events", "-f", workspace, timeout=20)
    assert followed.returncode == 0 and followed.stdout == result.stdout


def test_follow_ends_when_the_workspace_stops(layout: StateLayout,
                                              running: LockHolder) -> None:
    logs = subprocess.Popen([MICROAGENT, "logs", "-f", "r"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    events = subprocess.Popen([MICROAGENT, "--json", "events", "-f", "r"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1)
        assert logs.poll() is None and events.poll() is None  # still following
        capture_path = layout.workspace_serial_log("r")
        with capture_path.open("ab") as f:
            f.write(b"later\r\n")
        append_event(layout.workspace_events("r"), "halted", "halted")
        time.sleep(0.5)
        assert logs.poll() is None  # the supervisor still runs
        running.release()
        out, err = logs.communicate(timeout=20)
        assert (logs.returncode, out, err) == (0, b"booted\nlater\n", b"")
        out, err = events.communicate(timeout=20)
        assert events.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]  # JSON Lines
        assert [e["state"] for e in lines] == ["prepared", "running", "halted"]
    finally:
        for process in (logs, events):
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.parametrize("argv", [["logs", "-f", "r"], ["events", "-f", "r"],
                                  ["wait", "r"]])
def test_ctrl_c_ends_quietly_with_130(argv: list[str], running: LockHolder) -> None:
    process = subprocess.Popen([MICROAGENT, *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        time.sleep(1)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
        assert (process.returncode, err) == (130, b"")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_wait_returns_the_state(workspace: str) -> None:
    result = microagent("wait", workspace, timeout=20)
    assert (result.returncode, result.stdout) == (0, "halted\n")
    doc = json.loads(microagent("--json", "wait", workspace, "--state", "stopped",
                                "--state", "halted", timeout=20).stdout)
    assert doc == {"name": "w", "state": "halted", "detail": "the guest powered off"}


def test_wait_times_out_with_75(running: LockHolder) -> None:
    started = time.monotonic()
    result = microagent("wait", "r", "--state", "halted", "--timeout", "0.5", timeout=20)
    assert result.returncode == 75
    assert "workspace r is running" in result.stderr and "not halted" in result.stderr
    assert time.monotonic() - started < 5
    doc = json.loads(microagent("--json", "wait", "r", "--timeout", "0", timeout=20).stdout)
    assert doc["error"]["kind"] == "timed-out"


def test_wait_reports_a_deletion(layout: StateLayout) -> None:
    make_workspace(layout, "d")
    process = subprocess.Popen([MICROAGENT, "wait", "d", "--state", "running"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert microagent("delete", "d", "--yes").returncode == 0
        _, err = process.communicate(timeout=20)
        assert process.returncode == 1
        assert "workspace d was deleted while waiting for it to be running" in err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_usage_errors(workspace: str) -> None:
    bad_state = microagent("wait", workspace, "--state", "done")
    assert bad_state.returncode == 2
    assert "'done'" in bad_state.stderr
    assert "prepared, starting, running, halting, halted, stopped, failed, quarantined" \
        in bad_state.stderr
    for argv in (["logs", workspace, "--tail", "x"], ["logs", workspace, "--tail", "-1"],
                 ["--json", "logs", "-f", workspace], ["wait", workspace, "--timeout", "-1"],
                 ["logs"], ["events", workspace, "--name", workspace]):
        result = microagent(*argv)
        assert result.returncode == 2, (argv, result.stdout, result.stderr)


@pytest.mark.parametrize("verb", ["logs", "events", "wait"])
def test_unknown_and_bad_names(verb: str, state_dir: Path) -> None:
    unknown = microagent(verb, "nosuch", timeout=20)
    assert unknown.returncode == 1
    assert "no workspace named nosuch" in unknown.stderr
    doc = json.loads(microagent("--json", verb, "nosuch", timeout=20).stdout)
    assert doc["error"]["kind"] == "not-found"
    for name in ("../x", "a/b", "x" * 64, "*"):
        bad = microagent(verb, name, timeout=20)
        assert bad.returncode == 2, (name, bad.stderr)
        assert "invalid workspace name" in bad.stderr
    assert not state_dir.exists() or not (state_dir / "workspaces").exists()
