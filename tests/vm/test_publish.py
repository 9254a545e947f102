"""Published ports on real microVMs: a guest server reached from the host, bound to
127.0.0.1 only by default, shown by status, and a host port taken at start.

QEMU boots the real Debian kernel with the real agent (TCG on this host); the busybox image
comes from the session's loopback registry and serves with busybox ``httpd``.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fixtures import PushedImage
from tests.vm.cli import ma, ok

pytestmark = pytest.mark.slow
GUEST_PORT = 8080
PAGE = "published from the guest\n"


def free_port() -> int:
    """A host TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch(host: str, port: int, path: str, timeout: float = 60) -> tuple[int, str]:
    """GET ``path``, retrying while the guest server is not up yet (slirp then accepts and
    closes at once), until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            response = conn.getresponse()
            return response.status, response.read().decode()
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"GET http://{host}:{port}{path} kept failing: {e!r}") from e
            time.sleep(0.5)
        finally:
            conn.close()


def non_loopback_address() -> str | None:
    """An IPv4 address of this host that is not loopback, if it has one."""
    if shutil.which("ip") is None:
        return None
    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True,
                         check=False).stdout
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            address = str(info.get("local", ""))
            if address and not address.startswith("127."):
                return address
    return None


def serve_page(home: Path, name: str) -> None:
    """Write /www/index.html and start busybox httpd on the guest port (it daemonizes)."""
    ok(ma(home, "exec", name, "--", "sh", "-c",
          f"mkdir -p /www && printf '{PAGE}' > /www/index.html"))
    ok(ma(home, "exec", name, "--", "sh", "-c", f"httpd -p {GUEST_PORT} -h /www"))


@pytest.fixture(scope="module")
def web(home: Path, busybox_image: PushedImage) -> Iterator[int]:
    """A running workspace ``web`` serving PAGE on the guest port, published; its host port."""
    port = free_port()
    ok(ma(home, "create", "web", "--image", busybox_image.ref, "--profile", "tiny",
          "--publish", f"{port}:{GUEST_PORT}"))
    ok(ma(home, "start", "web"))
    serve_page(home, "web")
    yield port
    ok(ma(home, "halt", "web"))


def test_a_guest_server_is_reached_through_the_published_port(web: int) -> None:
    assert fetch("127.0.0.1", web, "/index.html") == (200, PAGE)
    assert fetch("127.0.0.1", web, "/missing")[0] == 404


def test_the_default_binding_is_loopback_only(web: int) -> None:
    other = non_loopback_address()
    if other is None:
        pytest.skip("this host has no non-loopback IPv4 address to try the published port on")
    fetch("127.0.0.1", web, "/")  # the forward works, so a refusal below means the binding
    with pytest.raises(ConnectionRefusedError), \
            socket.create_connection((other, web), timeout=5):
        pass


def test_status_shows_the_network_and_the_ports(home: Path, web: int) -> None:
    status = json.loads(ok(ma(home, "--json", "status", "web")).stdout)
    assert status["network"] == "user"
    assert status["guest_address"] == "10.0.2.15"
    assert status["ports"] == [{"host_ip": "127.0.0.1", "host_port": web,
                                "guest_port": GUEST_PORT, "protocol": "tcp"}]
    text = ok(ma(home, "status", "web")).stdout.splitlines()
    assert "Network: user (guest 10.0.2.15)" in text
    assert f"Port: 127.0.0.1:{web} -> {GUEST_PORT}/tcp" in text
    listed = [line.split() for line in ok(ma(home, "list")).stdout.splitlines()]
    assert ["web", "running", "qemu", "tiny", "user", "never"] in listed


def test_a_taken_host_port_fails_start_clearly_and_leaves_it_startable(
        home: Path, busybox_image: PushedImage) -> None:
    port = free_port()
    ok(ma(home, "create", "taken", "--image", busybox_image.ref, "--profile", "tiny",
          "-p", f"{port}:{GUEST_PORT}"))
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen(1)
    try:
        result = ma(home, "start", "taken")
        assert result.returncode == 1, result
        assert f"host port {port} is already in use" in result.stderr, result.stderr
        as_json = ma(home, "--json", "start", "taken")
        error = json.loads(as_json.stdout)["error"]
        assert error["kind"] == "conflict" and str(port) in error["message"]
        assert json.loads(ok(ma(home, "--json", "status", "taken")).stdout)["state"] \
            == "prepared"
    finally:
        holder.close()
    ok(ma(home, "start", "taken"))
    serve_page(home, "taken")
    assert fetch("127.0.0.1", port, "/") == (200, PAGE)
    ok(ma(home, "halt", "taken"))
