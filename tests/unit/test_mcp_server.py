"""``serve mcp`` without a VM: the tool list (names, annotations, size), errors a model
can read, bounded output, the missing-SDK message, and the real stdio and HTTP servers
through the SDK's client."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest
from mcp import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from microagent import Microagent
from microagent.errors import ConflictError
from microagent.mcpserver.bounded import BoundedSink, bound
from microagent.mcpserver.server import build_server
from microagent.mcpserver.tools import ALL_TOOLS, DEFAULT_TOOLS
from tests.support.mcpclient import call, error, list_tools, ok, text, tools_json_size

TOOL_NAME = re.compile(r"^[a-z0-9_]{1,64}$")
DEFAULT_LIST_BUDGET = 9728  # bytes of tools/list JSON for the default tools (9.5 KiB)
ALL_LIST_BUDGET = 11776


def test_default_tools_are_named_for_every_client_and_small(tmp_path: Path) -> None:
    tools = list_tools(build_server(Microagent(tmp_path)))
    names = [t["name"] for t in tools]
    assert names == list(DEFAULT_TOOLS)
    assert all(TOOL_NAME.match(n) for n in names)
    size = tools_json_size(tools)
    print(f"tools/list: {len(tools)} tools, {size} bytes")
    assert size < DEFAULT_LIST_BUDGET
    by_name = {t["name"]: t for t in tools}
    assert by_name["read_file"]["annotations"] == {"readOnlyHint": True}
    assert by_name["delete_workspace"]["annotations"]["destructiveHint"] is True
    start = by_name["start_workspace"]
    assert start["annotations"]["idempotentHint"] is True
    # a restore replaces the disk: what was written since the snapshot is lost
    assert start["annotations"]["destructiveHint"] is True
    assert {"from_snapshot", "cold"} <= set(start["inputSchema"]["properties"])
    assert by_name["suspend_workspace"]["annotations"] == \
        by_name["halt_workspace"]["annotations"] == {
            "readOnlyHint": False, "destructiveHint": False, "idempotentHint": True}
    exec_tool = by_name["exec"]
    assert set(exec_tool["inputSchema"]["required"]) == {"name", "command"}
    assert {"status", "exit_code", "stdout", "stderr"} <= set(
        exec_tool["outputSchema"]["properties"])
    assert "title" not in exec_tool["inputSchema"]["properties"]["cwd"]


def test_all_tools_and_a_chosen_few(tmp_path: Path) -> None:
    tools = list_tools(build_server(Microagent(tmp_path), all_tools=True))
    assert [t["name"] for t in tools] == list(ALL_TOOLS)
    assert all(TOOL_NAME.match(t["name"]) for t in tools)
    assert tools_json_size(tools) < ALL_LIST_BUDGET
    few = list_tools(build_server(Microagent(tmp_path), tools=["exec", "doctor"]))
    assert [t["name"] for t in few] == ["exec", "doctor"]


def test_errors_reach_the_model_with_kind_message_and_hint(tmp_path: Path) -> None:
    server = build_server(Microagent(tmp_path))
    message = error(call(server, "exec", {"name": "nope", "command": "true"}), "not-found")
    assert "nope" in message and "\nhint: " in message
    result = call(server, "workspace_status", {"name": "nope"})
    error(result, "not-found")
    assert result.structured_content == {"error": {
        "kind": "not-found", "message": "no workspace named nope",
        "hint": result.structured_content["error"]["hint"]}}
    # arguments the schema refuses, and ones only the library refuses
    message = error(call(server, "exec", {"name": "nope"}), "usage")
    assert "command" in message and "Field required" in message
    error(call(server, "exec", {"name": "nope", "command": "true", "timeout_s": -1}), "usage")
    error(call(server, "read_file", {"name": "nope", "path": "relative"}), "usage")
    error(call(server, "start_workspace", {"name": "../x"}), "usage")
    message = error(call(server, "start_workspace", {"name": "nope", "from_snapshot": "t",
                                                     "cold": True}), "usage")
    assert "exclude each other" in message
    error(call(server, "suspend_workspace", {"name": "nope"}), "not-found")
    assert ok(call(server, "list_workspaces")) == {"workspaces": []}


def test_bounded_keeps_head_and_tail_at_character_boundaries() -> None:
    lines = b"".join(b"%d\n" % i for i in range(1, 100_001))
    shown, truncated, total = bound(lines, 1024)
    assert truncated and total == len(lines)
    assert shown.startswith("1\n2\n3\n") and shown.endswith("99999\n100000\n")
    left_out = int(re.search(r"\[\.\.\. (\d+) bytes left out of (\d+)", shown)[1])  # type: ignore[index]
    kept = len(shown.encode()) - len(re.search(r"\n\[\.\.\..*\]\n", shown)[0].encode())  # type: ignore[index]
    assert left_out + kept == total and kept <= 1024
    # multi-byte characters are never cut in half
    euros = "€".encode() * 1000
    shown, truncated, _ = bound(euros, 301)
    assert truncated and "\ufffd" not in shown
    # fed in pieces, as a command's output arrives
    sink = BoundedSink(1024)
    for i in range(0, len(lines), 4096):
        sink(lines[i:i + 4096])
    assert sink.text() == bound(lines, 1024)[0]
    assert bound(b"short", 1024) == ("short", False, 5)
    # a gap (bytes the guest dropped, or not read): counted, the head ends there, and the
    # marker names the guest file that keeps the whole stream
    sink = BoundedSink(1024)
    sink(b"head\n")
    sink.skip(5000)
    sink(b"tail\n")
    shown = sink.text("/run/microagent/proc/7/stdout")
    assert sink.truncated and sink.total == 5010
    assert shown.startswith("head\n\n[... 5000 bytes left out of 5010; ") and \
        shown.endswith("...]\ntail\n") and "/run/microagent/proc/7/stdout" in shown


def test_without_the_sdk_the_command_says_what_to_install(tmp_path: Path) -> None:
    # the SDK really absent from the interpreter: None in sys.modules makes `import mcp`
    # raise ImportError, as in an environment without the extra
    code = ("import sys; sys.modules['mcp'] = None\n"
            "from microagent.cli import main\n"
            f"sys.exit(main(['--state-dir', {str(tmp_path)!r}, 'serve', 'mcp']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1, run
    assert "pip install 'microagent[mcp]'" in run.stderr
    assert run.stdout == ""


def test_stdio_server_lists_tools_and_runs_one(tmp_path: Path) -> None:
    params = StdioServerParameters(command=sys.executable, args=[
        "-m", "microagent", "--state-dir", str(tmp_path), "serve", "mcp",
        "--tools", "list_workspaces,workspace_status"])
    assert [t["name"] for t in list_tools(params)] == ["list_workspaces", "workspace_status"]
    assert text(call(params, "list_workspaces")) == "no workspaces"
    error(call(params, "workspace_status", {"name": "ghost"}), "not-found")


def test_http_server_on_loopback_and_on_a_unix_socket(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/mcp"
    with http_server(tmp_path, f"127.0.0.1:{port}",
                     lambda: socket.create_connection(("127.0.0.1", port), timeout=1)):
        assert len(list_tools(url)) == len(DEFAULT_TOOLS)
        assert ok(call(url, "list_workspaces")) == {"workspaces": []}

    path = tmp_path / "mcp.sock"

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        return sock

    with http_server(tmp_path, f"unix:{path}", connect):
        def transport() -> object:  # a client on the socket sends Host: localhost
            return streamable_http_client("http://localhost/mcp", http_client=httpx2.AsyncClient(
                transport=httpx2.AsyncHTTPTransport(uds=str(path))))
        assert ok(call(transport(), "list_workspaces")) == {"workspaces": []}


@contextlib.contextmanager
def http_server(home: Path, address: str, connect: Callable[[], socket.socket]
                ) -> Iterator[None]:
    server = subprocess.Popen([sys.executable, "-m", "microagent", "--state-dir", str(home),
                               "serve", "mcp", "--http", address],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                connect().close()
                break
            except OSError:
                assert server.poll() is None, server.communicate()
                assert time.monotonic() < deadline, "the HTTP server did not listen in 30 s"
                time.sleep(0.1)
        yield
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert b"Traceback" not in stderr, stderr


def test_http_refuses_an_address_beyond_loopback(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "microagent", "--state-dir", str(tmp_path),
                          "serve", "mcp", "--http", "0.0.0.0:8000"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "loopback only" in run.stderr


@pytest.mark.parametrize(("hint", "expected"), [
    ("start it first: microagent start dev", 'start it first: start_workspace(name="dev")'),
    ("start it first, or `microagent start --cold dev` (the memory is discarded)",
     'start it first, or start_workspace(name="dev", cold=true) (the memory is discarded)'),
    ("microagent kill dev ends it", 'kill_workspace(name="dev") ends it'),
    ("microagent top dev", 'list_processes(name="dev")'),
    ("resume it: microagent resume a.b-c", 'resume it: resume_workspace(name="a.b-c")'),
    ("pip install 'microagent[mcp]'", "pip install 'microagent[mcp]'"),
    ("microagent image pull REF", "microagent image pull REF"),  # no tool: left as it is
])
def test_hints_name_tools_not_commands(hint: str, expected: str) -> None:
    from microagent.mcpserver.server import error_result, tool_hint

    assert tool_hint(hint) == expected
    error = error_result(ConflictError("workspace dev is not running", hint=hint))
    assert error.structured_content == {"error": {
        "kind": "conflict", "message": "workspace dev is not running", "hint": expected}}
