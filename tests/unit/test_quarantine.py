"""quarantine without a VM: the QMP steps against a fake monitor, the supervisor's control
requests against fakes of the VMM and the agent channel, and the CLI's refusals. The real
thing (link down, published ports closed, a guest cut off) is tests/vm/test_quarantine.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from microagent.backends.qmp import QmpError
from microagent.errors import ConflictError
from microagent.events import append_event, read_events
from microagent.launch import unlaunched
from microagent.layout import StateLayout
from microagent.quarantine import NETDEV, host_forwards, quarantine_workspace, sever_network
from microagent.store import ensure_dir
from tests.support.workspaces import make_workspace

USERNET = """Hub -1 (net0):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[HOST_FORWARD]  11       127.0.0.1 45671       10.0.2.15    80     0     0
  TCP[HOST_FORWARD]   9               * 45672       10.0.2.15    22     0     0
  UDP[HOST_FORWARD]   8       127.0.0.1 45673       10.0.2.15    53     0     0
  TCP[ESTABLISHED]   15       127.0.0.1 45671       10.0.2.15    80     0     0
"""
EMPTY_USERNET = """Hub -1 (net0):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
"""


class FakeQmp:
    """Answers like QEMU 7.2's monitor (the strings are what it printed here)."""

    def __init__(self, usernet: str = USERNET, removable: bool = True) -> None:
        self.usernet = usernet
        self.removable = removable
        self.commands: list[tuple[str, dict[str, Any] | None]] = []

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = 10.0) -> Any:
        self.commands.append((command, arguments))
        if command == "set_link":
            return {}
        line = str((arguments or {}).get("command-line", ""))
        if line == "info usernet":
            return self.usernet
        if line.startswith("hostfwd_remove "):
            rule = line.split()[-1]
            if not self.removable:
                return f"host forwarding rule for {rule} not found\r\n"
            self.usernet = "\n".join(x for x in self.usernet.splitlines()
                                     if "HOST_FORWARD" not in x or
                                     x.split()[3] != rule.split(":")[-1])
            return f"host forwarding rule for {rule} removed\r\n"
        raise QmpError(f"unexpected {command} {arguments}")


def test_host_forwards_are_read_from_info_usernet() -> None:
    assert host_forwards(USERNET) == ["tcp:127.0.0.1:45671", "tcp::45672",
                                      "udp:127.0.0.1:45673"]
    assert host_forwards(EMPTY_USERNET) == []


def test_sever_network_takes_the_link_down_and_removes_every_forward() -> None:
    qmp = FakeQmp()
    detail = asyncio.run(sever_network(qmp, "user"))  # type: ignore[arg-type]
    assert detail == "network severed (link down, 3 published ports closed)"
    assert qmp.commands[0] == ("set_link", {"name": NETDEV, "up": False})
    removed = [a["command-line"] for c, a in qmp.commands
               if a and str(a.get("command-line", "")).startswith("hostfwd_remove")]
    assert removed == [f"hostfwd_remove {NETDEV} tcp:127.0.0.1:45671",
                       f"hostfwd_remove {NETDEV} tcp::45672",
                       f"hostfwd_remove {NETDEV} udp:127.0.0.1:45673"]
    assert asyncio.run(sever_network(FakeQmp(EMPTY_USERNET), "user")) == \
        "network severed (link down, 0 published ports closed)"  # type: ignore[arg-type]


def test_sever_network_fails_loudly() -> None:
    with pytest.raises(QmpError, match="not found"):
        asyncio.run(sever_network(FakeQmp(removable=False), "user"))  # type: ignore[arg-type]
    with pytest.raises(QmpError, match="not connected"):
        asyncio.run(sever_network(None, "user"))
    assert "network none" in asyncio.run(sever_network(None, "none"))


def test_the_netdev_id_is_the_one_qemu_is_given() -> None:
    from microagent.backends.qemu import QemuBackend
    from tests.unit.test_backends import SPEC

    argv = QemuBackend().plan(SPEC).argv
    assert argv[argv.index("-netdev") + 1].startswith(f"user,id={NETDEV}")


def test_quarantine_refuses_a_workspace_that_is_not_running(layout: StateLayout) -> None:
    make_workspace(layout, "idle")
    with pytest.raises(ConflictError, match=r"idle is not running \(state prepared\)"):
        quarantine_workspace(layout, "idle")
    append_event(layout.workspace_events("idle"), "halted", "halted cleanly")
    with pytest.raises(ConflictError, match=r"not running \(state halted\)"):
        quarantine_workspace(layout, "idle")


def test_cli_quarantine_of_a_halted_workspace_exits_1(
        layout: StateLayout, capsys: pytest.CaptureFixture[str]) -> None:
    from microagent.cli import main

    make_workspace(layout, "idle")
    append_event(layout.workspace_events("idle"), "halted", "halted cleanly")
    assert main(["--state-dir", str(layout.root), "--json", "quarantine", "idle"]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["kind"] == "conflict" and "not running (state halted)" in error["message"]


# --- the supervisor's side ----------------------------------------------------------------


class FakeVmm:
    pid = 4242
    returncode: int | None = None


class FakeChannel:
    """The agent channel: a relay that lasts until its client goes away."""

    def __init__(self) -> None:
        self.hello: dict[str, Any] = {"version": 1}
        self.closed = asyncio.Event()
        self.relays = 0

    async def relay(self, transport: asyncio.Transport) -> None:
        self.relays += 1
        gone = asyncio.get_running_loop().create_future()

        class Drain(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                gone.set_result(None)

        transport.set_protocol(Drain())
        await gone


async def _ask(path: str, request: dict[str, Any]) -> tuple[dict[str, Any],
                                                             asyncio.StreamReader,
                                                             asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(json.dumps(request).encode() + b"\n")
    await writer.drain()
    return json.loads(await reader.readline()), reader, writer


def test_supervisor_quarantine_refuses_sessions_and_cuts_those_in_flight(
        layout: StateLayout, tmp_path: Path) -> None:
    from microagent.supervisor import Supervisor

    make_workspace(layout, "q")
    append_event(layout.workspace_events("q"), "running", "ready")
    ensure_dir(layout.run_files("q").dir)
    supervisor = Supervisor(layout, "q", 10, unlaunched(layout, "q"))
    qmp = FakeQmp()
    supervisor.vmm, supervisor.qmp = FakeVmm(), qmp  # type: ignore[assignment]
    supervisor.channel = FakeChannel()  # type: ignore[assignment]
    supervisor.status["vmm_pid"] = FakeVmm.pid  # as boot_once records it
    path = str(tmp_path / "control.sock")

    async def scenario() -> None:
        server = await asyncio.start_unix_server(supervisor.serve_client, path=path)
        try:
            answer, session, session_writer = await _ask(path, {"request": "channel"})
            assert answer["ok"]  # an exec in flight
            answer, _, _ = await _ask(path, {"request": "quarantine"})
            assert answer == {"ok": True, "state": "quarantined",
                              "detail": "network severed (link down, 3 published ports "
                                        "closed)"}
            assert await asyncio.wait_for(session.read(), 5) == b""  # cut
            session_writer.close()
            for request in ({"request": "channel"}, {"request": "console"},
                            {"request": "console-send", "line": "id"}):
                answer, _, _ = await _ask(path, request)
                assert not answer["ok"] and answer["error"]["message"].startswith(
                    "quarantined: "), (request, answer)
                assert "refused" in answer["error"]["message"]
            answer, _, _ = await _ask(path, {"request": "quarantine"})
            assert "already quarantined" in answer["error"]["message"]
            answer, _, _ = await _ask(path, {"request": "status"})
            assert answer["status"]["vmm_pid"] == 4242
            assert answer["status"]["quarantined"]["detail"].startswith("network severed")
            assert answer["status"]["readiness"]["execReady"]["ok"] is False
        finally:
            server.close()

    asyncio.run(scenario())
    assert supervisor.channel.relays == 1  # type: ignore[attr-defined]
    last = read_events(layout.workspace_events("q"))[-1]
    assert last.state == "quarantined"
    assert last.detail == ("network severed (link down, 3 published ports closed); "
                           "exec, cp and console input refused")


def test_a_quarantined_workspace_is_never_restarted(layout: StateLayout,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from microagent.store import read_json, write_json_atomic
    from microagent.supervisor import Outcome, Supervisor

    make_workspace(layout, "q")
    record = read_json(layout.workspace_record("q"))
    write_json_atomic(layout.workspace_record("q"), {**record, "restart": "always"})
    ensure_dir(layout.run_files("q").dir)
    monkeypatch.chdir(layout.run_files("q").dir)  # the supervisor's relative socket paths
    supervisor = Supervisor(layout, "q", 10, unlaunched(layout, "q"))
    boots = []

    async def boot_once(launched: object = None) -> Outcome:
        boots.append(1)
        supervisor.quarantined = True  # quarantined, then the guest panicked
        return Outcome("failed", "the guest rebooted or panicked (guest-panic)")

    monkeypatch.setattr(supervisor, "boot_once", boot_once)
    assert asyncio.run(supervisor.run()) == 1
    assert boots == [1]
    assert [e.state for e in read_events(layout.workspace_events("q"))] == [
        "prepared", "failed"]


def test_supervisor_quarantine_rolls_back_when_the_network_cannot_be_severed(
        layout: StateLayout, tmp_path: Path) -> None:
    from microagent.supervisor import Supervisor

    make_workspace(layout, "q")
    append_event(layout.workspace_events("q"), "running", "ready")
    ensure_dir(layout.run_files("q").dir)
    supervisor = Supervisor(layout, "q", 10, unlaunched(layout, "q"))
    supervisor.vmm, supervisor.qmp = FakeVmm(), FakeQmp(removable=False)  # type: ignore[assignment]
    supervisor.channel = FakeChannel()  # type: ignore[assignment]

    async def scenario() -> dict[str, Any]:
        return await supervisor._quarantine({})

    with pytest.raises(Exception, match="could not sever the network"):
        asyncio.run(scenario())
    assert not supervisor.quarantined
    assert read_events(layout.workspace_events("q"))[-1].state == "running"
