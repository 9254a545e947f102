"""``microagent quarantine`` on real microVMs: the guest is cut off the network (a loop in
the guest stops reaching a server beside the host, a published port stops accepting),
exec, cp and console input are refused, the VM process keeps running with its disk, logs
and events, and halt, stop and kill end the quarantine.

The server the guest loop reaches is in a network namespace the test makes
(tests/support/netns.py): a workspace reaches what the host reaches except the host's
loopback.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.fixtures import PushedImage
from tests.support.netns import Netns, NetnsHttpServer
from tests.vm.cli import events, ma, ok, qemu_pids

pytestmark = pytest.mark.slow


@pytest.fixture
def host_server(tmp_path: Path) -> Iterator[NetnsHttpServer]:
    netns = Netns()
    try:
        yield NetnsHttpServer(netns, tmp_path / "requests.log")
    finally:
        netns.close()


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for ``condition``, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
        return str(answer.read().decode())


def status(home: Path, name: str) -> dict[str, object]:
    return dict(json.loads(ok(ma(home, "--json", "status", name)).stdout))


def serve_in_guest(home: Path, name: str) -> None:
    """busybox httpd on the guest's port 8080 (it daemonizes: exec returns)."""
    ok(ma(home, "exec", name, "--", "sh", "-c",
          "mkdir -p /root/www && echo published > /root/www/index.html && "
          "httpd -p 8080 -h /root/www"))


def test_quarantine_contains_a_running_workspace(home: Path, busybox_image: PushedImage,
                                                 host_server: NetnsHttpServer,
                                                 tmp_path: Path) -> None:
    name, published = "suspect", free_port()
    ok(ma(home, "create", name, "--image", busybox_image.ref, "--profile", "tiny",
          "--publish", f"127.0.0.1:{published}:8080"))
    ok(ma(home, "start", name))
    serve_in_guest(home, name)
    until(lambda: _answers(published), 30, "the published port to answer")
    # a guest loop started before the quarantine, outliving its exec (own session)
    loop = (f"while true; do if timeout 3 wget -q -O /dev/null "
            f"{host_server.url}/ping; then echo ok; else echo fail; fi "
            f">> /root/net.log; sleep 1; done")
    ok(ma(home, "exec", name, "--", "sh", "-c",
          f"setsid sh -c '{loop}' </dev/null >/dev/null 2>&1 &"))
    until(lambda: len(host_server.requests()) >= 2, 60, "the guest loop to reach the server")
    before = status(home, name)
    history = events(home, name)

    answer = json.loads(ok(ma(home, "--json", "quarantine", name)).stdout)
    assert answer == {"name": name, "state": "quarantined"}

    # the VM process lives on, with the same pid
    after = status(home, name)
    assert after["state"] == "quarantined"
    assert after["pid"] == before["pid"] and qemu_pids(name) == [before["pid"]]
    assert "quarantined" in ok(ma(home, "status", name)).stdout
    assert f"PID: {before['pid']}" in ok(ma(home, "status", name)).stdout
    row = [line.split() for line in ok(ma(home, "list")).stdout.splitlines()
           if line.startswith(name + " ")]
    assert row[0][1] == "quarantined"
    # network severed: the loop's requests stop, the published port refuses
    time.sleep(1.5)  # a request in flight at the quarantine may still land
    count = len(host_server.requests())
    time.sleep(6)
    assert len(host_server.requests()) == count, "the guest still reaches the server"
    with pytest.raises(OSError):
        fetch(published)
    # exec (125), cp and console input are refused, saying why
    refused = ma(home, "exec", name, "--", "true")
    assert refused.returncode == 125 and f"workspace {name} is quarantined" in refused.stderr
    local = tmp_path / "local.txt"
    local.write_text("x")
    for args in (("cp", str(local), f"{name}:/root/"),
                 ("cp", f"{name}:/etc/hostname", str(tmp_path / "out")),
                 ("connect", name, "--send", "id"), ("connect", name)):
        refused = ma(home, *args)
        assert refused.returncode == 1 and "quarantined" in refused.stderr, (args, refused)
    assert not (tmp_path / "out").exists()
    refused = ma(home, "start", name)
    assert refused.returncode == 1 and "quarantined" in refused.stderr
    assert "halt, stop or kill it first" in refused.stderr
    refused = ma(home, "quarantine", name)
    assert refused.returncode == 1 and "already quarantined" in refused.stderr
    # logs and events intact; the VM still runs
    assert "microagent-init" in ok(ma(home, "logs", name)).stdout
    now = events(home, name)
    assert now[:len(history)] == history and now[-1]["state"] == "quarantined"
    assert "network severed (link down, 1 published port closed)" in now[-1]["detail"]
    assert qemu_pids(name) == [before["pid"]]

    # halt ends it; a normal start afterwards has the network back
    assert json.loads(ok(ma(home, "--json", "halt", name)).stdout)["state"] == "halted"
    assert qemu_pids(name) == [] and events(home, name)[-1]["state"] == "halted"
    refused = ma(home, "quarantine", name)
    assert refused.returncode == 1 and "not running (state halted)" in refused.stderr
    ok(ma(home, "start", name))
    log = ok(ma(home, "exec", name, "--", "cat", "/root/net.log")).stdout.split()
    assert "ok" in log and "fail" in log and log.index("fail") > log.index("ok")
    assert ok(ma(home, "exec", name, "--", "wget", "-q", "-O", "-",
                 f"{host_server.url}/")).stdout == "pong\n"
    serve_in_guest(home, name)
    until(lambda: _answers(published), 30, "the published port to answer again")
    ok(ma(home, "kill", name))


def _answers(port: int) -> bool:
    try:
        return fetch(port) == "published\n"
    except OSError:
        return False


def test_stop_and_kill_end_a_quarantine(home: Path, busybox_image: PushedImage) -> None:
    name = "contained"
    ok(ma(home, "create", name, "--image", busybox_image.ref, "--profile", "tiny"))
    for verb in ("stop", "kill"):
        ok(ma(home, "start", name))
        ok(ma(home, "quarantine", name))
        pid = status(home, name)["pid"]
        assert qemu_pids(name) == [pid]
        assert json.loads(ok(ma(home, "--json", verb, name)).stdout)["state"] == "stopped"
        assert qemu_pids(name) == [], verb
        assert events(home, name)[-1]["state"] == "stopped", verb
        assert status(home, name)["state"] == "stopped"
    refused = ma(home, "quarantine", name)
    assert refused.returncode == 1 and "not running (state stopped)" in refused.stderr
    ok(ma(home, "delete", name, "--yes"))
