"""A raw-frame driver for the agent channel: many streams at once, exact control of
credit, malformed input. :class:`AgentProcess` runs ``microagent-init --serve-fd`` on one
end of a socketpair; :class:`Session` speaks frames over the other end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microagent.vm.protocol import (
    DEFAULT_WINDOW,
    FLAG_END,
    Frame,
    FrameDecoder,
    FrameType,
    decode_credit,
    encode,
    encode_credit,
    encode_json,
)

READ_TIMEOUT = 20.0


class AgentProcess:
    """``microagent-init --serve-fd N`` with the other end of the socketpair in ``sock``."""

    def __init__(self, binary: Path, env: dict[str, str] | None = None, *,
                 out_port: bool = False) -> None:
        """``out_port``: a second socketpair stands in for the output port (``out``)."""
        self.sock, theirs = socket.socketpair()
        self.out: socket.socket | None = None
        argv = [str(binary), "--serve-fd", str(theirs.fileno())]
        fds = [theirs.fileno()]
        if out_port:
            self.out, their_out = socket.socketpair()
            argv += ["--out-fd", str(their_out.fileno())]
            fds.append(their_out.fileno())
        self.stderr_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"agent-{os.getpid()}-" \
            f"{id(self)}.stderr"
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, env=env)
        theirs.close()
        if out_port:
            their_out.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def rss_kib(self) -> int:
        """The agent's resident set size (VmRSS) in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def close(self) -> tuple[int | None, str]:
        """Close the connection (the agent exits on EOF), end the process by pid if it
        does not; return its exit status (None: it had to be killed) and its stderr."""
        self.sock.close()
        if self.out is not None:
            self.out.close()
        returncode: int | None
        try:
            returncode = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            returncode = None
        text = self.stderr()
        self.stderr_path.unlink(missing_ok=True)
        return returncode, text


@dataclass
class StreamState:
    """What one stream received."""

    id: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    file: bytearray = field(default_factory=bytearray)
    started: dict[str, Any] | None = None
    exit: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    ends: set[int] = field(default_factory=set)
    stdin_credit: int = DEFAULT_WINDOW
    file_credit: int = DEFAULT_WINDOW
    frames: list[Frame] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.exit is not None or self.error is not None

    @property
    def host_exit_code(self) -> int:
        from microagent.vm.agent import ExecResult

        if self.error is not None:
            return ExecResult(None, error=self.error).host_exit_code
        assert self.exit is not None
        return ExecResult(self.exit.get("exit_code"), self.exit.get("signal"),
                          bool(self.exit.get("timed_out"))).host_exit_code


class Session:
    """Frames over a connected socket, with per-stream bookkeeping.

    ``auto_credit``: return credit for STDOUT/STDERR/FILE as soon as it arrives (else the
    test returns it with :meth:`credit`)."""

    def __init__(self, sock: socket.socket, *, auto_credit: bool = True,
                 window: int = DEFAULT_WINDOW) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        self.auto_credit = auto_credit
        self.window = window
        self.streams: dict[int, StreamState] = {}
        self.control: list[Frame] = []  # stream 0 frames and frames for unknown streams
        self.next_id = 1
        self.peer: dict[str, Any] = {}

    # --- raw I/O ------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_json(self, type_: int, stream: int, doc: dict[str, Any]) -> None:
        self.send(encode_json(type_, stream, doc))

    def read_frames(self, timeout: float) -> list[Frame]:
        """Frames from one recv (waiting up to ``timeout``); [] on timeout."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return []
        if not data:
            raise EOFError("the agent closed the connection")
        frames = self.decoder.feed(data)
        for frame in frames:
            self._dispatch(frame)
        return frames

    def _dispatch(self, frame: Frame) -> None:
        state = self.streams.get(frame.stream)
        if frame.stream == 0 or state is None:
            self.control.append(frame)
            return
        state.frames.append(frame)
        if frame.end:
            state.ends.add(frame.type)
        if frame.type in (FrameType.STDOUT, FrameType.STDERR, FrameType.FILE):
            target = {FrameType.STDOUT: state.stdout, FrameType.STDERR: state.stderr,
                      FrameType.FILE: state.file}[FrameType(frame.type)]
            target += frame.payload
            if self.auto_credit and frame.payload:
                self.send(encode_credit(frame.stream, frame.type, len(frame.payload)))
        elif frame.type == FrameType.CREDIT:
            data_type, increment = decode_credit(frame)
            if data_type == FrameType.STDIN:
                state.stdin_credit += increment
            elif data_type == FrameType.FILE:
                state.file_credit += increment
        elif frame.type == FrameType.STARTED:
            state.started = frame.json()
        elif frame.type == FrameType.EXIT:
            state.exit = frame.json()
        elif frame.type == FrameType.ERROR:
            state.error = frame.json()

    def pump_until(self, condition: Any, timeout: float = READ_TIMEOUT,
                   what: str = "a condition") -> None:
        """Read frames until ``condition()`` is true; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                                     f"control frames: {self.control[-5:]}")
            self.read_frames(min(remaining, 0.5))

    def expect_control(self, type_: int, stream: int = 0,
                       timeout: float = READ_TIMEOUT) -> Frame:
        """The next control-list frame of ``type_`` on ``stream`` (consumed)."""
        def found() -> bool:
            return any(f.type == type_ and f.stream == stream for f in self.control)

        self.pump_until(found, timeout, f"frame type {type_:#x} on stream {stream}")
        for index, frame in enumerate(self.control):
            if frame.type == type_ and frame.stream == stream:
                del self.control[index]
                return frame
        raise AssertionError("unreachable")

    # --- protocol -----------------------------------------------------------------

    def hello(self, version: int = 1, **extra: Any) -> dict[str, Any]:
        doc = {"version": version, "features": ["exec"], "software": "protocol-tests",
               "max_payload": 65536, "window": self.window, **extra}
        self.send_json(FrameType.HELLO, 0, doc)
        self.peer = self.expect_control(FrameType.HELLO).json()
        return self.peer

    def open(self, doc: dict[str, Any], stream: int | None = None) -> StreamState:
        if stream is None:
            stream = self.next_id
            self.next_id += 2
        # data to the guest starts with the guest's own window (its HELLO)
        window = int(self.peer.get("window", DEFAULT_WINDOW))
        state = StreamState(stream, stdin_credit=window, file_credit=window)
        self.streams[stream] = state
        self.send_json(FrameType.OPEN, stream, doc)
        return state

    def exec(self, argv: list[str], **options: Any) -> StreamState:
        doc: dict[str, Any] = {"op": "exec", "argv": argv,
                               "env": options.pop("env", ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])}
        doc.update(options)
        return self.open(doc)

    def stdin(self, state: StreamState, data: bytes, end: bool = False) -> None:
        """Send ``data`` as STDIN within credit, waiting for credit as needed."""
        view = memoryview(data)
        while view:
            self.pump_until(lambda: state.stdin_credit > 0 or state.done,
                            what=f"stdin credit on stream {state.id}")
            if state.done:
                raise AssertionError(f"stream {state.id} ended while sending stdin: "
                                     f"{state.exit or state.error}")
            n = min(len(view), state.stdin_credit, 65536)
            state.stdin_credit -= n
            self.send(encode(FrameType.STDIN, state.id, bytes(view[:n])))
            view = view[n:]
        if end:
            self.send(encode(FrameType.STDIN, state.id, b"", FLAG_END))

    def credit(self, state: StreamState, data_type: int, increment: int) -> None:
        self.send(encode_credit(state.id, data_type, increment))

    def wait(self, state: StreamState, timeout: float = READ_TIMEOUT) -> StreamState:
        self.pump_until(lambda: state.done, timeout, f"the end of stream {state.id}")
        return state

    def run(self, argv: list[str], timeout: float = READ_TIMEOUT, **options: Any) -> StreamState:
        return self.wait(self.exec(argv, **options), timeout)


def parse_json(frame: Frame) -> dict[str, Any]:
    value = json.loads(frame.payload)
    assert isinstance(value, dict)
    return value
