"""The host side of the agent channel: a synchronous client for protocol v1.

:class:`AgentClient` speaks ``docs/protocol.md`` over a connected socket: to the guest
agent directly (the supervisor, the protocol tests) or to a supervisor that relays the
same frames (the CLI's ``exec``). One exec per call; streams stdout and stderr to
callbacks as they arrive, forwards stdin within the guest's credit, returns credit as
output is consumed, and forwards signals and terminal resizes. The file operations
(get, put, stat, list, remove, mkdir) are in :mod:`microagent.vm.agentfiles`, whose
:class:`~microagent.vm.agentfiles.GuestFiles` makes them methods of the client.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from microagent import __version__
from microagent.errors import (
    EXIT_CANNOT_EXECUTE,
    EXIT_NOT_FOUND,
    EXIT_TIMED_OUT,
    UnresponsiveError,
)
from microagent.vm.agentfiles import GuestFiles
from microagent.vm.protocol import (
    DEFAULT_WINDOW,
    FLAG_END,
    MAX_PAYLOAD,
    VERSION,
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolError,
    decode_credit,
    encode,
    encode_credit,
    encode_json,
)

PORT_DRAIN_TIMEOUT = 60.0  # after EXIT, for the output port's last bytes
Sink = Callable[[bytes], None]


@dataclass(frozen=True)
class ExecRequest:
    """One command to run in the guest."""

    argv: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = ""
    user: str = ""
    tty: tuple[int, int] | None = None  # (rows, cols)
    stdin: bool = False
    timeout_ms: int = 0
    stdout_port: str = ""  # the output port's nonce: stdout goes there (not with a tty)

    def to_json(self) -> dict[str, Any]:
        extra = {"stdout_port": self.stdout_port} if self.stdout_port else {}
        return {**extra,
            "op": "exec",
            "argv": list(self.argv),
            "env": list(self.env),
            "cwd": self.cwd,
            "user": self.user,
            "tty": {"rows": self.tty[0], "cols": self.tty[1]} if self.tty else None,
            "stdin": self.stdin,
            "timeout_ms": self.timeout_ms,
        }


@dataclass(frozen=True)
class ExecResult:
    """How a command ended."""

    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    error: dict[str, Any] | None = None
    duration_ms: int = 0
    pid: int | None = None

    @property
    def host_exit_code(self) -> int:
        """The code ``microagent exec`` returns (CLI.md): 124, 126, 127, 128+N or the code."""
        if self.timed_out:
            return EXIT_TIMED_OUT
        if self.error is not None:
            code = self.error.get("code", "")
            return EXIT_NOT_FOUND if code == "ENOENT" else EXIT_CANNOT_EXECUTE
        if self.signal:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else 125


@dataclass
class _Stream:
    """Host-side state of one open stream."""

    send_credit: int
    started: dict[str, Any] | None = None
    done: ExecResult | None = None
    stdin_open: bool = True
    pending_stdin: bytearray = field(default_factory=bytearray)
    owed: dict[int, int] = field(default_factory=dict)  # credit to return, per data type
    stdout_end: bool | None = None  # EXIT: whether the output port's end marker was written


PORT_PREAMBLE = b"microagent-out "
PORT_END = b"\0microagent-end "
PORT_READ = 1 << 20


class _PortReader:
    """One exec's stdout from the output port (docs/protocol.md, "The output port").

    The bytes are ``microagent-out NONCE\\n``, the output, ``\\0microagent-end NONCE\\n``.
    Anything before the preamble is left from an earlier exec that was cut off, and is
    dropped."""

    def __init__(self, sock: socket.socket, nonce: str, sink: Sink) -> None:
        self.sock = sock
        self.preamble = PORT_PREAMBLE + nonce.encode() + b"\n"
        self.end = PORT_END + nonce.encode() + b"\n"
        self.sink = sink
        self.before = bytearray()  # until the preamble is found
        self.found = False
        self.held = b""  # the output's last bytes: perhaps the end marker's start
        self.ended = False
        self.eof = False
        self.buffer = bytearray(PORT_READ)
        self.view = memoryview(self.buffer)

    def receive(self) -> bool:
        """Read what the port has (without waiting when the socket does not block);
        whether there was anything."""
        try:
            n = self.sock.recv_into(self.buffer)
        except BlockingIOError:
            return False
        except OSError as e:
            raise ProtocolError(f"the output port failed: {e.strerror}") from e
        if n == 0:
            self.eof = True
        elif self.ended:
            pass  # after the end: the next exec's (it skips them)
        elif self.found:
            self._output(self.buffer, n)
        else:
            self.before += self.view[:n]
            at = self.before.find(self.preamble)
            if at < 0:
                del self.before[:max(0, len(self.before) - len(self.preamble) + 1)]
                return True
            self.found = True
            rest = bytes(self.before[at + len(self.preamble):])
            self.before.clear()
            self._output(rest, len(rest))
        return n > 0

    def _output(self, data: bytes | bytearray, n: int) -> None:
        """The first ``n`` bytes of ``data`` come after the preamble: output, up to the
        end marker. A proper prefix of the marker at the very end is held back until the
        next read (the marker starts with NUL: text output is never held)."""
        end, view = self.end, memoryview(data)
        if self.held:
            joint = self.held + bytes(view[:min(n, len(end))])
            if joint.startswith(end):
                self._done(b"")
                return
            if end.startswith(joint):  # still only the marker's start
                self.held = joint
                return
            self.sink(self.held)
            self.held = b""
        at = data.find(end, 0, n)
        if at >= 0:
            self._done(bytes(view[:at]))
            return
        cut = data.rfind(end[:1], max(0, n - len(end) + 1), n)
        if cut < 0 or not end.startswith(bytes(view[cut:n])):
            cut = n
        if cut:
            self.sink(bytes(view[:cut]))
        self.held = bytes(view[cut:n])

    def _done(self, last: bytes) -> None:
        if last:
            self.sink(last)
        self.held = b""
        self.ended = True

    def finish(self, deadline: float) -> None:
        """Read until the end marker (the agent wrote it before EXIT)."""
        while not self.ended:
            if self.eof:
                raise ProtocolError("the output port closed before the end of stdout")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProtocolError("the output port did not bring the end of stdout")
            self.sock.settimeout(remaining)
            try:
                self.receive()
            except TimeoutError:
                continue

    def abandon(self) -> None:
        """No end marker is coming (the exec was killed while a process held the port):
        what the port has now, and what was held back, is the output."""
        self.sock.setblocking(False)
        with contextlib.suppress(ProtocolError):
            while not self.ended and self.receive():
                pass
        if self.held and not self.ended:
            self.sink(self.held)
        self.held = b""
        self.ended = True


class AgentClient(GuestFiles):
    """A connection to a guest agent (or a supervisor relaying one)."""

    def __init__(self, sock: socket.socket, *, window: int = DEFAULT_WINDOW) -> None:
        self.sock = sock
        self.window = window
        self.decoder = FrameDecoder()
        self.peer: dict[str, Any] = {}
        self.peer_window = DEFAULT_WINDOW
        self.max_payload = MAX_PAYLOAD
        self.next_stream = 1
        self.pending: list[Frame] = []
        self.current_stream = 0

    def close(self) -> None:
        self.sock.close()

    # --- connection ---------------------------------------------------------------

    def hello(self, timeout: float = 10.0) -> dict[str, Any]:
        """Exchange HELLOs; return the peer's. Raises ProtocolError on a version mismatch."""
        self.send(encode_json(FrameType.HELLO, 0, {
            "version": VERSION, "features": ["exec"], "software": f"microagent {__version__}",
            "max_payload": MAX_PAYLOAD, "window": self.window}))
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = self.read_frame(deadline)
            except TimeoutError as e:
                raise UnresponsiveError(f"no HELLO within {timeout:g}s: the guest agent "
                                        "(or the supervisor relaying it) is unresponsive") from e
            if frame.type == FrameType.HELLO and frame.stream == 0:
                break
            if frame.type == FrameType.ERROR and frame.stream == 0:
                raise ProtocolError(f"guest agent refused the connection: "
                                    f"{frame.json().get('message', '')}")
        peer = frame.json()
        if peer.get("version") != VERSION:
            raise ProtocolError(f"guest agent speaks protocol version {peer.get('version')}, "
                                f"this microagent speaks {VERSION}",
                                hint="restart the workspace so that it boots the current agent")
        self.peer = peer
        self.peer_window = int(peer.get("window", DEFAULT_WINDOW))
        self.max_payload = min(MAX_PAYLOAD, int(peer.get("max_payload", MAX_PAYLOAD)))
        return peer

    def ping(self, payload: bytes = b"{}", timeout: float = 5.0) -> float:
        """Round trip of a PING in seconds."""
        start = time.monotonic()
        self.send(encode(FrameType.PING, 0, payload))
        deadline = start + timeout
        while True:
            frame = self.read_frame(deadline)
            if frame.type == FrameType.PONG:
                return time.monotonic() - start

    def send(self, data: bytes) -> None:
        """Send whole frames, blocking if need be even while exec() polls the socket
        without blocking: the agent keeps reading while its own output waits
        (docs/protocol.md, flow control), so this cannot deadlock."""
        nonblocking = self.sock.gettimeout() == 0.0
        try:
            if nonblocking:
                self.sock.settimeout(None)
            self.sock.sendall(data)
        except OSError as e:
            raise ProtocolError(f"agent channel closed while sending: {e.strerror}") from e
        finally:
            if nonblocking:
                self.sock.settimeout(0.0)

    def read_frame(self, deadline: float | None) -> Frame:
        """The next frame, waiting until ``deadline`` (monotonic); TimeoutError after."""
        while not self.pending:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no answer from the guest agent")
                self.sock.settimeout(remaining)
            else:
                self.sock.settimeout(None)
            self._receive("")
        return self.pending.pop(0)

    def _receive(self, during: str) -> bool:
        """Read what the socket has into ``pending``; False if nothing was ready."""
        try:
            count = self.sock.recv_into(self.decoder.room())
        except (TimeoutError, BlockingIOError):
            if self.sock.gettimeout() != 0.0:
                raise  # a blocking read that timed out: the caller's deadline passed
            return False
        except OSError as e:
            raise ProtocolError(f"agent channel failed: {e.strerror}") from e
        if not count:
            raise ProtocolError(f"agent channel closed{during}")
        self.decoder.received(count)
        self.pending.extend(self.decoder.frames())
        return True

    # --- exec -----------------------------------------------------------------------

    def exec(self, request: ExecRequest, *, stdout: Sink, stderr: Sink,
             stdin_fd: int | None = None,
             poll: Callable[[], list[bytes]] | None = None,
             stdout_port: socket.socket | None = None,
             deadline: float | None = None) -> ExecResult:
        """Run ``request``; stream output to the sinks; return how it ended.

        ``stdin_fd`` is read (when ``request.stdin``) and forwarded within the guest's
        credit; EOF closes the guest's stdin. ``poll`` is called between reads and may
        return extra frames to send (signals, resizes) built with :meth:`signal_frame`.
        ``stdout_port``, a connection to the VM's output port, carries stdout when the
        agent takes it (not with a tty; one exec at a time). Past ``deadline``
        (monotonic) without the command's end, UnresponsiveError: the host's bound on a
        guest that may be frozen (the request's own timeout is the guest's to keep).
        """
        stream_id = self.next_stream
        self.next_stream += 2
        state = _Stream(send_credit=self.peer_window, stdin_open=request.stdin)
        port = None
        if stdout_port is not None and request.tty is None:
            request = replace(request, stdout_port=os.urandom(16).hex())
            port = _PortReader(stdout_port, request.stdout_port, stdout)
        start = time.monotonic()
        self.send(encode_json(FrameType.OPEN, stream_id, request.to_json()))
        self.current_stream = stream_id
        # poll(), not epoll: epoll refuses regular files (`exec -i ws -- cat < file`),
        # which poll reports always readable
        selector = selectors.PollSelector()
        self.sock.setblocking(False)
        selector.register(self.sock, selectors.EVENT_READ, "sock")
        if port is not None:
            port.sock.setblocking(False)
            selector.register(port.sock, selectors.EVENT_READ, "port")
        if stdin_fd is not None and request.stdin:
            selector.register(stdin_fd, selectors.EVENT_READ, "stdin")
        try:
            while state.done is None:
                for frame in self.pending:
                    self._handle(frame, stream_id, state, stdout, stderr)
                self.pending.clear()
                if state.done is not None:
                    break
                self._return_credit(stream_id, state)
                if deadline is not None and time.monotonic() > deadline:
                    raise UnresponsiveError("the guest did not end the command in time")
                ready = selector.select(timeout=0.2)
                if poll is not None:
                    # signals and resizes that arrived while waiting go out before the
                    # input read after them, as a terminal would order them
                    for extra in poll():
                        self.send(extra)
                for key, _ in ready:
                    if key.data == "sock":
                        self._receive(" during exec")
                    elif key.data == "port" and port is not None:
                        port.receive()
                        if port.eof:
                            selector.unregister(port.sock)
                    elif key.data == "stdin" and state.send_credit > 0:
                        self._forward_stdin(stdin_fd, stream_id, state, selector)
                if stdin_fd is not None and state.stdin_open and state.send_credit > 0 \
                        and stdin_fd not in selector.get_map():
                    selector.register(stdin_fd, selectors.EVENT_READ, "stdin")
                elif stdin_fd is not None and state.send_credit <= 0 \
                        and stdin_fd in selector.get_map():
                    selector.unregister(stdin_fd)
        finally:
            selector.close()
            self.sock.setblocking(True)
        done = state.done
        if port is not None and state.started and state.started.get("stdout_port"):
            if state.stdout_end:
                port.finish(time.monotonic() + PORT_DRAIN_TIMEOUT)
            else:
                port.abandon()
        pid = state.started.get("pid") if state.started else None
        return ExecResult(done.exit_code, done.signal, done.timed_out, done.error,
                          int((time.monotonic() - start) * 1000), pid)

    def signal_frame(self, signum: int) -> bytes:
        """A SIGNAL frame for the current exec."""
        return encode_json(FrameType.SIGNAL, self.current_stream, {"signal": signum})

    def resize_frame(self, rows: int, cols: int) -> bytes:
        """A RESIZE frame for the current exec's pty."""
        return encode_json(FrameType.RESIZE, self.current_stream, {"rows": rows, "cols": cols})

    def _forward_stdin(self, fd: int | None, stream_id: int, state: _Stream,
                       selector: selectors.BaseSelector) -> None:
        if fd is None:
            return
        try:
            data = os.read(fd, min(self.max_payload, state.send_credit))
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return
            data = b""
        if data:
            state.send_credit -= len(data)
            self.send(encode(FrameType.STDIN, stream_id, data))
            return
        state.stdin_open = False
        selector.unregister(fd)
        self.send(encode(FrameType.STDIN, stream_id, b"", FLAG_END))

    def _return_credit(self, stream_id: int, state: _Stream) -> None:
        """Credit for the output consumed since the last call, one CREDIT per channel:
        every frame the guest receives wakes its agent, so one per batch of output read,
        not one per frame, and only once an eighth of the window is owed: the guest then
        still has 7/8 of it and never waits on credit held back here."""
        if sum(state.owed.values()) >= self.window // 8:
            self.send(b"".join(encode_credit(stream_id, data_type, amount)
                               for data_type, amount in state.owed.items()))
            state.owed.clear()

    def _handle(self, frame: Frame, stream_id: int, state: _Stream, stdout: Sink,
                stderr: Sink) -> None:
        if frame.stream == 0:
            if frame.type == FrameType.PING:
                self.send(encode(FrameType.PONG, 0, frame.payload))
            elif frame.type == FrameType.ERROR:
                raise ProtocolError(f"guest agent reported: {frame.json().get('message', '')}")
            return
        if frame.stream != stream_id:
            return
        if frame.type in (FrameType.STDOUT, FrameType.STDERR):
            if frame.payload:
                (stdout if frame.type == FrameType.STDOUT else stderr)(frame.payload)
                state.owed[frame.type] = state.owed.get(frame.type, 0) + len(frame.payload)
        elif frame.type == FrameType.CREDIT:
            data_type, increment = decode_credit(frame)
            if data_type == FrameType.STDIN:
                state.send_credit += increment
        elif frame.type == FrameType.STARTED:
            state.started = frame.json()
        elif frame.type == FrameType.EXIT:
            doc = frame.json()
            state.done = ExecResult(doc.get("exit_code"), doc.get("signal"),
                                    bool(doc.get("timed_out", False)))
            if isinstance(doc.get("stdout_end"), bool):
                state.stdout_end = doc["stdout_end"]
        elif frame.type == FrameType.ERROR:
            state.done = ExecResult(None, error=frame.json())

