"""The frame filter between QEMU and passt: which guest frames pass, the RST that refuses a
connection, the relay's framing both ways, and the real passt behind it (no VM: the
frames are made here, as a guest root could make them with AF_PACKET)."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.vm.netfilter import (
    TCP_ACK,
    TCP_RST,
    TCP_SYN,
    FramePolicy,
    FrameRelay,
    Verdict,
    _checksum,
    guest_announcement,
    tcp_reset,
    verdict,
)

GUEST_MAC = bytes.fromhex("525400123456")
PASST_MAC = bytes.fromhex("02fc00000001")
GATEWAY = socket.inet_aton("10.0.2.2")
DNS = socket.inet_aton("10.0.2.3")
DEFAULT = FramePolicy(gateway=GATEWAY, dns=DNS)
OPT_IN = FramePolicy(gateway=None, dns=DNS)


def ipv4(destination: str, protocol: int, payload: bytes, *, options: bytes = b"",
         source: str = "10.0.2.15") -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45 + len(options) // 4, 0,
                         20 + len(options) + len(payload), 1, 0, 64, protocol, 0,
                         socket.inet_aton(source), socket.inet_aton(destination)) + options
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return PASST_MAC + GUEST_MAC + b"\x08\x00" + header + payload


def tcp(destination: str, port: int, flags: int = TCP_SYN, *, sport: int = 40000,
        seq: int = 1000, options: bytes = b"") -> bytes:
    segment = struct.pack("!HHIIBBHHH", sport, port, seq, 0, 5 << 4, flags, 65535, 0, 0)
    pseudo = (socket.inet_aton("10.0.2.15") + socket.inet_aton(destination)
              + struct.pack("!BBH", 0, 6, len(segment)))
    segment = segment[:16] + struct.pack("!H", _checksum(pseudo + segment)) + segment[18:]
    return ipv4(destination, 6, segment, options=options)


def udp(destination: str, port: int) -> bytes:
    return ipv4(destination, 17, struct.pack("!HHHH", 33333, port, 12, 0) + b"abcd")


def ipv6(destination: str, next_header: int = 6) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, 20, next_header, 64,
                         socket.inet_pton(socket.AF_INET6, "fd00::2"),
                         socket.inet_pton(socket.AF_INET6, destination))
    return PASST_MAC + GUEST_MAC + b"\x86\xdd" + header + bytes(20)


def arp_request(target: str) -> bytes:
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + \
        socket.inet_aton("10.0.2.15") + bytes(6) + socket.inet_aton(target)
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + body


def framed(*frames: bytes) -> bytes:
    return b"".join(len(f).to_bytes(4, "big") + f for f in frames)


@pytest.mark.parametrize(("frame", "policy", "expected"), [
    (arp_request("10.0.2.2"), DEFAULT, Verdict.PASS),
    (tcp("198.18.0.2", 80), DEFAULT, Verdict.PASS),
    (udp("10.0.2.3", 53), DEFAULT, Verdict.PASS),  # DNS, forwarded by passt
    (udp("10.0.2.3", 53), OPT_IN, Verdict.PASS),
    # ... only over UDP: passt would send the rest to whatever 10.0.2.3 is outside
    (tcp("10.0.2.3", 53), DEFAULT, Verdict.REFUSE),
    (tcp("10.0.2.3", 53), OPT_IN, Verdict.REFUSE),
    (tcp("10.0.2.3", 53, TCP_ACK), OPT_IN, Verdict.DROP),
    (udp("10.0.2.3", 5353), OPT_IN, Verdict.DROP),
    (ipv4("10.0.2.3", 1, bytes(8)), OPT_IN, Verdict.DROP),
    # the host's loopback, in every mode
    (tcp("127.0.0.1", 80), DEFAULT, Verdict.REFUSE),
    (tcp("127.0.0.1", 80), OPT_IN, Verdict.REFUSE),
    (tcp("127.8.9.10", 22), OPT_IN, Verdict.REFUSE),
    (tcp("0.0.0.0", 80), DEFAULT, Verdict.REFUSE),  # Linux connects 0.0.0.0 to the host
    (tcp("127.0.0.1", 80, TCP_ACK), OPT_IN, Verdict.DROP),
    (udp("127.0.0.53", 53), OPT_IN, Verdict.DROP),
    (ipv4("127.0.0.1", 1, bytes(8)), OPT_IN, Verdict.DROP),
    (tcp("127.0.0.1", 80, options=bytes(4)), DEFAULT, Verdict.REFUSE),  # IP options
    # the gateway: new connections refused by default, replies of published ones pass
    (tcp("10.0.2.2", 8080), DEFAULT, Verdict.REFUSE),
    (tcp("10.0.2.2", 8080, TCP_SYN | TCP_ACK), DEFAULT, Verdict.PASS),
    (tcp("10.0.2.2", 8080, TCP_ACK), DEFAULT, Verdict.PASS),
    (udp("10.0.2.2", 53), DEFAULT, Verdict.DROP),
    (tcp("10.0.2.2", 8080), OPT_IN, Verdict.PASS),
    (udp("10.0.2.2", 53), OPT_IN, Verdict.PASS),
    # IPv6: loopback, unspecified, IPv4-compatible and -mapped never pass
    (ipv6("::1"), OPT_IN, Verdict.DROP),
    (ipv6("::"), OPT_IN, Verdict.DROP),
    (ipv6("::127.0.0.1"), OPT_IN, Verdict.DROP),
    (ipv6("::ffff:127.0.0.1"), OPT_IN, Verdict.DROP),
    (ipv6("::ffff:198.18.0.2"), OPT_IN, Verdict.DROP),
    (ipv6("2001:db8::1"), DEFAULT, Verdict.PASS),
    (ipv6("fe80::1", 58), DEFAULT, Verdict.PASS),
    # what passt would not read anyway
    (PASST_MAC + GUEST_MAC + b"\x81\x00" + bytes(50), OPT_IN, Verdict.DROP),  # VLAN
    (PASST_MAC + GUEST_MAC + b"\x08\x00" + bytes(10), OPT_IN, Verdict.DROP),  # cut short
    (b"\x00" * 10, OPT_IN, Verdict.DROP),
])
def test_verdicts(frame: bytes, policy: FramePolicy, expected: Verdict) -> None:
    assert verdict(frame, policy) is expected


def test_the_reset_answers_the_syn_as_its_destination_would() -> None:
    syn = tcp("127.0.0.1", 8080, sport=41000, seq=0xFFFFFFFF)
    reset = tcp_reset(syn)
    assert reset[:6] == GUEST_MAC and reset[6:12] == PASST_MAC and reset[12:14] == b"\x08\x00"
    ip, segment = reset[14:34], reset[34:]
    assert _checksum(ip) == 0  # the header checks out
    assert (socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])) == ("127.0.0.1",
                                                                          "10.0.2.15")
    sport, dport, seq, ack, _, flags = struct.unpack("!HHIIBB", segment[:14])
    assert (sport, dport, seq, ack) == (8080, 41000, 0, 0)  # seq + 1, wrapped
    assert flags == TCP_RST | TCP_ACK
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(segment))
    assert _checksum(pseudo + segment) == 0


@pytest.fixture
def relayed() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(QEMU's end, passt's end) with a relay between them, default policy."""
    vmm, relay_vmm = socket.socketpair()
    relay_helper, helper = socket.socketpair()
    relay = FrameRelay(relay_vmm, relay_helper, DEFAULT)
    relay.start()
    for sock in (vmm, helper):
        sock.settimeout(10)
    yield vmm, helper
    relay.close()
    vmm.close()
    helper.close()


class FrameReader:
    """Whole frames from one end of a link, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    def next(self, count: int = 1) -> list[bytes]:
        frames: list[bytes] = []
        while len(frames) < count:
            if len(self.data) >= 4:
                end = 4 + int.from_bytes(self.data[:4], "big")
                if len(self.data) >= end:
                    frames.append(self.data[4:end])
                    self.data = self.data[end:]
                    continue
            chunk = self.sock.recv(65536)
            assert chunk, "the link closed"
            self.data += chunk
        return frames


def test_the_relay_passes_filters_and_answers_in_whole_frames(
        relayed: tuple[socket.socket, socket.socket]) -> None:
    vmm, helper = relayed
    arp, web, loop, gateway_reply = (arp_request("10.0.2.2"), tcp("198.18.0.2", 80),
                                     tcp("127.0.0.1", 22), tcp("10.0.2.2", 8080, TCP_ACK))
    data = tcp("198.18.0.2", 80, TCP_ACK) + bytes(1400)
    stream = framed(arp, web, loop, udp("127.0.0.53", 53), gateway_reply, data)
    for start in range(0, len(stream), 77):  # frames split anywhere
        vmm.sendall(stream[start:start + 77])
    assert FrameReader(helper).next(4) == [arp, web, gateway_reply, data]
    # passt's frames reach QEMU whole, however passt's writes are cut, and the RST for
    # the SYN to 127.0.0.1 comes between two of them, never inside one
    big = bytes(range(256)) * 200
    to_guest = framed(big, big)
    helper.sendall(to_guest[:1000])
    vmm.sendall(framed(tcp("127.0.0.1", 23)))
    helper.sendall(to_guest[1000:])
    frames = FrameReader(vmm).next(4)
    assert [f for f in frames if f != big] == [tcp_reset(loop), tcp_reset(tcp("127.0.0.1", 23))]
    assert frames.count(big) == 2


def test_when_passt_goes_the_relay_closes_qemus_end(
        relayed: tuple[socket.socket, socket.socket]) -> None:
    vmm, helper = relayed
    helper.close()
    assert vmm.recv(10) == b""


@pytest.fixture
def passt_behind_relay(request: pytest.FixtureRequest
                       ) -> Iterator[tuple[socket.socket, FrameRelay]]:
    """A real passt (``request.param``: host loopback opted in or not) behind a relay;
    yields QEMU's end."""
    from microagent.vm.passt import PasstSpec, passt_argv

    if shutil.which("passt") is None:
        pytest.skip("passt is not installed (install.sh installs it)")
    host_loopback: bool = request.param
    vmm, relay_vmm = socket.socketpair()
    relay_helper, helper = socket.socketpair()
    process = subprocess.Popen(passt_argv(PasstSpec(helper.fileno(), host_loopback)),
                               pass_fds=(helper.fileno(),), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    helper.close()
    relay = FrameRelay(relay_vmm, relay_helper, OPT_IN if host_loopback else DEFAULT)
    relay.start()
    vmm.settimeout(10)
    yield vmm, relay
    relay.close()
    vmm.close()
    process.wait(10)


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.settimeout(10)
    return sock


@pytest.mark.parametrize("passt_behind_relay", [True], indirect=True)
def test_a_hand_made_frame_to_127_0_0_1_never_reaches_the_host(
        passt_behind_relay: tuple[socket.socket, FrameRelay]) -> None:
    """Opted in to the host's loopback, 10.0.2.2 reaches it; a frame addressed to
    127.0.0.1 itself still does not (passt alone would connect it: see netfilter.py)."""
    vmm, _ = passt_behind_relay
    secret, allowed = listener(), listener()
    secret_port, allowed_port = secret.getsockname()[1], allowed.getsockname()[1]
    try:
        vmm.sendall(framed(tcp("127.0.0.1", secret_port, sport=40001),
                           tcp("10.0.2.2", allowed_port, sport=40002)))
        allowed.accept()[0].close()  # passt connected the second frame's connection ...
        secret.setblocking(False)
        with pytest.raises(BlockingIOError):  # ... and was never given the first
            secret.accept()
    finally:
        secret.close()
        allowed.close()


@pytest.mark.parametrize("passt_behind_relay", [False], indirect=True)
def test_by_default_the_gateway_refuses_at_once(
        passt_behind_relay: tuple[socket.socket, FrameRelay]) -> None:
    vmm, relay = passt_behind_relay
    syn = tcp("10.0.2.2", 8080, sport=40003)
    vmm.sendall(framed(syn))
    reader = FrameReader(vmm)
    while reader.next()[0] != tcp_reset(syn):  # passt's own frames, if any, may come first
        pass
    assert relay.refused == 1


def test_a_relay_that_connects_later_announces_the_guest_first(tmp_path: Path) -> None:
    """The link's QEMU end is a socket QEMU listens on from a moment after it starts (and
    again after a supervisor is lost): the relay connects once it is there; passt gets
    the guest's gratuitous ARP first (so that it knows where to send), then the guest's
    frames; QEMU gets passt's."""
    path = tmp_path / "net.sock"

    def link(closing: threading.Event) -> socket.socket | None:
        while not closing.is_set():
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(str(path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                closing.wait(0.01)
        return None

    relay_helper, helper = socket.socketpair()
    helper.settimeout(10)
    announcement = guest_announcement("52:54:00:12:34:56", "10.0.2.15")
    relay = FrameRelay(None, relay_helper, DEFAULT, link=link, announce=announcement)
    relay.start()
    with socket.socket(socket.AF_UNIX) as listener:  # QEMU, listening only now
        listener.bind(str(path))
        listener.listen(1)
        vmm, _ = listener.accept()
    with vmm:
        vmm.settimeout(10)
        vmm.sendall(framed(arp_request("10.0.2.2")))
        (first, second) = FrameReader(helper).next(2)
        assert framed(first) == announcement
        assert first[:6] == b"\xff" * 6 and first[6:12] == GUEST_MAC  # passt learns the MAC
        assert first[12:14] == b"\x08\x06" and first[-4:] == socket.inet_aton("10.0.2.15")
        assert second == arp_request("10.0.2.2")
        helper.sendall(framed(b"\x00" * 60))
        assert FrameReader(vmm).next() == [b"\x00" * 60]
    relay.close()
    helper.close()


def test_a_relay_closed_before_qemu_listens_ends_quietly() -> None:
    relay_helper, helper = socket.socketpair()
    asked = threading.Event()

    def never(closing: threading.Event) -> socket.socket | None:
        asked.set()
        closing.wait(30)
        return None

    relay = FrameRelay(None, relay_helper, DEFAULT, link=never)
    relay.start()
    assert asked.wait(10)
    relay.close()  # does not wait for a link that will never come
    assert helper.recv(1) == b""  # passt's end closed: it exits
    helper.close()
