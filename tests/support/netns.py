"""A network namespace joined to the host by a veth pair, and an HTTP server inside it.

The VM tests need a server the guest reaches on an address of this host that is not
loopback. One bound to the host's own interface would listen beyond the host; this one
listens only inside a namespace the test makes, reached through the veth pair: the host
side is ``198.18.N.1/30``, the namespace side ``198.18.N.2/30`` (RFC 2544's benchmarking
range, on no network here). Nothing leaves the machine. Needs root and ``ip``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SERVER = r"""
import http.server, sys
log = open(sys.argv[3], "a", buffering=1)
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        log.write(self.path + "\n")
        if self.path.startswith("/bytes/"):
            size = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = bytes(1 << 20)
            while size > 0:
                self.wfile.write(block[:min(size, len(block))])
                size -= len(block)
            return
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"pong\n")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])),
                                Handler).serve_forever()
"""


_COUNTER = itertools.count()


def _ip(*args: str) -> None:
    run = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {run.stderr.strip()}")


class Netns:
    """A namespace ``ma-tN`` with a veth pair to the host; :meth:`close` removes both and
    ends every process started in it."""

    def __init__(self) -> None:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            pytest.skip("a network namespace needs root and iproute2")
        index = (os.getpid() * 7 + next(_COUNTER)) % 250 + 1
        self.name = f"ma-t{os.getpid() % 10000}-{index}"
        self.host_if, self.ns_if = f"mah{index}-{os.getpid() % 1000}", f"man{index}"
        self.host_address = f"198.18.{index}.1"
        self.address = f"198.18.{index}.2"
        self.processes: list[subprocess.Popen[bytes]] = []
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
                "netns", self.name)
            _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.ns_if)
            _ip("-n", self.name, "link", "set", self.ns_if, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def popen(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the namespace (ended by :meth:`close`)."""
        process = subprocess.Popen(["ip", "netns", "exec", self.name, *argv],  # type: ignore[call-overload]
                                   **kwargs)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)


class NetnsHttpServer:
    """An HTTP server on ``ADDRESS:PORT`` inside ``netns``: ``GET /bytes/N`` sends N zero
    bytes, anything else ``pong``; every request's path is logged (:meth:`requests`)."""

    def __init__(self, netns: Netns, log: Path, port: int = 8000) -> None:
        self.address, self.port, self.log = netns.address, port, log
        log.touch()
        self.process = netns.popen([sys.executable, "-c", SERVER, netns.address, str(port),
                                    str(log)], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), \
                    socket.create_connection((self.address, port), timeout=1):
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server in {netns.name} did not start")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def requests(self) -> list[str]:
        """The paths requested so far (the readiness probe above asked none)."""
        return self.log.read_text().split()
