"""``serve mcp``'s tools on real VMs (busybox, profile tiny), through the official SDK's
in-process client: a workspace created, used and deleted by a model's calls only;
output of a million lines bounded with its tail kept (also read back through a background
process); a long command that yields and finishes through ``process_output``; stdin in
pieces (``process_input``), ``process_kill``, a deadline kept in the background,
``list_processes``; files read, written and edited (an ambiguous edit refused); errors
the model can read; snapshot, fork, pause, resume, halt and delete; a restore from a
snapshot and a suspend, a background process counting on through both."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent import Microagent
from microagent.mcpserver.server import WorkspaceServer, build_server
from tests.support.fixtures import PushedImage
from tests.support.mcpclient import call, error, ok, text

pytestmark = pytest.mark.slow

NAME = "mcp-dev"
FORK = "mcp-fork"


@pytest.fixture(scope="module")
def server(home: Path) -> WorkspaceServer:
    return build_server(Microagent(home))


@pytest.fixture(scope="module")
def workspace(server: WorkspaceServer, busybox_image: PushedImage, home: Path
              ) -> Iterator[str]:
    """The workspace ``mcp-dev``, created and started through ``create_workspace``."""
    created = ok(call(server, "create_workspace", {
        "name": NAME, "image": busybox_image.ref, "profile": "tiny"}))
    assert created["state"] == "running" and created["ready"] is True
    yield NAME
    for name in (FORK, NAME):  # never leave a VM behind
        call(server, "delete_workspace", {"name": name, "force": True})


def test_exec_results_and_errors(server: WorkspaceServer, workspace: str) -> None:
    listed = ok(call(server, "list_workspaces"))["workspaces"]
    assert {"name": workspace, "state": "running"}.items() <= listed[0].items()
    status = ok(call(server, "workspace_status", {"name": workspace}))
    assert status["state"] == "running" and status["ready"] is True

    r = call(server, "exec", {"name": workspace,
                              "command": "echo hi; echo oops >&2; exit 3"})
    done = ok(r)  # a non-zero exit is a result, not a tool error
    assert (done["status"], done["exit_code"], done["stdout"], done["stderr"]) == \
        ("exited", 3, "hi\n", "oops\n")
    assert done["truncated"] is False
    assert text(r).startswith("[exit 3]\nhi\n") and "[stderr]\noops" in text(r)

    done = ok(call(server, "exec", {"name": workspace, "command": ["cat"], "stdin": "abc"}))
    assert done["stdout"] == "abc" and done["exit_code"] == 0
    done = ok(call(server, "exec", {"name": workspace, "command": "echo $FOO; pwd",
                                    "env": {"FOO": "bar"}, "cwd": "/tmp"}))
    assert done["stdout"] == "bar\n/tmp\n"
    done = ok(call(server, "exec", {"name": workspace, "command": "sleep 30",
                                    "timeout_s": 1}))
    assert done["status"] == "timed_out" and done["exit_code"] is None
    done = ok(call(server, "exec", {"name": workspace, "command": "kill -9 $$"}))
    assert done["status"] == "signaled" and done["signal"] == 9
    done = ok(call(server, "exec", {"name": workspace, "command": ["no-such-program"]}))
    assert done["exit_code"] == 127 and done["stderr"]

    message = error(call(server, "exec", {"name": "ghost", "command": "true"}), "not-found")
    assert "ghost" in message and "hint: " in message
    error(call(server, "exec", {"name": workspace, "command": ""}), "usage")
    error(call(server, "exec", {"name": workspace, "command": 5}), "usage")


def test_output_of_a_million_lines_is_bounded_with_its_tail(server: WorkspaceServer,
                                                            workspace: str) -> None:
    r = call(server, "exec", {"name": workspace, "command": "seq 1 1000000"})
    done = ok(r)
    total = sum(len(b"%d\n" % i) for i in range(1, 1_000_001))
    assert done["exit_code"] == 0 and done["truncated"] is True
    assert done["stdout_bytes"] == total
    shown = done["stdout"]
    assert shown.startswith("1\n2\n3\n") and shown.endswith("999999\n1000000\n")
    left = re.search(r"\[\.\.\. (\d+) bytes left out of (\d+);", shown)
    assert left is not None and int(left[2]) == total
    assert len(shown.encode()) < 16 * 1024 + 300
    assert len(text(r).encode()) < 16 * 1024 + 300
    smaller = ok(call(server, "exec", {"name": workspace, "command": "seq 1 100000",
                                       "max_output_bytes": 1000}))
    assert smaller["stdout"].endswith("100000\n") and len(smaller["stdout"]) < 1300


def test_a_long_command_yields_then_finishes_through_process_output(
        server: WorkspaceServer, workspace: str) -> None:
    began = time.monotonic()
    r = call(server, "exec", {"name": workspace, "command": "sleep 3; echo done",
                              "yield_s": 1})
    took = time.monotonic() - began
    running = ok(r)
    assert (running["status"], running["exit_code"], running["stdout"]) == \
        ("running", None, "")
    assert took < 1 + 1.5, f"exec answered after {took:.1f}s with yield_s 1"
    pid = running["process_id"]
    assert f"running as process {pid}" in text(r)
    done = ok(call(server, "process_output", {
        "name": workspace, "process_id": pid, "since": running["next_since"],
        "since_stderr": running["next_since_stderr"], "wait_s": 30}))
    assert (done["status"], done["exit_code"], done["stdout"], done["stderr"]) == \
        ("exited", 0, "done\n", "")
    assert done["next_since"] == 5 and done["duration_ms"] >= 3000
    again = ok(call(server, "process_output", {"name": workspace, "process_id": pid,
                                               "since": 5}))
    assert (again["stdout"], again["stdout_bytes"], again["next_since"]) == ("", 0, 5)

    rows = ok(call(server, "list_processes", {"name": workspace}))["processes"]
    (row,) = [r for r in rows if r["process_id"] == pid]
    assert (row["status"], row["exit_code"], row["stdout_bytes"]) == ("exited", 0, 5)
    assert "sleep 3; echo done" in row["command"]
    error(call(server, "process_output", {"name": workspace, "process_id": 9999}),
          "not-found")


def test_process_input_in_pieces_then_closed(server: WorkspaceServer, workspace: str
                                             ) -> None:
    running = ok(call(server, "exec", {"name": workspace, "command": ["cat"],
                                       "stdin_open": True, "yield_s": 0.5}))
    assert running["status"] == "running"
    pid = running["process_id"]
    for piece in ("one\n", "two\n"):
        assert ok(call(server, "process_input", {"name": workspace, "process_id": pid,
                                                 "data": piece}))["written"] == 4
    last = ok(call(server, "process_input", {"name": workspace, "process_id": pid,
                                             "data": "thré", "close_stdin": True}))
    assert last == {"process_id": pid, "written": 5, "stdin_open": False}
    done = ok(call(server, "process_output", {"name": workspace, "process_id": pid,
                                              "wait_s": 30}))
    assert (done["status"], done["exit_code"], done["stdout"]) == \
        ("exited", 0, "one\ntwo\nthré")
    error(call(server, "process_input", {"name": workspace, "process_id": pid,
                                         "data": "more"}), "conflict")


def test_process_kill_and_a_deadline_in_the_background(server: WorkspaceServer,
                                                       workspace: str) -> None:
    pid = ok(call(server, "exec", {"name": workspace, "command": "sleep 600",
                                   "yield_s": 0.5}))["process_id"]
    killed = ok(call(server, "process_kill", {"name": workspace, "process_id": pid}))
    assert killed == {"process_id": pid, "status": "signaled", "exit_code": None,
                      "signal": 15}
    error(call(server, "process_kill", {"name": workspace, "process_id": pid}), "conflict")
    error(call(server, "process_kill", {"name": workspace, "process_id": pid,
                                        "signal": "NOPE"}), "usage")
    # timeout_s past yield_s: the server kills it at its deadline
    running = ok(call(server, "exec", {"name": workspace, "command": "sleep 600",
                                       "yield_s": 0.5, "timeout_s": 2}))
    assert running["status"] == "running"
    done = ok(call(server, "process_output", {"name": workspace,
                                              "process_id": running["process_id"],
                                              "wait_s": 30}))
    assert (done["status"], done["exit_code"]) == ("timed_out", None)


def test_a_million_lines_through_a_background_process(server: WorkspaceServer,
                                                      workspace: str) -> None:
    running = ok(call(server, "exec", {"name": workspace,
                                       "command": "sleep 1; seq 1 1000000",
                                       "yield_s": 0.5}))
    assert running["status"] == "running"
    pid = running["process_id"]
    r = call(server, "process_output", {"name": workspace, "process_id": pid,
                                        "wait_s": 120})
    done = ok(r)
    total = sum(len(b"%d\n" % i) for i in range(1, 1_000_001))
    assert (done["status"], done["exit_code"], done["truncated"]) == ("exited", 0, True)
    assert done["stdout_bytes"] == total and done["next_since"] == total
    shown = done["stdout"]
    assert shown.startswith("1\n2\n3\n") and shown.endswith("999999\n1000000\n")
    left = re.search(r"\[\.\.\. (\d+) bytes left out of (\d+);", shown)
    assert left is not None and int(left[2]) == total
    assert f"/run/microagent/proc/{pid}/stdout" in shown  # where the model can grep it
    assert len(text(r).encode()) < 16 * 1024 + 400
    # the guest file the marker names holds the tail
    tail = ok(call(server, "exec", {"name": workspace,
                                    "command": f"tail -c 8 /run/microagent/proc/{pid}/stdout"}))
    assert tail["stdout"] == "1000000\n"


def test_files_read_write_edit_list(server: WorkspaceServer, workspace: str) -> None:
    path = "/root/notes/a.txt"
    ok(call(server, "write_file", {"name": workspace, "path": path,
                                   "content": "one\ntwo\ntwo\nthé\n"}))
    read = ok(call(server, "read_file", {"name": workspace, "path": path}))
    assert read["content"] == "one\ntwo\ntwo\nthé\n" and read["next_offset"] is None
    part = call(server, "read_file", {"name": workspace, "path": path, "offset": 2,
                                      "limit": 1})
    assert ok(part)["content"] == "two\n" and ok(part)["next_offset"] == 3
    assert "next offset 3" in text(part)

    refused = error(call(server, "edit_file", {"name": workspace, "path": path,
                                               "old": "two", "new": "2"}), "conflict")
    assert "2 times" in refused and "replace_all" in refused
    error(call(server, "edit_file", {"name": workspace, "path": path, "old": "zzz",
                                     "new": "y"}), "usage")
    assert ok(call(server, "edit_file", {"name": workspace, "path": path, "old": "one\n",
                                         "new": "1\n"}))["replacements"] == 1
    assert ok(call(server, "edit_file", {"name": workspace, "path": path, "old": "two",
                                         "new": "2", "replace_all": True}))["replacements"] == 2
    assert ok(call(server, "read_file", {"name": workspace, "path": path}))["content"] == \
        "1\n2\n2\nthé\n"

    entries = ok(call(server, "list_files", {"name": workspace, "path": "/root/notes"}))
    assert entries["entries"] == [{"name": "a.txt", "kind": "file", "size": 11}]
    message = error(call(server, "read_file", {"name": workspace, "path": "/root/missing"}),
                    "not-found")
    assert "/root/missing" in message
    logs = ok(call(server, "workspace_logs", {"name": workspace, "tail": 20}))
    assert logs["logs"] and logs["truncated"] is False


def test_snapshot_fork_pause_resume_halt_delete(server: WorkspaceServer, workspace: str
                                                ) -> None:
    ok(call(server, "write_file", {"name": workspace, "path": "/root/mark",
                                   "content": "before snapshot\n"}))
    snap = ok(call(server, "snapshot_workspace", {"name": workspace, "tag": "t1"}))
    assert (snap["workspace"], snap["tag"]) == (workspace, "t1")
    forked = ok(call(server, "fork_workspace", {"name": FORK, "source": f"{workspace}:t1"}))
    assert forked["state"] == "running"
    assert ok(call(server, "exec", {"name": FORK, "command": "cat /root/mark"}))["stdout"] \
        == "before snapshot\n"

    assert ok(call(server, "pause_workspace", {"name": FORK}))["state"] == "paused"
    message = error(call(server, "exec", {"name": FORK, "command": "true"}), "conflict")
    assert "paused" in message and "hint: " in message
    assert ok(call(server, "resume_workspace", {"name": FORK}))["state"] == "running"
    assert ok(call(server, "exec", {"name": FORK, "command": "true"}))["exit_code"] == 0

    assert ok(call(server, "halt_workspace", {"name": FORK}))["state"] == "halted"
    error(call(server, "exec", {"name": FORK, "command": "true"}), "conflict")
    error(call(server, "read_file", {"name": FORK, "path": "/root/mark"}), "conflict")
    error(call(server, "delete_workspace", {"name": workspace}), "conflict")  # running
    assert ok(call(server, "delete_workspace", {"name": FORK}))["deleted"] is True
    error(call(server, "delete_workspace", {"name": FORK}), "not-found")
    names = [w["name"] for w in ok(call(server, "list_workspaces"))["workspaces"]]
    assert names == [workspace]


def test_restore_and_suspend_keep_a_background_process(server: WorkspaceServer,
                                                       workspace: str) -> None:
    """``start_workspace`` with ``from_snapshot`` takes a halted workspace back to the
    snapshot's instant: a file written after it is gone, a process started before it
    still counts; ``suspend_workspace`` ends the VM and the next start resumes it."""
    counting = ok(call(server, "exec", {
        "name": workspace, "command": "i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; "
                                      "done", "yield_s": 0.5, "timeout_s": 3600}))
    assert counting["status"] == "running"
    pid = counting["process_id"]
    ok(call(server, "snapshot_workspace", {"name": workspace, "tag": "counting"}))
    ok(call(server, "write_file", {"name": workspace, "path": "/root/after",
                                   "content": "after the snapshot\n"}))
    message = error(call(server, "start_workspace", {"name": workspace,
                                                     "from_snapshot": "counting"}), "conflict")
    assert "already running" in message  # a restore goes into a halted workspace
    assert ok(call(server, "halt_workspace", {"name": workspace}))["state"] == "halted"
    r = call(server, "start_workspace", {"name": workspace, "from_snapshot": "counting"})
    assert (ok(r)["state"], ok(r)["ready"]) == ("running", True)
    assert text(r) == f"{workspace}: running (from counting)"
    error(call(server, "read_file", {"name": workspace, "path": "/root/after"}), "not-found")
    _assert_counts_on(server, workspace, pid)

    assert ok(call(server, "suspend_workspace", {"name": workspace}))["state"] == "suspended"
    assert ok(call(server, "workspace_status", {"name": workspace}))["state"] == "suspended"
    error(call(server, "suspend_workspace", {"name": workspace}), "conflict")
    assert ok(call(server, "start_workspace", {"name": workspace}))["state"] == "running"
    _assert_counts_on(server, workspace, pid)
    ok(call(server, "process_kill", {"name": workspace, "process_id": pid,
                                     "signal": "KILL"}))


def _assert_counts_on(server: WorkspaceServer, workspace: str, pid: int) -> None:
    """Process ``pid`` is running and its output grows (within 30 s)."""
    first = ok(call(server, "process_output", {"name": workspace, "process_id": pid}))
    assert first["status"] == "running", first
    deadline = time.monotonic() + 30
    while True:
        later = ok(call(server, "process_output", {"name": workspace, "process_id": pid,
                                                   "since": first["next_since"]}))
        if later["next_since"] > first["next_since"]:
            break
        assert time.monotonic() < deadline, f"process {pid} printed nothing in 30 s"
        time.sleep(0.2)
    assert later["status"] == "running"
