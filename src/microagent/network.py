"""Published ports: ``--publish [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp]``.

Each ``--publish`` becomes a :class:`PublishedPort`, recorded with the workspace. The QEMU
backend turns them into ``hostfwd=`` rules of the user-mode network (``-netdev user``):
QEMU listens on the host address and port, and forwards each connection to the guest's
port. The host side binds 127.0.0.1 unless the user names another address, so a
workspace's services are not exposed beyond the host by default.

A host port is checked before each launch (:func:`check_ports_free`: bind it the way
QEMU will, ``SO_REUSEADDR`` included); if it is taken anyway in the moment between the
check and QEMU's own bind, QEMU exits with "Could not set up host forwarding rule", which
:func:`port_failure` turns into the same message.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from microagent.errors import ConflictError, UsageError

DEFAULT_HOST_IP = "127.0.0.1"
PROTOCOLS = ("tcp",)
FORM = "[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp]"
_PORT = re.compile(r"[0-9]{1,5}")
_HOSTFWD_FAILURE = re.compile(r"Could not set up host forwarding rule '?tcp:([^:']*):(\d+)-")


@dataclass(frozen=True)
class PublishedPort:
    """One host TCP port forwarded to a guest port."""

    host_ip: str
    host_port: int
    guest_port: int
    protocol: str = "tcp"

    @property
    def flag(self) -> str:
        """The flag as a user would write it, for messages."""
        return f"--publish {self.host_ip}:{self.host_port}:{self.guest_port}/{self.protocol}"

    def describe(self) -> str:
        """``127.0.0.1:8080 -> 80/tcp``, for status."""
        return f"{self.host_ip}:{self.host_port} -> {self.guest_port}/{self.protocol}"

    def to_json(self) -> dict[str, Any]:
        """The record's shape (also ``--json``)."""
        return {"host_ip": self.host_ip, "host_port": self.host_port,
                "guest_port": self.guest_port, "protocol": self.protocol}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PublishedPort:
        """Inverse of :meth:`to_json`."""
        return cls(host_ip=str(doc["host_ip"]), host_port=int(doc["host_port"]),
                   guest_port=int(doc["guest_port"]), protocol=str(doc.get("protocol", "tcp")))


# --- parsing and validation (pure) -----------------------------------------------------


def parse_publish(value: str) -> PublishedPort:
    """``[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp]``; the host address defaults to 127.0.0.1."""
    rest, slash, protocol = value.partition("/")
    protocol = protocol.lower() if slash else "tcp"
    if protocol not in PROTOCOLS:
        if protocol in ("udp", "sctp"):
            raise UsageError(f"invalid --publish {value!r}: only tcp ports can be "
                             f"published, not {protocol}", hint=f"use --publish {FORM}")
        raise UsageError(f"invalid --publish {value!r}: unknown protocol {protocol!r}",
                         hint=f"use --publish {FORM}")
    parts = rest.split(":")
    if len(parts) == 2:
        host_ip, host, guest = DEFAULT_HOST_IP, parts[0], parts[1]
    elif len(parts) == 3:
        host_ip, host, guest = parts
    else:
        raise UsageError(f"invalid --publish {value!r}", hint=f"use --publish {FORM}")
    if not _PORT.fullmatch(host) or not _PORT.fullmatch(guest):
        raise UsageError(f"invalid --publish {value!r}: ports are numbers",
                         hint=f"use --publish {FORM}")
    return PublishedPort(_host_address(host_ip, value),
                         _port(host, "host", value), _port(guest, "guest", value), protocol)


def _host_address(text: str, value: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"invalid --publish {value!r}: {text!r} is not an IPv4 address",
                         hint="name a host address such as 127.0.0.1 or 0.0.0.0 (all)") from None
    if address.version != 4:
        raise UsageError(f"invalid --publish {value!r}: only IPv4 host addresses are "
                         "supported", hint="use 127.0.0.1, another IPv4 address, or 0.0.0.0")
    return str(address)


def _port(text: str, side: str, value: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise UsageError(f"invalid --publish {value!r}: the {side} port {port} is out of "
                         "range (1-65535)")
    return port


def validate_ports(ports: Sequence[PublishedPort], network: str) -> None:
    """Refuse one host port published twice, and any publish without a network."""
    if ports and network == "none":
        raise UsageError(f"{ports[0].flag} needs a network, and --network none has none",
                         hint="drop --publish, or use --network user")
    seen: dict[int, PublishedPort] = {}
    for port in ports:
        if port.protocol not in PROTOCOLS:
            raise UsageError(f"{port.flag}: only tcp ports can be published")
        other = seen.get(port.host_port)
        if other is not None:
            raise UsageError(f"host port {port.host_port} is published twice ({other.flag} "
                             f"and {port.flag})", hint="publish each host port once")
        seen[port.host_port] = port


# --- at start -----------------------------------------------------------------------


def check_ports_free(ports: Sequence[PublishedPort]) -> None:
    """Bind each host address and port as QEMU will, and release it; refuse a taken one."""
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # QEMU's slirp sets SO_REUSEADDR too: a port in TIME_WAIT is free for both
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((port.host_ip, port.host_port))
            sock.listen(1)  # what conflicts with another listener on Linux
        except OSError as e:
            raise port_error(port.host_ip, port.host_port, e.errno) from e
        finally:
            sock.close()


def port_error(host_ip: str, host_port: int, err: int | None = errno.EADDRINUSE
               ) -> ConflictError:
    """The one message for a host port that cannot be published."""
    where = f"{host_ip}:{host_port}"
    if err == errno.EADDRNOTAVAIL:
        return ConflictError(f"cannot publish host port {host_port}: {host_ip} is not an "
                             "address of this host", hint="use 127.0.0.1, 0.0.0.0 or one of "
                             "the host's own addresses")
    if err == errno.EACCES:
        return ConflictError(f"cannot publish host port {host_port} on {host_ip}: a port "
                             "below 1024 needs privileges", hint="publish a host port of 1024 "
                             "or more")
    return ConflictError(f"host port {host_port} is already in use ({where})",
                         hint=f"free the port, or publish another one (`ss -ltnp "
                         f"'sport = :{host_port}'` shows who holds it)")


def port_failure(vmm_output: str) -> ConflictError | None:
    """QEMU's "Could not set up host forwarding rule" as :func:`port_error`, else None."""
    match = _HOSTFWD_FAILURE.search(vmm_output)
    if match is None:
        return None
    return port_error(match.group(1) or "0.0.0.0", int(match.group(2)))
