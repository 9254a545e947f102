"""The supervisor's end of the agent channel (asyncio): one connection to the guest,
shared by the supervisor's own requests and by relayed client streams.

Clients (``microagent exec``) connect to the supervisor's control socket and speak the
same protocol (``docs/protocol.md``) as if they spoke to the guest. The channel gives
each client stream a connection-wide id and forwards frames both ways, and cancels a
client's streams when it disconnects. Credit frames are forwarded too, so flow control
runs end to end: the guest never sends a client more than the client has room for, and
the supervisor buffers at most one window per stream.

The relay is on the path of every byte of exec output, so it does not decode what it
forwards: both connections read straight into a :class:`FrameBuffer`, the stream id is
rewritten in the frame header where it lies, and each run of consecutive frames for one
destination goes out in one write. A byte is copied once in the supervisor (into the
destination transport), however many frames it spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from microagent import __version__
from microagent.vm.protocol import (
    DEFAULT_WINDOW,
    MAX_PAYLOAD,
    VERSION,
    Frame,
    FrameBuffer,
    FrameType,
    ProtocolError,
    encode,
    encode_credit,
    encode_json,
)

TERMINAL_TYPES = frozenset({FrameType.EXIT, FrameType.ERROR})
HELLO_RETRY = 1.0
STREAM_FIELD = struct.Struct(">I")  # the header's stream id, at offset 8
STREAM_OFFSET = 8
CLIENT_READ = 256 << 10  # a client sends little: input, credit, signals


@dataclass
class LocalRequest:
    """A stream the supervisor itself opened: collects its answer."""

    done: asyncio.Future[Frame]
    started: dict[str, Any] | None = None
    output: bytearray = field(default_factory=bytearray)


@dataclass
class ClientRoute:
    """A client's stream: the relay it belongs to and its id there."""

    client: ClientRelay
    local_id: int


class _Runs:
    """Consecutive frames of one buffer bound for one destination (anything with a
    ``write``), sent as one write."""

    def __init__(self, buffer: FrameBuffer) -> None:
        self.view = buffer.view
        self.target: Any = None
        self.start = self.end = 0

    def add(self, target: Any, offset: int, end: int) -> None:
        if target is self.target and offset == self.end:
            self.end = end
            return
        self.flush()
        self.target, self.start, self.end = target, offset, end

    def flush(self) -> None:
        if self.target is not None:
            # a copy: the buffer is read into again, and a transport may keep what it
            # is given (Python 3.12 queues the object itself when it cannot send at once)
            self.target.write(bytes(self.view[self.start:self.end]))
            self.target = None


class _GuestProtocol(asyncio.BufferedProtocol):
    def __init__(self, channel: AgentChannel) -> None:
        self.channel = channel

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.channel.inbound.room()

    def buffer_updated(self, nbytes: int) -> None:
        self.channel._from_guest(nbytes)

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel._lost(exc)


class ClientRelay(asyncio.BufferedProtocol):
    """One relayed client connection (the control connection after its ``ok``)."""

    def __init__(self, channel: AgentChannel, transport: asyncio.Transport) -> None:
        self.channel = channel
        self.transport = transport
        self.buffer = FrameBuffer(read_size=CLIENT_READ)
        self.mine: dict[int, int] = {}  # client id -> channel id
        self.done = asyncio.get_running_loop().create_future()

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer.room()

    def buffer_updated(self, nbytes: int) -> None:
        self.channel._from_client(self, nbytes)

    def eof_received(self) -> bool:
        return False  # close: the client is done

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    # the transport's flow control: ignored, the streams' credit bounds what it holds
    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class AgentChannel:
    """The guest connection of one boot."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.inbound = FrameBuffer()
        self.hello: dict[str, Any] | None = None
        self.hello_event = asyncio.Event()
        self.closed = asyncio.Event()
        self.ids = itertools.count(1, 2)
        self.routes: dict[int, LocalRequest | ClientRoute] = {}
        self.clients: set[ClientRelay] = set()
        self.error: str | None = None
        self.pongs: dict[bytes, asyncio.Future[None]] = {}  # by the PING's payload

    # --- the guest side -------------------------------------------------------------

    async def connect(self, path: str, deadline: float) -> None:
        """Connect to the VMM's agent socket, retrying until it exists or ``deadline``."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                transport, _ = await loop.create_unix_connection(
                    lambda: _GuestProtocol(self), path)
                self.transport = transport
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
            self.write(encode_json(FrameType.HELLO, 0, hello))
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
        """Until the guest connection ends (frames are routed as they arrive)."""
        if self.transport is None:
            raise ProtocolError("agent channel not connected")
        await self.closed.wait()

    def _from_guest(self, nbytes: int) -> None:
        buffer = self.inbound
        buffer.received(nbytes)
        try:
            scanned = buffer.scan()
        except ProtocolError as e:
            self.error = str(e)
            if self.transport is not None:
                self.transport.abort()
            return
        runs = _Runs(buffer)
        for offset, end, type_, flags, stream in scanned:
            if stream == 0:
                self._control(buffer.frame(offset, end, type_, flags, stream))
                continue
            route = self.routes.get(stream)
            if route is None:
                continue
            if isinstance(route, ClientRoute):
                STREAM_FIELD.pack_into(buffer.data, offset + STREAM_OFFSET, route.local_id)
                runs.add(route.client, offset, end)
            else:
                self._collect(route, buffer.frame(offset, end, type_, flags, stream))
            if type_ in TERMINAL_TYPES:
                self.routes.pop(stream, None)
        runs.flush()
        if scanned:
            buffer.consume(scanned[-1][1])

    def _lost(self, exc: Exception | None) -> None:
        if exc is not None and self.error is None:
            self.error = str(exc)
        self.closed.set()
        for route in list(self.routes.values()):
            if isinstance(route, LocalRequest) and not route.done.done():
                route.done.set_exception(ProtocolError("agent channel closed"))
            elif isinstance(route, ClientRoute):
                route.client.write(encode_json(FrameType.ERROR, route.local_id, {
                    "code": "ECONNRESET", "message": "the guest agent went away"}))
        self.routes.clear()
        for client in list(self.clients):
            client.transport.close()  # after what it holds is written

    def _control(self, frame: Frame) -> None:
        if frame.type == FrameType.HELLO:
            with contextlib.suppress(ProtocolError):
                self.hello = frame.json()
            self.hello_event.set()
        elif frame.type == FrameType.PING:
            self.write(encode(FrameType.PONG, 0, frame.payload))
        elif frame.type == FrameType.PONG:
            waiter = self.pongs.get(bytes(frame.payload))
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif frame.type == FrameType.ERROR:
            self.error = frame.payload.decode(errors="replace")

    def _collect(self, route: LocalRequest, frame: Frame) -> None:
        if frame.type in (FrameType.STDOUT, FrameType.STDERR, FrameType.FILE):
            route.output += frame.payload
            self.write(encode_credit(frame.stream, frame.type, len(frame.payload)))
        elif frame.type == FrameType.STARTED:
            with contextlib.suppress(ProtocolError):
                route.started = frame.json()
        elif frame.type in TERMINAL_TYPES and not route.done.done():
            route.done.set_result(frame)

    def write(self, data: bytes) -> None:
        """Send bytes to the guest (nothing once the connection is closing)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # --- the supervisor's own requests ------------------------------------------------

    async def request(self, operation: dict[str, Any], timeout: float) -> tuple[Frame, bytes]:
        """Open a stream for ``operation``; wait for its EXIT or ERROR frame."""
        return await self.answer(*self.send_request(operation), timeout)

    def send_request(self, operation: dict[str, Any]) -> tuple[int, LocalRequest]:
        """Write ``operation``'s OPEN now (the guest takes it before anything written
        after it); :meth:`answer` waits for it."""
        stream = next(self.ids)
        route = LocalRequest(asyncio.get_running_loop().create_future())
        self.routes[stream] = route
        self.write(encode_json(FrameType.OPEN, stream, operation))
        return stream, route

    async def answer(self, stream: int, route: LocalRequest,
                     timeout: float) -> tuple[Frame, bytes]:
        """The EXIT or ERROR frame of a request :meth:`send_request` sent."""
        try:
            frame = await asyncio.wait_for(route.done, timeout)
        finally:
            self.routes.pop(stream, None)
        return frame, bytes(route.output)

    async def ping(self, timeout: float) -> bool:
        """Whether the guest agent answers a PING within ``timeout`` seconds (the
        cheapest sign of a live guest: the agent's loop answers it, no process runs)."""
        nonce = os.urandom(8).hex().encode()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pongs[nonce] = waiter
        self.write(encode(FrameType.PING, 0, nonce))
        try:
            await asyncio.wait_for(waiter, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self.pongs.pop(nonce, None)

    def send_only(self, operation: dict[str, Any]) -> None:
        """Open a stream whose answer nobody waits for (shutdown)."""
        self.write(encode_json(FrameType.OPEN, next(self.ids), operation))

    # --- relayed clients ------------------------------------------------------------

    async def relay(self, transport: asyncio.Transport) -> None:
        """Relay the client on ``transport`` until it closes; cancel its streams then.

        Call it right after writing the ``ok`` line, with no ``await`` between: the
        client's first frame may follow at once, and from here on it is read here."""
        client = ClientRelay(self, transport)
        transport.set_protocol(client)
        self.clients.add(client)
        try:
            if self.closed.is_set():
                transport.close()
            await client.done
        finally:
            self.clients.discard(client)
            for stream in client.mine.values():
                if self.routes.pop(stream, None) is not None:
                    self.write(encode_json(FrameType.CANCEL, stream, {}))
            transport.close()

    def _from_client(self, client: ClientRelay, nbytes: int) -> None:
        buffer = client.buffer
        buffer.received(nbytes)
        try:
            scanned = buffer.scan()
        except ProtocolError:
            client.transport.abort()
            return
        runs = _Runs(buffer)
        for offset, end, type_, flags, stream in scanned:
            if stream == 0:  # answered here: the client's HELLO gets the guest's
                if type_ == FrameType.HELLO:
                    client.write(encode(FrameType.HELLO, 0, json.dumps(self.hello).encode()))
                elif type_ == FrameType.PING:
                    frame = buffer.frame(offset, end, type_, flags, stream)
                    client.write(encode(FrameType.PONG, 0, frame.payload))
                continue
            if type_ == FrameType.OPEN:
                client.mine[stream] = next(self.ids)
                self.routes[client.mine[stream]] = ClientRoute(client, stream)
            target = client.mine.get(stream)
            if target is None or target not in self.routes:
                continue
            STREAM_FIELD.pack_into(buffer.data, offset + STREAM_OFFSET, target)
            runs.add(self, offset, end)
        runs.flush()
        if scanned:
            buffer.consume(scanned[-1][1])
