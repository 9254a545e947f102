"""Published ports and network modes without a VM: the flags' forms and refusals, the port
check, passt's refusal and rules."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.errors import ConflictError, UsageError
from microagent.network import (
    PublishedPort,
    check_ports_free,
    parse_publish,
    port_failure,
    validate_ports,
)
from microagent.vm.backends.base import PortSpec

MICROAGENT = str(Path(sys.executable).parent / "microagent")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MICROAGENT, *args], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())


@pytest.fixture
def listener() -> Iterator[int]:
    """A host port in use: a listening socket on 127.0.0.1."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


def test_publish_forms() -> None:
    assert parse_publish("8080:80") == PublishedPort("127.0.0.1", 8080, 80, "tcp")
    assert parse_publish("8080:80/tcp") == PublishedPort("127.0.0.1", 8080, 80)
    assert parse_publish("0.0.0.0:8080:80/TCP") == PublishedPort("0.0.0.0", 8080, 80)
    assert parse_publish("10.1.2.3:1:65535") == PublishedPort("10.1.2.3", 1, 65535)
    port = parse_publish("9000:9001")
    assert PublishedPort.from_json(json.loads(json.dumps(port.to_json()))) == port
    assert port.to_json() == {"host_ip": "127.0.0.1", "host_port": 9000, "guest_port": 9001,
                              "protocol": "tcp"}
    assert port.describe() == "127.0.0.1:9000 -> 9001/tcp"


@pytest.mark.parametrize(("value", "message"), [
    ("abc", "invalid --publish 'abc'"),
    ("1:2:3:4", "invalid --publish '1:2:3:4'"),
    ("80:", "ports are numbers"),
    (":80", "ports are numbers"),
    ("8080", "invalid --publish '8080'"),
    ("0:80", "the host port 0 is out of range (1-65535)"),
    ("65536:80", "the host port 65536 is out of range"),
    ("8080:0", "the guest port 0 is out of range"),
    ("8080:65536", "the guest port 65536 is out of range"),
    ("8080:80/udp", "only tcp ports can be published, not udp"),
    ("8080:80/xyz", "unknown protocol 'xyz'"),
    ("localhost:8080:80", "'localhost' is not an IPv4 address"),
    ("::1:8080:80", "invalid --publish"),
])
def test_publish_refusals(value: str, message: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_publish(value)
    assert message in err.value.message
    assert err.value.exit_code == 2


def test_one_host_port_twice_and_publish_without_network() -> None:
    for second in ("8080:80", "8080:81", "0.0.0.0:8080:80"):
        with pytest.raises(UsageError, match="host port 8080 is published twice"):
            validate_ports([parse_publish("8080:80"), parse_publish(second)], "user")
    validate_ports([parse_publish("8080:80"), parse_publish("8081:80")], "user")
    with pytest.raises(UsageError, match="--network none has none"):
        validate_ports([parse_publish("8080:80")], "none")
    validate_ports([], "none")


def test_a_taken_port_is_named(listener: int) -> None:
    with pytest.raises(ConflictError) as err:
        check_ports_free([PublishedPort("127.0.0.1", listener, 80)])
    assert err.value.message == f"host port {listener} is already in use (127.0.0.1:{listener})"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    check_ports_free([PublishedPort("127.0.0.1", free, 80)])
    with pytest.raises(ConflictError, match="is not an address of this host"):
        check_ports_free([PublishedPort("203.0.113.7", 8080, 80)])  # TEST-NET-3


def test_passts_refusal_becomes_the_same_message() -> None:
    said = ("Failed to send 47 bytes to syslog\nDon't run as root. Changing to nobody...\n"
            "Failed to bind any port for '-t 127.0.0.1/8080:80', exiting\n")  # as it printed
    failure = port_failure(said)
    assert failure is not None
    assert failure.message == "host port 8080 is already in use (127.0.0.1:8080)"
    assert port_failure("Couldn't get any nameserver address") is None


def test_a_real_passt_refuses_a_taken_port_in_those_words(listener: int) -> None:
    from microagent.vm.passt import PasstSpec, passt_argv

    link, theirs = socket.socketpair()
    try:
        argv = passt_argv(PasstSpec(theirs.fileno(), ports=(PortSpec("127.0.0.1", listener, 80),)))
        run = subprocess.run(argv, pass_fds=(theirs.fileno(),), capture_output=True, text=True,
                             timeout=30, check=False)
    finally:
        link.close()
        theirs.close()
    assert run.returncode != 0
    failure = port_failure(run.stdout + run.stderr)
    assert failure is not None and str(listener) in failure.message, run


def test_network_modes() -> None:
    from microagent.network import has_network, reaches_host_loopback, validate_network

    assert [validate_network(m) for m in ("user", "user:host-loopback", "none")] == [
        "user", "user:host-loopback", "none"]
    for bad in ("User", "user:", "user:loopback", "host", "slirp", ""):
        with pytest.raises(UsageError, match="unknown network mode") as err:
            validate_network(bad)
        assert "user, user:host-loopback, none" in err.value.hint
    assert [has_network(m) for m in ("user", "user:host-loopback", "none")] == [
        True, True, False]
    assert [reaches_host_loopback(m) for m in ("user", "user:host-loopback", "none")] == [
        False, True, False]
    validate_ports([parse_publish("8080:80")], "user:host-loopback")


def test_the_network_mode_is_recorded_and_listed(state_dir: Path) -> None:
    from microagent.layout import StateLayout
    from microagent.store import read_json, write_json_atomic
    from tests.support.workspaces import make_workspace

    layout = StateLayout.resolve(state_dir)
    make_workspace(layout, "open")
    record = read_json(layout.workspace_record("open"))
    write_json_atomic(layout.workspace_record("open"), {**record,
                                                        "network": "user:host-loopback"})
    listed = [line.split() for line in run("list").stdout.splitlines()]
    assert ["open", "prepared", "qemu", "tiny", "user:host-loopback", "never"] in listed
    assert json.loads(run("--json", "status", "open").stdout)["network"] == \
        "user:host-loopback"
    assert "Network: user:host-loopback" in run("status", "open").stdout


@pytest.mark.parametrize(("flags", "message"), [
    (["--publish", "abc"], "invalid --publish 'abc'"),
    (["--publish", "1:2:3:4"], "invalid --publish '1:2:3:4'"),
    (["--publish", "80:"], "ports are numbers"),
    (["--publish", "0:80"], "out of range"),
    (["--publish", "8080:65536"], "out of range"),
    (["--publish", "8080:80/udp"], "only tcp"),
    (["-p", "8080:80", "-p", "8080:81"], "host port 8080 is published twice"),
    (["--publish", "8080:80", "--network", "none"], "--network none has none"),
    (["--network", "user:loopback"], "unknown network mode 'user:loopback'"),
    (["--network", "slirp"], "unknown network mode 'slirp'"),
])
def test_bad_publish_or_network_exits_2_and_writes_nothing(flags: list[str], message: str,
                                               state_dir: Path) -> None:
    for argv in (["create", "web", "--image", "busybox", *flags],
                 ["run", *flags, "busybox", "true"]):
        result = run(*argv)
        assert result.returncode == 2, result
        assert message in result.stderr, result.stderr
        assert not state_dir.exists() or not any(state_dir.rglob("*.json"))
    result = run("--json", "create", "web", "--image", "busybox", *flags)
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"]["kind"] == "usage"


def test_start_without_passt_says_which_package_and_changes_nothing(
        state_dir: Path, tmp_path: Path) -> None:
    import shutil

    from microagent.events import read_events
    from microagent.layout import StateLayout
    from tests.support.workspaces import make_workspace

    layout = StateLayout.resolve(state_dir)
    make_workspace(layout, "net")
    bin_dir = tmp_path / "bin"  # QEMU, but no passt
    bin_dir.mkdir()
    (bin_dir / "qemu-system-x86_64").symlink_to(shutil.which("qemu-system-x86_64") or "/bin/true")
    result = subprocess.run([MICROAGENT, "--json", "start", "net"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PATH": str(bin_dir)})
    assert result.returncode == 1, result
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "host" and "passt not found" in error["message"]
    assert "install the passt package" in error["message"]
    assert [e.state for e in read_events(layout.workspace_events("net"))] == ["prepared"]
