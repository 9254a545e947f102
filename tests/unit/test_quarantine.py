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

from microagent.errors import ConflictError
from microagent.events import append_event, read_events
from microagent.layout import StateLayout
from microagent.network import PublishedPort
from microagent.state.records import Workspace, get_workspace
from microagent.store import ensure_dir, read_json, write_json_atomic
from microagent.vm.backends.qmp import QmpError
from microagent.vm.containment import NETDEV, sever_network
from microagent.vm.launch import unlaunched
from microagent.workspace.quarantine import quarantine_workspace
from tests.support.workspaces import make_workspace


class FakeQmp:
    """Answers set_link like QEMU 7.2's monitor, or refuses it."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.commands: list[tuple[str, dict[str, Any] | None]] = []

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = 10.0) -> Any:
        self.commands.append((command, arguments))
        if command == "set_link" and not self.refuse:
            return {}
        raise QmpError(f"{command}: refused")


class FakeHelper:
    """passt and its relay, as the supervisor holds them."""

    def __init__(self) -> None:
        self.stopped = 0

    def stop(self) -> None:
        self.stopped += 1


def _workspace(layout: StateLayout, network: str = "user", ports: int = 0) -> Workspace:
    make_workspace(layout, "q")
    record = read_json(layout.workspace_record("q"))
    write_json_atomic(layout.workspace_record("q"), {
        **record, "network": network,
        "ports": [PublishedPort("127.0.0.1", 8000 + i, 80 + i).to_json() for i in range(ports)]})
    return get_workspace(layout, "q")


def test_sever_network_takes_the_link_down_then_ends_passt(layout: StateLayout) -> None:
    qmp, helper = FakeQmp(), FakeHelper()
    detail = asyncio.run(sever_network(qmp, helper, _workspace(layout, ports=3)))  # type: ignore[arg-type]
    assert detail == "network severed (link down, 3 published ports closed)"
    assert qmp.commands == [("set_link", {"name": NETDEV, "up": False})]
    assert helper.stopped == 1


def test_sever_network_counts_ports_in_words(layout: StateLayout) -> None:
    workspace = _workspace(layout, "user:host-loopback", ports=1)
    assert asyncio.run(sever_network(FakeQmp(), FakeHelper(), workspace)) == \
        "network severed (link down, 1 published port closed)"  # type: ignore[arg-type]


def test_sever_network_fails_loudly_and_leaves_passt_alone(layout: StateLayout) -> None:
    helper = FakeHelper()
    workspace = _workspace(layout)
    with pytest.raises(QmpError, match="refused"):
        asyncio.run(sever_network(FakeQmp(refuse=True), helper, workspace))  # type: ignore[arg-type]
    with pytest.raises(QmpError, match="not connected"):
        asyncio.run(sever_network(None, helper, workspace))
    assert helper.stopped == 0


def test_a_workspace_without_network_has_nothing_to_sever(layout: StateLayout) -> None:
    assert "network none" in asyncio.run(sever_network(None, None, _workspace(layout, "none")))


def test_the_netdev_id_is_the_one_qemu_is_given() -> None:
    from microagent.vm.backends.qemu import QemuBackend
    from tests.unit.test_backends import SPEC

    argv = QemuBackend().plan(SPEC).argv
    assert argv[argv.index("-netdev") + 1].startswith(f"stream,id={NETDEV},")


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
    from microagent.vm.supervisor import Supervisor

    _workspace(layout, ports=3)
    append_event(layout.workspace_events("q"), "running", "ready")
    ensure_dir(layout.run_files("q").dir)
    supervisor = Supervisor(layout, "q", 10, unlaunched(layout, "q"))
    qmp, helper = FakeQmp(), FakeHelper()
    supervisor.vmm, supervisor.qmp = FakeVmm(), qmp  # type: ignore[assignment]
    supervisor.network = helper  # type: ignore[assignment]
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
    assert helper.stopped == 1  # passt ended: the published ports refuse
    last = read_events(layout.workspace_events("q"))[-1]
    assert last.state == "quarantined"
    assert last.detail == ("network severed (link down, 3 published ports closed); "
                           "exec, cp and console input refused")


def test_a_quarantined_workspace_is_never_restarted(layout: StateLayout,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from microagent.store import read_json, write_json_atomic
    from microagent.vm.supervisor import Outcome, Supervisor

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
    from microagent.vm.supervisor import Supervisor

    make_workspace(layout, "q")
    append_event(layout.workspace_events("q"), "running", "ready")
    ensure_dir(layout.run_files("q").dir)
    supervisor = Supervisor(layout, "q", 10, unlaunched(layout, "q"))
    supervisor.vmm, supervisor.qmp = FakeVmm(), FakeQmp(refuse=True)  # type: ignore[assignment]
    supervisor.network = FakeHelper()  # type: ignore[assignment]
    supervisor.channel = FakeChannel()  # type: ignore[assignment]

    async def scenario() -> dict[str, Any]:
        return await supervisor._quarantine({})

    with pytest.raises(Exception, match="could not sever the network"):
        asyncio.run(scenario())
    assert not supervisor.quarantined
    assert supervisor.network.stopped == 0  # type: ignore[attr-defined]
    assert read_events(layout.workspace_events("q"))[-1].state == "running"
