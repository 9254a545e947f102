"""The network flags: ``--network MODE`` and ``--publish [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp]``.

``--network`` is one of :data:`NETWORK_MODES`: ``user`` (the default: the guest is
10.0.2.15 behind passt's user-mode NAT and reaches what the host reaches, except the
host's loopback), ``user:host-loopback`` (the same, and the gateway 10.0.2.2 is the
host's 127.0.0.1, as QEMU's slirp made it for every workspace before) and ``none``
(loopback only). How the modes are built is :mod:`microagent.vm.passt` and
:mod:`microagent.vm.netfilter`.

Each ``--publish`` becomes a :class:`PublishedPort`, recorded with the workspace. passt
listens on the host address and port and forwards each connection to the guest's port.
The host side binds 127.0.0.1 unless the user names another address, so a workspace's
services are not exposed beyond the host by default.

A host port is checked before each launch (:func:`check_ports_free`: bind it the way
passt will, ``SO_REUSEADDR`` included); if it is taken anyway in the moment between the
check and passt's own bind, passt exits saying "Failed to bind any port", which
:func:`port_failure` turns into the same message.
"""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from microagent.errors import ConflictError, UsageError

NETWORK_MODES = ("user", "user:host-loopback", "none")
DEFAULT_NETWORK = "user"
DEFAULT_HOST_IP = "127.0.0.1"
PROTOCOLS = ("tcp",)
FORM = "[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp]"
_PORT = re.compile(r"[0-9]{1,5}")
# passt: "Failed to bind any port for '-t 127.0.0.1/8080:80', exiting"
_BIND_FAILURE = re.compile(r"Failed to bind any port for '-t ([0-9.]+)/(\d+)")


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


def validate_network(mode: str) -> str:
    """``mode`` if it is one of :data:`NETWORK_MODES`, else a usage error."""
    if mode not in NETWORK_MODES:
        raise UsageError(f"unknown network mode {mode!r}",
                         hint=f"choose one of: {', '.join(NETWORK_MODES)}")
    return mode


def has_network(mode: str) -> bool:
    """True for the modes with an interface beside loopback."""
    return mode != "none"


def reaches_host_loopback(mode: str) -> bool:
    """True when the workspace opted in to the host's loopback (through 10.0.2.2)."""
    return mode == "user:host-loopback"


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
        import ipaddress  # lazily: most commands never parse an address

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
    if ports and not has_network(network):
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
    """Bind each host address and port as passt will, and release it; refuse a taken one."""
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # passt sets SO_REUSEADDR too: a port in TIME_WAIT is free for both
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


def port_failure(helper_output: str) -> ConflictError | None:
    """passt's "Failed to bind any port" as :func:`port_error`, else None."""
    match = _BIND_FAILURE.search(helper_output)
    if match is None:
        return None
    return port_error(match.group(1), int(match.group(2)))
