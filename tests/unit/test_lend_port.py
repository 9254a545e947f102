"""The supervisor's answer that lends the output port: the descriptor arrives with the
line, and the control connection stays non-blocking for the event loop's relay."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
from pathlib import Path

from microagent.vm.control_server import send_answer


def test_the_lent_descriptor_comes_with_the_line_and_the_loop_keeps_its_mode(
        tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    seen: dict[str, bool] = {}

    async def scenario() -> tuple[bytes, list[int]]:
        served = asyncio.Event()
        lent, kept = socket.socketpair()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            send_answer(writer, b'{"ok": true}\n', lent)
            fd = writer.get_extra_info("socket").fileno()
            seen["nonblocking"] = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)
            writer.close()
            served.set()

        server = await asyncio.start_unix_server(serve, path=path)
        client = socket.socket(socket.AF_UNIX)
        try:
            client.connect(path)
            await served.wait()
            line, fds, _, _ = socket.recv_fds(client, 100, 2)
            # the descriptor is the lent connection: what goes in one end comes out here
            kept.sendall(b"through")
            with socket.socket(fileno=fds[0]) as received:
                assert received.recv(100) == b"through"
            return line, fds
        finally:
            client.close()
            lent.close()
            kept.close()
            server.close()

    line, fds = asyncio.run(scenario())
    assert line == b'{"ok": true}\n' and len(fds) == 1
    assert seen["nonblocking"]
