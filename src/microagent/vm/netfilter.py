"""The guest's frames on their way to passt: the host's loopback is never a destination.

passt turns each connection a guest frame opens into a host socket to the frame's
destination address. The one in Debian 12 (0.0~git20230309) does that for 127.0.0.1 too,
with or without ``--no-map-gw``: a guest root that writes an Ethernet frame itself
(``AF_PACKET``) reaches a service bound to the host's loopback. So the supervisor sits
between QEMU and passt (:class:`FrameRelay`, two threads) and looks at the destination
of every frame the guest sends (:func:`verdict`):

- never passed, in any mode: IPv4 ``127.0.0.0/8`` and ``0.0.0.0/8`` (Linux connects
  ``0.0.0.0`` to the local host), IPv6 ``::/96`` (``::``, ``::1``, IPv4-compatible) and
  ``::ffff:0:0/96`` (IPv4-mapped, which a host socket would reach 127.0.0.1 through);
- by default (``--network user``) also new connections to the gateway (10.0.2.2): passt's
  ``--no-map-gw`` would send them to whatever 10.0.2.2 is on the host's own network.
  TCP segments of connections already open pass, because a published port's connection
  reaches the guest from the gateway's address and the guest answers there;
- to the DNS address (10.0.2.3) only DNS over UDP, which passt forwards to the host's
  resolver; it does not forward TCP (a resolver's retry after a truncated answer), which
  would go to whatever 10.0.2.3 is on the host's network;
- ARP, IPv4 and IPv6 only (passt ignores other types; VLAN tags included).

A refused TCP connection attempt (a SYN) gets a RST back, so the guest's ``connect``
fails at once with "connection refused" instead of waiting for its SYN timeouts; other
refused frames are dropped. Frames from passt to the guest are copied as they are.
The framing on both sockets is QEMU's ``-netdev stream``: a 32-bit big-endian length,
then the Ethernet frame.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

ETH_HEADER = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD
PROTO_TCP = 6
PROTO_UDP = 17
TCP_SYN, TCP_RST, TCP_ACK = 0x02, 0x04, 0x10
MAX_FRAME = 65536 + 4096  # QEMU's NET_BUFSIZE: no frame it sends is longer
CHUNK = 256 * 1024
HEADERS = 128  # Ethernet + the longest IPv4 header + TCP's first 14 bytes fit


class Verdict(enum.Enum):
    """What happens to one guest frame."""

    PASS = "pass"
    DROP = "drop"
    REFUSE = "refuse"  # a TCP SYN: dropped, and answered with a RST


@dataclass(frozen=True)
class FramePolicy:
    """Which destinations a guest may open connections to, besides the host's loopback
    (never). ``gateway``: the IPv4 address whose new connections are refused (the
    default mode); None when the gateway is the way to the host's loopback (opt-in).
    ``dns``: the IPv4 address that only takes DNS over UDP."""

    gateway: bytes | None = None
    dns: bytes | None = None


def _blocked_v4(address: bytes) -> bool:
    return address[0] in (0, 127)


def _blocked_v6(address: bytes) -> bool:
    if address[:12] == bytes(12):
        return True  # ::, ::1 and the IPv4-compatible ::a.b.c.d
    return address[:12] == bytes(10) + b"\xff\xff"  # IPv4-mapped


def _is_syn(flags: int) -> bool:
    return bool(flags & TCP_SYN) and not flags & TCP_ACK


def verdict(frame: bytes, policy: FramePolicy) -> Verdict:
    """The fate of one Ethernet frame the guest sent (see the module docstring). Pure."""
    if len(frame) < ETH_HEADER:
        return Verdict.DROP
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == ETHERTYPE_ARP:
        return Verdict.PASS
    if ethertype == ETHERTYPE_IPV4:
        if len(frame) < ETH_HEADER + 20:
            return Verdict.DROP
        ihl = (frame[ETH_HEADER] & 0x0F) * 4
        protocol = frame[ETH_HEADER + 9]
        destination = frame[ETH_HEADER + 16:ETH_HEADER + 20]
        flags = _tcp_flags(frame, ETH_HEADER + ihl) if protocol == PROTO_TCP else None
        if _blocked_v4(destination):
            return Verdict.REFUSE if flags is not None and _is_syn(flags) else Verdict.DROP
        if policy.gateway is not None and destination == policy.gateway:
            if flags is None:
                return Verdict.DROP
            return Verdict.REFUSE if _is_syn(flags) else Verdict.PASS
        if policy.dns is not None and destination == policy.dns:
            if protocol == PROTO_UDP and _udp_port(frame, ETH_HEADER + ihl) == 53:
                return Verdict.PASS
            return Verdict.REFUSE if flags is not None and _is_syn(flags) else Verdict.DROP
        return Verdict.PASS
    if ethertype == ETHERTYPE_IPV6:
        if len(frame) < ETH_HEADER + 40:
            return Verdict.DROP
        if _blocked_v6(frame[ETH_HEADER + 24:ETH_HEADER + 40]):
            return Verdict.DROP
        return Verdict.PASS
    return Verdict.DROP


def _udp_port(frame: bytes, offset: int) -> int | None:
    """The UDP header's destination port at ``offset``, if the frame has it."""
    if len(frame) < offset + 4:
        return None
    return int.from_bytes(frame[offset + 2:offset + 4], "big")


def _tcp_flags(frame: bytes, offset: int) -> int | None:
    """The TCP header's flags at ``offset``, None when the frame is too short for them."""
    if len(frame) < offset + 14:
        return None
    return frame[offset + 13]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_reset(frame: bytes) -> bytes:
    """The RST|ACK that refuses the IPv4 TCP SYN ``frame``, as its destination would send
    it: Ethernet and IP addresses and ports swapped, acknowledging the SYN."""
    ihl = (frame[ETH_HEADER] & 0x0F) * 4
    ip = frame[ETH_HEADER:ETH_HEADER + ihl]
    tcp = frame[ETH_HEADER + ihl:ETH_HEADER + ihl + 20]
    source, destination = ip[12:16], ip[16:20]
    sport, dport, seq = struct.unpack("!HHI", tcp[:8])
    payload = len(frame) - ETH_HEADER - ihl - (tcp[12] >> 4) * 4
    ack = (seq + 1 + max(0, payload)) & 0xFFFFFFFF
    header = struct.pack("!HHIIBBHHH", dport, sport, 0, ack, 5 << 4, TCP_RST | TCP_ACK,
                         0, 0, 0)
    pseudo = destination + source + struct.pack("!BBH", 0, PROTO_TCP, len(header))
    header = header[:16] + struct.pack("!H", _checksum(pseudo + header)) + header[18:]
    ip_header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(header), 0, 0x4000, 64,
                            PROTO_TCP, 0, destination, source)
    ip_header = ip_header[:10] + struct.pack("!H", _checksum(ip_header)) + ip_header[12:]
    ethernet = frame[6:12] + frame[0:6] + frame[12:14]
    return ethernet + ip_header + header


def guest_announcement(mac: str, address: str) -> bytes:
    """A gratuitous ARP from the guest (``mac``, ``address``), framed: the first thing a
    new passt gets. passt sends to the MAC it last saw a guest frame from and knows none
    until then: a guest that is not booting (re-attached, restored) may send nothing for a
    long time, and a published port's connections would go nowhere meanwhile."""
    hardware = bytes.fromhex(mac.replace(":", ""))
    ip = socket.inet_aton(address)
    arp = struct.pack("!HHBBH", 1, ETHERTYPE_IPV4, 6, 4, 1) + hardware + ip + bytes(6) + ip
    return _framed(b"\xff" * 6 + hardware + struct.pack("!H", ETHERTYPE_ARP) + arp)


def _framed(frame: bytes) -> bytes:
    return len(frame).to_bytes(4, "big") + frame


class FrameRelay:
    """Frames between QEMU's socket (``vmm``) and passt's (``helper``), filtered on their
    way out of the guest. Two daemon threads; :meth:`close` ends both and closes the
    sockets. When either side goes away, the other is shut down too (QEMU then sees the
    link's peer gone; passt, started with ``--fd``, exits).

    With ``link`` instead of ``vmm``, the first thread makes QEMU's socket itself: QEMU
    listens for the link (it starts at the same moment), so ``link(closing)`` connects,
    retrying until it is there; None when :meth:`close` came first. ``announce`` goes to
    passt once the link is there, before any frame of the guest's."""

    def __init__(self, vmm: socket.socket | None, helper: socket.socket, policy: FramePolicy,
                 link: Callable[[threading.Event], socket.socket | None] | None = None,
                 announce: bytes = b"") -> None:
        self.vmm = vmm
        self.announce = announce  # sent to passt first (guest_announcement)
        self.helper = helper
        self.policy = policy
        self.refused = 0  # guest frames refused or dropped
        self._link = link
        self._closing = threading.Event()
        self._linked = threading.Event()  # QEMU's socket is connected
        if vmm is not None:
            self._linked.set()
        # passt's frames and the RSTs share the socket to QEMU: each write is whole frames
        self._to_vmm = threading.Lock()
        self._threads = [threading.Thread(target=self._guarded, args=(run,), daemon=True,
                                          name=f"microagent-net{run.__name__}")
                         for run in (self._from_guest, self._to_guest)]

    def start(self) -> None:
        """Start relaying."""
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop relaying in both directions and close both sockets."""
        self._closing.set()
        self._linked.set()  # a thread waiting for the link: there will be none
        self._shut()
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(5)
        if self.vmm is not None:
            self.vmm.close()
        self.helper.close()

    def _shut(self) -> None:
        for sock in (self.vmm, self.helper):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _guarded(self, run: Callable[[], None]) -> None:
        try:
            run()
        except (OSError, ValueError):
            pass  # a peer went away, or close() shut the sockets
        finally:
            self._shut()

    def _connect(self) -> socket.socket:
        """QEMU's socket, connected (``link``) or given."""
        if self.vmm is None and self._link is not None:
            sock = self._link(self._closing)
            with self._to_vmm:
                if sock is not None and self._closing.is_set():
                    sock.close()
                    sock = None
                self.vmm = sock
            self._linked.set()
        if self.vmm is None:
            raise OSError("the relay was closed before QEMU's link was connected")
        return self.vmm

    def _from_guest(self) -> None:
        vmm = self._connect()
        if self.announce:
            self.helper.sendall(self.announce)
        buffer = bytearray()
        while True:
            chunk = vmm.recv(CHUNK)
            if not chunk:
                return
            buffer += chunk
            passed: list[tuple[int, int]] = []  # runs of frames that pass, as offsets
            offset = 0
            while len(buffer) - offset >= 4:
                end = offset + 4 + int.from_bytes(buffer[offset:offset + 4], "big")
                if end - offset - 4 > MAX_FRAME:
                    raise ValueError(f"a frame of {end - offset - 4} bytes from QEMU")
                if end > len(buffer):
                    break
                # the headers are in the first bytes; the rest is only copied
                decision = verdict(bytes(buffer[offset + 4:min(end, offset + 4 + HEADERS)]),
                                   self.policy)
                if decision is Verdict.PASS:
                    if passed and passed[-1][1] == offset:
                        passed[-1] = (passed[-1][0], end)
                    else:
                        passed.append((offset, end))
                else:
                    self.refused += 1
                    if decision is Verdict.REFUSE:
                        self._send_to_guest(_framed(tcp_reset(bytes(buffer[offset + 4:end]))))
                offset = end
            with memoryview(buffer) as view:
                for start, end in passed:
                    with view[start:end] as run:
                        self.helper.sendall(run)
            del buffer[:offset]

    def _send_to_guest(self, data: bytes | memoryview) -> None:
        self._linked.wait()
        with self._to_vmm:
            if self.vmm is None:
                raise OSError("no link to QEMU")
            self.vmm.sendall(data)

    def _to_guest(self) -> None:
        buffer = bytearray()  # starts with a whole frame: partial ones wait here
        while True:
            chunk = self.helper.recv(CHUNK)
            if not chunk:
                return
            buffer += chunk
            whole = _whole_frames(buffer)
            if whole:
                with memoryview(buffer) as view, view[:whole] as frames:
                    self._send_to_guest(frames)
                del buffer[:whole]


def _whole_frames(buffer: bytearray) -> int:
    """How many bytes at the start of ``buffer`` are whole frames."""
    offset = 0
    while len(buffer) - offset >= 4:
        end = offset + 4 + int.from_bytes(buffer[offset:offset + 4], "big")
        if end > len(buffer):
            break
        offset = end
    return offset
