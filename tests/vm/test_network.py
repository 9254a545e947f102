"""Network isolation on real microVMs (issue 12): by default the guest reaches what the host
reaches except the host's loopback, even when it addresses 127.0.0.1 itself;
``--network user:host-loopback`` opts in to it (10.0.2.2 is the host's 127.0.0.1); DNS
still goes to the host's resolver through 10.0.2.3.

"Outside" is a server in a network namespace the test makes (tests/support/netns.py), on
a non-loopback address of this host; "the host's loopback" is a server this process runs
on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fixtures import MICROAGENT, PushedImage
from tests.support.netns import Netns, NetnsHttpServer
from tests.vm.cli import ma, ok

pytestmark = pytest.mark.slow


class LoopbackServer:
    """An HTTP server on the host's 127.0.0.1 that counts what reaches it."""

    def __init__(self) -> None:
        self.requests = 0
        self.connections = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def setup(self) -> None:
                outer.connections += 1
                super().setup()

            def do_GET(self) -> None:
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", "7")
                self.end_headers()
                self.wfile.write(b"secret\n")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def loopback() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    yield server
    server.close()


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[NetnsHttpServer]:
    netns = Netns()
    try:
        yield NetnsHttpServer(netns, tmp_path / "requests.log")
    finally:
        netns.close()


def guest(home: Path, name: str, script: str) -> subprocess.CompletedProcess[str]:
    """``sh -c script`` in the guest, its output and status as they are."""
    return ma(home, "exec", name, "--", "sh", "-c", script)


def connect(home: Path, name: str, address: str, port: int) -> subprocess.CompletedProcess[str]:
    """A TCP connection attempt from the guest (busybox nc: its static wget crashes on a
    refused connection)."""
    return guest(home, name, f"nc -w 10 {address} {port} </dev/null")


def test_by_default_the_guest_cannot_reach_the_hosts_loopback(
        home: Path, busybox_image: PushedImage, loopback: LoopbackServer,
        outside: NetnsHttpServer) -> None:
    ok(ma(home, "create", "sealed", "--image", busybox_image.ref, "--profile", "tiny"))
    ok(ma(home, "start", "sealed"))
    # outside the host's loopback, the network works
    assert ok(guest(home, "sealed", f"wget -q -O - {outside.url}/ping")).stdout == "pong\n"
    # the gateway refuses at once (QEMU's slirp connected 10.0.2.2 to 127.0.0.1)
    tried = connect(home, "sealed", "10.0.2.2", loopback.port)
    assert tried.returncode == 1 and "Connection refused" in tried.stderr, tried
    # a guest root that sends 127.0.0.1 out of its interface itself: refused too
    reroute = ("sysctl -qw net.ipv4.conf.all.route_localnet=1 "
               "net.ipv4.conf.eth0.route_localnet=1 && ip addr del 127.0.0.1/8 dev lo && "
               "ip route add 127.0.0.0/8 via 10.0.2.2 dev eth0 && ip route get 127.0.0.1")
    assert "dev eth0" in ok(guest(home, "sealed", reroute)).stdout
    tried = connect(home, "sealed", "127.0.0.1", loopback.port)
    assert tried.returncode == 1 and "Connection refused" in tried.stderr, tried
    assert loopback.requests == 0 and loopback.connections == 0
    assert ok(guest(home, "sealed", f"wget -q -O - {outside.url}/again")).stdout == "pong\n"
    assert outside.requests() == ["/ping", "/again"]
    ok(ma(home, "kill", "sealed"))


def test_host_loopback_is_an_explicit_opt_in(home: Path, busybox_image: PushedImage,
                                             loopback: LoopbackServer,
                                             outside: NetnsHttpServer) -> None:
    ok(ma(home, "create", "open", "--image", busybox_image.ref, "--profile", "tiny",
          "--network", "user:host-loopback"))
    record = json.loads((home / "workspaces" / "open" / "workspace.json").read_text())
    assert record["network"] == "user:host-loopback"
    ok(ma(home, "start", "open"))
    reached = ok(guest(home, "open", f"wget -q -O - http://10.0.2.2:{loopback.port}/"))
    assert reached.stdout == "secret\n" and loopback.requests == 1
    assert ok(guest(home, "open", f"wget -q -O - {outside.url}/ping")).stdout == "pong\n"
    status = json.loads(ok(ma(home, "--json", "status", "open")).stdout)
    assert status["network"] == "user:host-loopback" and status["networkReady"]["ok"]
    assert "Network: user:host-loopback (guest 10.0.2.15)" in \
        ok(ma(home, "status", "open")).stdout.splitlines()
    listed = [line.split() for line in ok(ma(home, "list")).stdout.splitlines()]
    assert ["open", "running", "qemu", "tiny", "user:host-loopback", "never"] in listed
    ok(ma(home, "kill", "open"))


def _dns_answer(query: bytes, address: str) -> bytes:
    """The answer to a DNS query for one A record: ``address``, whatever the name."""
    end = query.index(b"\0", 12) + 5  # the question: the name, its type and class
    header = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0)
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(address)
    return header + query[12:end] + record


def test_dns_goes_to_the_hosts_resolver_even_on_its_loopback(
        home: Path, busybox_image: PushedImage, tmp_path: Path) -> None:
    """Like systemd-resolved's stub: the host's resolv.conf names a resolver on 127.0.0.x,
    which the guest reaches through 10.0.2.3 (DNS only), as it did under slirp."""
    try:
        resolver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        resolver.bind(("127.77.0.53", 53))
    except PermissionError:
        pytest.skip("a resolver on port 53 needs root")
    resolver.settimeout(0.2)
    asked: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                query, peer = resolver.recvfrom(512)
            except TimeoutError:
                continue
            asked.append(query)
            resolver.sendto(_dns_answer(query, "198.18.0.77"), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 127.77.0.53\n")
    try:
        ok(ma(home, "create", "dns", "--image", busybox_image.ref, "--profile", "tiny"))
        # start in a mount namespace whose /etc/resolv.conf is the one above: the
        # supervisor, QEMU and passt live there
        ok(subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv_conf),
             MICROAGENT, "--state-dir", str(home), "start", "dns"],
            capture_output=True, text=True, timeout=300, check=False))
        answer = ok(guest(home, "dns", "nslookup probe.example.test")).stdout
        assert "198.18.0.77" in answer and asked, answer
        ok(ma(home, "kill", "dns"))
    finally:
        stop.set()
        thread.join(5)
        resolver.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _until_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.1)


def test_passt_lives_and_ends_with_each_boot(home: Path, busybox_image: PushedImage) -> None:
    """One passt per boot, started by the supervisor (as nobody when started as root),
    ended by pid at halt, and killed with a supervisor that is SIGKILLed (QEMU is not:
    `kill` ends it then)."""
    ok(ma(home, "create", "helper", "--image", busybox_image.ref, "--profile", "tiny"))
    status_file = home / "workspaces" / "helper" / "run" / "status.json"
    ok(ma(home, "start", "helper"))
    status = json.loads(status_file.read_text())
    passt = status["network_helper"]["pid"]
    argv = Path(f"/proc/{passt}/cmdline").read_bytes().split(b"\0")
    assert b"--fd" in argv and b"--no-map-gw" in argv
    if os.geteuid() == 0:  # passt changes to nobody after binding its ports
        uid_line = next(line for line in Path(f"/proc/{passt}/status").read_text().splitlines()
                        if line.startswith("Uid:"))
        assert uid_line.split()[1:] == ["65534"] * 4
    ok(ma(home, "halt", "helper"))
    _until_gone(passt)
    ok(ma(home, "start", "helper"))
    status = json.loads(status_file.read_text())
    passt, supervisor = status["network_helper"]["pid"], status["supervisor_pid"]
    assert _alive(passt)
    os.kill(supervisor, signal.SIGKILL)
    _until_gone(passt)
    assert _alive(status["vmm_pid"])
    ok(ma(home, "kill", "helper"))
    _until_gone(status["vmm_pid"])
