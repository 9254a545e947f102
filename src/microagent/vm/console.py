"""The serial console, supervisor side: captured into ``serial.log``, shared by sessions.

:class:`ConsoleCapture` connects to the VMM's console socket and appends everything to
``serial.log``; past :data:`LOG_LIMIT` the file is rotated to ``serial.log.1`` (the older
one dropped), so the capture keeps at least the most recent ``LOG_LIMIT`` bytes and never
more than twice that. The unit of ``logs --previous`` is a boot, not a size: each boot
(a start, or a restart by policy) starts a fresh capture and moves the one before it,
both halves, to ``serial.previous.log`` (and ``.1``), so the console of a boot that
panicked is still there after the restart. Output the host cannot write (its disk is
full) is counted and the loss is noted in the log once writes succeed again.

:class:`ConsoleBroker` hands the console to one session at a time: an interactive
``connect`` (bytes both ways until it detaches), or a scripted ``--send`` of one line,
whose output is found between two markers the shell prints (see :meth:`send_line`).
The same markers probe that a shell answers (``consoleReady``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from microagent.errors import BusyError
from microagent.state.captures import keep_previous, rotated

LOG_LIMIT = 4 * 1024 * 1024
CHUNK = 400  # bytes of a long --send line per shell assignment: well under N_TTY's 4095
RESTORE_ATTEMPTS = 5
SLOW_CLIENT = 4 * 1024 * 1024  # an attached client this far behind is dropped
# the shell's echo and prompts as they were before a --send (kept if never saved)
RESTORE = ("PS1=${__ma_ps1-$PS1}; PS2=${__ma_ps2-$PS2}; unset __ma_ps1 __ma_ps2 __ma_l; "
           "stty echo 2>/dev/null")
# readline's bracketed-paste switches, written around every line it reads
PASTE_MODE = re.compile(rb"\x1b\[\?2004[hl]\r?")


class ConsoleCapture:
    """Appends console output to a bounded log, reports lines, fans bytes out to sessions."""

    def __init__(self, path: Path, limit: int = LOG_LIMIT, *, new_boot: bool = True) -> None:
        self.path = path
        self.limit = limit
        if new_boot:  # the last boot's capture becomes `logs --previous`
            keep_previous(path)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size  # a re-attached supervisor's: this boot's
        self.lost = 0  # bytes the host could not write (ENOSPC...) since the last write
        self.lost_why = ""
        self.partial = b""
        self.writer: asyncio.StreamWriter | None = None
        self.listeners: set[Callable[[bytes], None]] = set()
        self.closed = asyncio.Event()

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating when the file passes the limit. Never raises: what
        cannot be written is counted, and noted in the log once writes work again."""
        written = 0
        try:
            if self.size + len(data) > self.limit and self.size:
                if self.fd >= 0:
                    os.close(self.fd)
                self.fd = -1
                os.replace(self.path, rotated(self.path))
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                  | os.O_CLOEXEC, 0o600)
                self.size = 0
            if self.lost:
                note = (f"\r\n[microagent: {self.lost} bytes of console output were lost: "
                        f"{self.lost_why}]\r\n").encode()
                self.size += os.write(self.fd, note)
                self.lost = 0
            written = os.write(self.fd, data)
            self.size += written
            if written < len(data):
                raise OSError(28, os.strerror(28))  # the rest: ENOSPC
        except OSError as e:
            self.lost += len(data) - written
            self.lost_why = e.strerror or str(e)
            if self.fd < 0:
                with contextlib.suppress(OSError):
                    self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                      | os.O_CLOEXEC, 0o600)

    def note(self, text: str) -> None:
        """A line of microagent's own in the log (between the guest's output)."""
        self.write(f"\r\n[microagent: {text}]\r\n".encode())

    def send(self, data: bytes) -> None:
        """Type ``data`` into the console (dropped when the console is not connected)."""
        if self.writer is not None and not self.closed.is_set():
            self.writer.write(data)

    async def capture(self, socket_path: str, deadline: float,
                      on_line: Callable[[str], None]) -> None:
        """Read the console socket until it closes; write, scan and fan out every byte."""
        while True:
            try:
                reader, self.writer = await asyncio.open_unix_connection(socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    self.closed.set()
                    return
                await asyncio.sleep(0.05)
        try:
            while data := await reader.read(65536):
                self.write(data)
                for listener in list(self.listeners):
                    listener(data)
                lines = (self.partial + data).split(b"\n")
                self.partial = lines.pop()[-4096:]
                for line in lines:
                    on_line(line.decode("utf-8", errors="replace"))
        finally:
            self.closed.set()
            if self.fd >= 0:
                os.close(self.fd)
            self.fd = os.open(os.devnull, os.O_WRONLY)


@dataclass(frozen=True)
class Holder:
    """Who has the console."""

    kind: str  # "interactive" or "send"
    pid: int
    since: str

    def describe(self) -> str:
        what = "an interactive connect" if self.kind == "interactive" else "a connect --send"
        return f"{what} (pid {self.pid}, since {self.since})"


@dataclass(frozen=True)
class SendResult:
    """What one ``--send`` line printed."""

    output: bytes
    exit_code: int | None
    timed_out: bool
    incomplete: bool = False  # the shell asked for a continuation line


class _Transcript:
    """Console output collected from one moment on, with a wait for a pattern."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.grew = asyncio.Event()

    def feed(self, data: bytes) -> None:
        self.data += data
        self.grew.set()

    async def wait_for(self, pattern: re.Pattern[bytes], start: int,
                       deadline: float) -> re.Match[bytes] | None:
        while True:
            found = pattern.search(self.data, start)
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.grew.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.grew.wait(), remaining)


def _marker(label: str, nonce: str) -> tuple[str, re.Pattern[bytes]]:
    """A shell word printing ``MA-label-nonce`` and the pattern of its output.

    The word is split by quotes, so the echo of the typed line never matches.
    """
    return f'"MA""-{label}-{nonce}"', re.compile(rb"MA-" + label.encode() + b"-" +
                                                  nonce.encode())


class ConsoleBroker:
    """One console session at a time, over a :class:`ConsoleCapture`."""

    def __init__(self) -> None:
        self.capture: ConsoleCapture | None = None
        self.holder: Holder | None = None
        self.lock = asyncio.Lock()

    def _require_capture(self) -> ConsoleCapture:
        if self.capture is None or self.capture.closed.is_set() or self.capture.writer is None:
            raise BusyError("the console is not connected (the VM is not running)")
        return self.capture

    async def _acquire(self, holder: Holder, wait: float) -> None:
        """Take the console; wait up to ``wait`` s behind a ``--send``, never behind an
        interactive session."""
        if self.holder is not None and self.holder.kind == "interactive":
            raise BusyError(f"the console is held by {self.holder.describe()}",
                            hint="detach that session (Ctrl-]) or use exec")
        try:
            await asyncio.wait_for(self.lock.acquire(), wait)
        except TimeoutError:
            raise BusyError(f"the console is held by "
                            f"{self.holder.describe() if self.holder else 'another session'}",
                            hint="try again when it is done, or use exec") from None
        self.holder = holder

    def _release(self) -> None:
        self.holder = None
        self.lock.release()

    async def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     holder: Holder, ready: Callable[[], Awaitable[None]]) -> None:
        """Relay bytes both ways until the client or the console goes away.

        ``ready`` runs once the console is ours (it sends the client its ``ok``).
        """
        capture = self._require_capture()
        await self._acquire(holder, wait=10)

        def forward(data: bytes) -> None:
            if writer.transport.get_write_buffer_size() > SLOW_CLIENT:
                writer.transport.abort()  # a stuck client must not stall the console
                return
            writer.write(data)

        capture.listeners.add(forward)
        try:
            await ready()
            closing = asyncio.create_task(capture.closed.wait())
            while True:
                reading = asyncio.create_task(reader.read(4096))
                done, _ = await asyncio.wait({reading, closing},
                                             return_when=asyncio.FIRST_COMPLETED)
                if closing in done:
                    reading.cancel()
                    break
                data = reading.result()
                if not data:
                    break
                capture.send(data)
            closing.cancel()
        finally:
            capture.listeners.discard(forward)
            self._release()

    async def send_line(self, line: str, timeout: float, holder: Holder) -> SendResult:
        """Type ``line`` into the console shell; return only what it printed.

        The line is first assembled in a variable (see :func:`_body`). A first line turns
        the tty's echo off and empties PS1 (saving it), then prints a begin marker. Once
        that is seen, three more: a calibration marker, ``eval`` of the line, and a line
        printing an end marker with ``$?`` that restores echo and PS1. The output is what
        lies between the calibration and end markers, less what the shell writes for
        every line it reads (readline's bracketed-paste switches and a line feed even with
        echo off), which the calibration line shows.
        On timeout the command is interrupted (Ctrl-C) and the shell restored.
        """
        capture = self._require_capture()
        deadline = time.monotonic() + timeout
        await self._acquire(holder, wait=timeout)
        transcript = _Transcript()
        capture.listeners.add(transcript.feed)
        try:
            nonce = secrets.token_hex(6)
            words = {label: _marker(label, nonce) for label in ("b", "c", "e", "p")}
            # PS2 becomes a marker too: an incomplete line (an open quote, `if`) makes the
            # shell ask for more, and that is seen at once instead of at the timeout
            prelude, typed = _body(line)
            # saved only if not saved already: a restore that never ran keeps the originals
            capture.send(prelude + f" stty -echo 2>/dev/null; __ma_ps1=${{__ma_ps1-$PS1}}; "
                         f"__ma_ps2=${{__ma_ps2-$PS2}}; PS1=; "
                         f"PS2={words['p'][0]}; printf '%s\\n' {words['b'][0]}\n".encode())
            begun = await transcript.wait_for(_line_of(words["b"][1]), 0, deadline)
            if begun is None:
                return await self._give_up(capture, transcript, 0)
            capture.send(f" printf '%s\\n' {words['c'][0]}\n".encode() + typed +
                         f" printf '\\n%s %s\\n' {words['e'][0]} \"$?\"; {RESTORE}\n".encode())
            calibrated = await transcript.wait_for(_line_of(words["c"][1]), begun.end(),
                                                   deadline)
            if calibrated is None:
                return await self._give_up(capture, transcript, begun.end())
            ended = await transcript.wait_for(
                re.compile(words["e"][1].pattern + rb" (\d+)\r?\n|" + words["p"][1].pattern),
                calibrated.end(), deadline)
            per_line = _plain(bytes(transcript.data[begun.end():calibrated.start()]))
            if ended is None or ended.group(1) is None:
                result = await self._give_up(capture, transcript, calibrated.end(), per_line)
                return result if ended is None else SendResult(b"", None, False, True)
            output = _plain(bytes(transcript.data[calibrated.end():ended.start()]))
            return SendResult(_unframe(output, per_line), int(ended.group(1)), False)
        finally:
            capture.listeners.discard(transcript.feed)
            self._release()

    async def _give_up(self, capture: ConsoleCapture, transcript: _Transcript,
                       start: int, per_line: bytes = b"") -> SendResult:
        """Interrupt whatever runs and put the shell's echo and prompt back."""
        captured = _plain(bytes(transcript.data[start:]))
        if per_line and captured.startswith(per_line):
            captured = captured[len(per_line):]
        captured = captured.replace(b"\r\n", b"\n")
        capture.send(b"\x03")
        # The shell may still be handling the interrupt (readline drops what it has read
        # by then), so the restore is repeated until its marker shows it ran.
        word, pattern = _marker("r", secrets.token_hex(6))
        for _ in range(RESTORE_ATTEMPTS):
            await asyncio.sleep(0.2)
            mark = len(transcript.data)
            capture.send(f" {RESTORE}; printf '%s\\n' {word}\n".encode())
            if await transcript.wait_for(pattern, mark, time.monotonic() + 2) is not None:
                break
        return SendResult(captured, None, True)

    async def probe(self, timeout: float) -> tuple[bool, str] | None:
        """Does a shell answer on the console? A marker printed by one typed line.

        None when a session holds the console: it cannot be asked without typing into
        that session.
        """
        if self.holder is not None:
            return None
        try:
            capture = self._require_capture()
            await self._acquire(Holder("send", os.getpid(), "probe"), wait=timeout)
        except BusyError as e:
            return False, e.message
        transcript = _Transcript()
        capture.listeners.add(transcript.feed)
        try:
            started = time.monotonic()
            word, pattern = _marker("ok", secrets.token_hex(6))
            capture.send(f" printf '%s\\n' {word}\n".encode())
            found = await transcript.wait_for(pattern, 0, started + timeout)
            if found is None:
                return False, f"no shell answered on the console within {timeout:.0f}s"
            return True, f"a shell answered in {(time.monotonic() - started) * 1000:.0f} ms"
        finally:
            capture.listeners.discard(transcript.feed)
            self._release()


def _body(line: str) -> tuple[bytes, bytes]:
    """The typed form of ``line``: lines to type before the begin marker, and the line.

    The line is assembled into ``$__ma_l`` in chunks (typed before the begin marker, so
    neither their echo nor what the shell writes per line read is in the output; the
    tty's line buffer holds 4095 bytes) and run with ``eval``: an incomplete line (an
    open quote, ``if`` without ``fi``) is then a syntax error with status 2, not a shell
    waiting for more.
    """
    parts = [f" __ma_l={shlex.quote(line[:CHUNK])}\n"]
    rest = line[CHUNK:]
    while rest:
        parts.append(f" __ma_l=\"$__ma_l\"{shlex.quote(rest[:CHUNK])}\n")
        rest = rest[CHUNK:]
    return "".join(parts).encode(), b' eval "$__ma_l"\n'


def _line_of(marker: re.Pattern[bytes]) -> re.Pattern[bytes]:
    """The marker's whole output line."""
    return re.compile(marker.pattern + rb"[^\n]*\n")


def _plain(data: bytes) -> bytes:
    """Without readline's bracketed-paste switches."""
    return PASTE_MODE.sub(b"", data)


def _unframe(output: bytes, per_line: bytes) -> bytes:
    """The command's own output: strip what reading the line and the end line added
    (``per_line`` each) and the end marker's leading line feed; CR LF becomes LF."""
    if per_line and output.startswith(per_line):
        output = output[len(per_line):]
    if output.endswith(b"\r\n"):
        output = output[:-2]
    if per_line and output.endswith(per_line):
        output = output[: -len(per_line)]
    return output.replace(b"\r\n", b"\n")
