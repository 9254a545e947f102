"""The CLI's side of a supervisor's control socket.

A request is one JSON line, the answer one JSON line. ``open_channel`` turns the
connection into a relayed agent channel that :class:`~microagent.vm.agent.AgentClient`
speaks to as if it were the guest. Unix socket addresses are limited to ~107 bytes, so
sockets are reached through ``/proc/self/fd/<dir fd>/<name>``, whatever the length of
the state directory.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microagent.errors import (
    BusyError,
    ConflictError,
    HostError,
    MicroagentError,
    PausedError,
    UnresponsiveError,
)
from microagent.layout import RunFiles
from microagent.state.runtime import lock_held


def connect_unix(directory: Path, name: str, timeout: float | None = 30.0) -> socket.socket:
    """Connect to the Unix socket ``directory/name`` however long the path is."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(f"/proc/self/fd/{dir_fd}/{name}")
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dir_fd)
    return sock


GONE_WAIT = 10.0  # for a supervisor that dropped a request to finish dying


class SupervisorGoneError(MicroagentError):
    """The supervisor dropped the connection before it answered (it died, or ended)."""


class SupervisorClient:
    """Requests to one workspace's supervisor. ``reattach``, when given, is called when
    there is none to answer: True when it started one (a VM whose supervisor was lost:
    vm/adopt.py), which is then asked."""

    def __init__(self, files: RunFiles, workspace: str,
                 reattach: Callable[[], bool] | None = None) -> None:
        self.files = files
        self.workspace = workspace
        self.reattach = reattach

    def _connect(self, timeout: float | None) -> socket.socket:
        try:
            return connect_unix(self.files.dir, self.files.control_socket, timeout)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if self.reattach is not None and self.reattach():
                self.reattach = None
                return self._connect(timeout)
            raise ConflictError(f"workspace {self.workspace} is not running",
                                hint=f"start it: microagent start {self.workspace}") from e
        except OSError as e:
            raise MicroagentError(f"cannot reach the supervisor of {self.workspace}: "
                                  f"{e.strerror or e}") from e

    def request(self, verb: str, timeout: float | None = 60.0, **fields: Any) -> dict[str, Any]:
        """Send one request; return the answer (raises on ``ok: false``)."""
        with self._connect(timeout) as sock:
            answer = _exchange(sock, {"request": verb, **fields}, self.workspace)
        return answer

    def open_channel(self, timeout: float = 30.0) -> socket.socket:
        """A connection relayed to the guest agent (after the supervisor's ``ok``)."""
        sock, _ = self.open_channel_with_port(False, timeout)
        return sock

    def open_channel_with_port(self, stdout_port: bool, timeout: float = 30.0
                               ) -> tuple[socket.socket, socket.socket | None]:
        """A relayed channel and, when ``stdout_port`` and the supervisor has it to lend,
        a connection to the VM's output port (passed over the control socket) for one
        exec's stdout at a time (docs/protocol.md, "The output port"). A supervisor that
        died as it was asked (killed: the VM runs on) is replaced (``reattach``) and
        asked again: opening a channel does nothing in the guest."""
        sock = self._connect(timeout)
        fds: list[int] = []
        try:
            _exchange(sock, {"request": "channel", "stdout_port": stdout_port},
                      self.workspace, fds)
        except SupervisorGoneError:
            sock.close()
            for fd in fds:
                os.close(fd)
            if self.reattach is None or not self._replaced():
                raise
            return self.open_channel_with_port(stdout_port, timeout)
        except BaseException:
            sock.close()
            for fd in fds:
                os.close(fd)
            raise
        sock.settimeout(None)
        for extra in fds[1:]:
            os.close(extra)
        return sock, socket.socket(fileno=fds[0]) if fds else None


    def _replaced(self) -> bool:
        """After a connection the supervisor dropped unanswered: once it is gone, whether
        another was attached to its VM (``reattach``), to ask again (once)."""
        reattach, self.reattach = self.reattach, None
        deadline = time.monotonic() + GONE_WAIT
        while lock_held(self.files.lock) and time.monotonic() < deadline:
            time.sleep(0.01)  # exiting: its lock goes with its last descriptors
        return reattach is not None and not lock_held(self.files.lock) and reattach()

    def open_console(self, rows: int, cols: int, timeout: float = 30.0) -> socket.socket:
        """An interactive console session: raw bytes both ways after the ``ok``."""
        sock = self._connect(timeout)
        try:
            _exchange(sock, {"request": "console", "pid": os.getpid(), "rows": rows,
                             "cols": cols}, self.workspace)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock


def _exchange(sock: socket.socket, request: dict[str, Any], workspace: str,
              fds: list[int] | None = None) -> dict[str, Any]:
    """Send ``request``, read the answer line; file descriptors that come with its first
    byte are added to ``fds`` (closed if None)."""
    try:
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunk, received, _, _ = socket.recv_fds(sock, 1, 4)
        for fd in received:
            os.set_inheritable(fd, False)  # as every fd Python opens (recvmsg does not)
        if fds is None:
            for fd in received:
                os.close(fd)
        else:
            fds += received
        line = chunk
        while chunk and not line.endswith(b"\n"):
            chunk = sock.recv(1)  # byte by byte: what follows the line belongs to the relay
            line += chunk
    except TimeoutError as e:
        raise UnresponsiveError(f"the supervisor of {workspace} did not answer within "
                                f"{sock.gettimeout():g}s: it is unresponsive",
                                hint=f"microagent kill {workspace} ends it") from e
    except OSError as e:
        raise SupervisorGoneError(f"the supervisor of {workspace} went away: "
                                  f"{e.strerror}") from e
    if not line:
        raise SupervisorGoneError(f"the supervisor of {workspace} closed the connection")
    answer = json.loads(line)
    if not answer.get("ok"):
        error = answer.get("error", {})
        if error.get("kind") == "paused":
            raise PausedError(workspace, str(answer.get("reason") or error.get("message")))
        kind = {"busy": BusyError, "host": HostError, "error": MicroagentError,
                "vmm": MicroagentError}.get(error.get("kind"), ConflictError)
        raise kind(f"workspace {workspace}: {error.get('message', 'request refused')}",
                   hint=error.get("hint", ""))
    return dict(answer)
