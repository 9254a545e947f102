"""The output port's reader (``agent._PortReader``): finding one exec's output between
its preamble and its end marker however the bytes are cut into reads. Pure host code: a
socketpair stands in for the port's connection."""

from __future__ import annotations

import itertools
import socket
import time

import pytest

from microagent.vm.agent import _PortReader
from microagent.vm.protocol import ProtocolError

NONCE = "5" * 32
PREAMBLE = f"microagent-out {NONCE}\n".encode()
END = f"\0microagent-end {NONCE}\n".encode()


def read_in_pieces(stream: bytes, cuts: list[int]) -> tuple[bytes, list[bytes], bool]:
    """Send ``stream`` cut at ``cuts``, each piece read by the reader on its own; what
    the sink got, the sink's calls, and whether the end was seen."""
    reader_sock, writer = socket.socketpair()
    out: list[bytes] = []
    reader = _PortReader(reader_sock, NONCE, out.append)
    edges = [0, *cuts, len(stream)]
    try:
        for start, stop in itertools.pairwise(edges):
            if start == stop:
                continue
            writer.sendall(stream[start:stop])
            reader_sock.settimeout(5)
            reader.receive()
        return b"".join(out), out, reader.ended
    finally:
        reader_sock.close()
        writer.close()


@pytest.mark.parametrize("output", [
    b"hello\n",
    b"",
    b"ends with a NUL\0",
    b"\0microagent-end " + b"6" * 32 + b"\n",  # another exec's marker is output
    b"almost the marker\0microagent-end " + NONCE[:10].encode(),
    bytes(range(256)) * 40,
])
def test_output_between_preamble_and_end_whatever_the_cuts(output: bytes) -> None:
    stream = b"left over\0micro" + PREAMBLE + output + END
    start = len(stream) - len(END) - len(output) - 3
    for cut in range(max(0, start), len(stream)):  # every cut near and in the marker
        got, _, ended = read_in_pieces(stream, [cut])
        assert got == output and ended, cut
    got, _, ended = read_in_pieces(stream, list(range(1, len(stream))))  # byte by byte
    assert got == output and ended


def test_text_is_passed_on_at_once() -> None:
    """Only a possible start of the marker (NUL first) waits for the next read."""
    _, calls, ended = read_in_pieces(PREAMBLE + b"progress 10%\r", [])
    assert calls == [b"progress 10%\r"] and not ended
    _, calls, ended = read_in_pieces(PREAMBLE + b"bin\0mic", [])
    assert calls == [b"bin"] and not ended


def test_bytes_after_the_end_are_not_this_execs() -> None:
    got, _, ended = read_in_pieces(PREAMBLE + b"mine" + END + b"microagent-out next", [])
    assert got == b"mine" and ended


def test_a_port_that_closes_early_is_an_error() -> None:
    reader_sock, writer = socket.socketpair()
    out: list[bytes] = []
    reader = _PortReader(reader_sock, NONCE, out.append)
    writer.sendall(PREAMBLE + b"partial")
    writer.close()
    with pytest.raises(ProtocolError, match="closed before the end of stdout"):
        reader.finish(deadline=time.monotonic() + 10)
    assert b"".join(out) == b"partial"
    reader_sock.close()


def test_abandon_keeps_what_came() -> None:
    """No marker coming (a killed exec whose processes kept the port): what is there,
    held-back bytes included, is the output."""
    reader_sock, writer = socket.socketpair()
    out: list[bytes] = []
    reader = _PortReader(reader_sock, NONCE, out.append)
    writer.sendall(PREAMBLE + b"cut off\0mi")
    reader.abandon()
    assert b"".join(out) == b"cut off\0mi"
    reader_sock.close()
    writer.close()
