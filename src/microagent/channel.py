"""The supervisor's end of the agent channel (asyncio): one connection to the guest,
shared by the supervisor's own requests and by relayed client streams.

Clients (``microagent exec``) connect to the supervisor's control socket and speak the
same protocol (``docs/protocol.md``) as if they spoke to the guest. The channel gives
each client stream a connection-wide id, forwards frames both ways with the ids
rewritten, and cancels a client's streams when it disconnects. Credit frames are
forwarded too, so flow control runs end to end: the guest never sends a client more than
the client has room for, and the supervisor buffers at most one window per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from microagent import __version__
from microagent.protocol import (
    DEFAULT_WINDOW,
    MAX_PAYLOAD,
    VERSION,
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolError,
    encode,
    encode_credit,
    encode_json,
)

TERMINAL_TYPES = frozenset({FrameType.EXIT, FrameType.ERROR})
HELLO_RETRY = 1.0


@dataclass
class LocalRequest:
    """A stream the supervisor itself opened: collects its answer."""

    done: asyncio.Future[Frame]
    started: dict[str, Any] | None = None
    output: bytearray = field(default_factory=bytearray)


@dataclass
class ClientRoute:
    """A client's stream: where its frames go and under which id."""

    writer: asyncio.StreamWriter
    local_id: int


class AgentChannel:
    """The guest connection of one boot."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.decoder = FrameDecoder()
        self.hello: dict[str, Any] | None = None
        self.hello_event = asyncio.Event()
        self.closed = asyncio.Event()
        self.ids = itertools.count(1, 2)
        self.routes: dict[int, LocalRequest | ClientRoute] = {}
        self.error: str | None = None

    # --- the guest side -------------------------------------------------------------

    async def connect(self, path: str, deadline: float) -> None:
        """Connect to the VMM's agent socket, retrying until it exists or ``deadline``."""
        while True:
            try:
                self.reader, self.writer = await asyncio.open_unix_connection(path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def handshake(self) -> dict[str, Any]:
        """Send HELLO (again every second until the guest has opened its port)."""
        hello = {"version": VERSION, "features": ["exec", "relay"],
                 "software": f"microagent-supervisor {__version__}",
                 "max_payload": MAX_PAYLOAD, "window": DEFAULT_WINDOW}
        while not self.hello_event.is_set():
            self._send(encode_json(FrameType.HELLO, 0, hello))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hello_event.wait(), HELLO_RETRY)
            if self.closed.is_set():
                raise ProtocolError(self.error or "agent channel closed")
        if self.hello is None or self.hello.get("version") != VERSION:
            version = self.hello.get("version") if self.hello else None
            raise ProtocolError(f"guest agent speaks protocol version {version}, "
                                f"this microagent speaks {VERSION}")
        return self.hello

    async def serve(self) -> None:
        """Read guest frames until the connection ends; route each one."""
        if self.reader is None:
            raise ProtocolError("agent channel not connected")
        try:
            while True:
                data = await self.reader.read(1 << 20)
                if not data:
                    break
                for frame in self.decoder.feed(data):
                    self._dispatch(frame)
        except (ConnectionError, ProtocolError) as e:
            self.error = str(e)
        finally:
            self.closed.set()
            for route in list(self.routes.values()):
                if isinstance(route, LocalRequest) and not route.done.done():
                    route.done.set_exception(ProtocolError("agent channel closed"))
                elif isinstance(route, ClientRoute):
                    route.writer.write(encode_json(FrameType.ERROR, route.local_id, {
                        "code": "ECONNRESET", "message": "the guest agent went away"}))
            self.routes.clear()

    def _dispatch(self, frame: Frame) -> None:
        if frame.stream == 0:
            if frame.type == FrameType.HELLO:
                with contextlib.suppress(ProtocolError):
                    self.hello = frame.json()
                self.hello_event.set()
            elif frame.type == FrameType.PING:
                self._send(encode(FrameType.PONG, 0, frame.payload))
            elif frame.type == FrameType.ERROR:
                self.error = frame.payload.decode(errors="replace")
            return
        route = self.routes.get(frame.stream)
        if route is None:
            return
        if isinstance(route, ClientRoute):
            route.writer.write(encode(frame.type, route.local_id, frame.payload, frame.flags))
        else:
            self._collect(route, frame)
        if frame.type in TERMINAL_TYPES:
            self.routes.pop(frame.stream, None)

    def _collect(self, route: LocalRequest, frame: Frame) -> None:
        if frame.type in (FrameType.STDOUT, FrameType.STDERR, FrameType.FILE):
            route.output += frame.payload
            self._send(encode_credit(frame.stream, frame.type, len(frame.payload)))
        elif frame.type == FrameType.STARTED:
            with contextlib.suppress(ProtocolError):
                route.started = frame.json()
        elif frame.type in TERMINAL_TYPES and not route.done.done():
            route.done.set_result(frame)

    def _send(self, data: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    # --- the supervisor's own requests ------------------------------------------------

    async def request(self, operation: dict[str, Any], timeout: float) -> tuple[Frame, bytes]:
        """Open a stream for ``operation``; wait for its EXIT or ERROR frame."""
        stream = next(self.ids)
        route = LocalRequest(asyncio.get_running_loop().create_future())
        self.routes[stream] = route
        self._send(encode_json(FrameType.OPEN, stream, operation))
        try:
            frame = await asyncio.wait_for(route.done, timeout)
        finally:
            self.routes.pop(stream, None)
        return frame, bytes(route.output)

    def send_only(self, operation: dict[str, Any]) -> None:
        """Open a stream whose answer nobody waits for (shutdown)."""
        self._send(encode_json(FrameType.OPEN, next(self.ids), operation))

    # --- relayed clients ------------------------------------------------------------

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection until it closes; cancel its streams then."""
        decoder = FrameDecoder()
        mine: dict[int, int] = {}  # client id -> channel id
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    break
                for frame in decoder.feed(data):
                    self._from_client(frame, writer, mine)
                if self.closed.is_set():
                    break
        except (ConnectionError, ProtocolError):
            pass
        finally:
            for stream in mine.values():
                if self.routes.pop(stream, None) is not None:
                    self._send(encode_json(FrameType.CANCEL, stream, {}))
            writer.close()

    def _from_client(self, frame: Frame, writer: asyncio.StreamWriter,
                     mine: dict[int, int]) -> None:
        if frame.stream == 0:
            if frame.type == FrameType.HELLO:
                writer.write(encode(FrameType.HELLO, 0, json.dumps(self.hello).encode()))
            elif frame.type == FrameType.PING:
                writer.write(encode(FrameType.PONG, 0, frame.payload))
            return
        if frame.type == FrameType.OPEN:
            stream = next(self.ids)
            mine[frame.stream] = stream
            self.routes[stream] = ClientRoute(writer, frame.stream)
        stream_id = mine.get(frame.stream)
        if stream_id is None or stream_id not in self.routes:
            return
        self._send(encode(frame.type, stream_id, frame.payload, frame.flags))
