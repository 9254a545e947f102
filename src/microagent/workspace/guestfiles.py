"""Files in a running workspace, through its agent: the public API's ``ws.files``.

Each call opens a relayed channel through the supervisor (as ``cp`` does while running),
says hello and runs one file operation; reads and writes stream within the agent's flow
control, whatever their size. A workspace that is not running is refused (``copy_in`` and
``copy_out`` also work on a halted disk).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator

from microagent.errors import AgentFileError, ConflictError, NotFoundError, PausedError
from microagent.layout import StateLayout
from microagent.state.records import get_workspace
from microagent.state.runtime import runtime_state
from microagent.vm.agent import AgentClient, get_file, put_file
from microagent.vm.control import SupervisorClient


@contextlib.contextmanager
def agent_session(layout: StateLayout, name: str, doing: str) -> Iterator[AgentClient]:
    """A hello'd agent client of the running workspace ``name``; refusals name ``doing``."""
    get_workspace(layout, name)
    state = runtime_state(layout, name)
    if state.state == "paused":
        raise PausedError(name, state.detail)
    if state.state != "running":
        raise ConflictError(f"workspace {name} is {state.state}: {doing} needs it running",
                            hint=f"microagent start {name}")
    client = AgentClient(SupervisorClient(layout.run_files(name), name).open_channel())
    try:
        client.hello()
        yield client
    finally:
        client.close()


def translate(error: AgentFileError, path: str) -> Exception:
    """A missing path is NotFoundError; the rest stays the agent's error."""
    if error.code == "ENOENT":
        return NotFoundError(f"no such file in the guest: {path}")
    return error


def read_file(layout: StateLayout, name: str, path: str,
              sink: Callable[[bytes], None]) -> None:
    """Stream the guest file ``path`` of ``name`` into ``sink``."""
    with agent_session(layout, name, "reading a file") as client:
        try:
            get_file(client, path, sink)
        except AgentFileError as e:
            raise translate(e, path) from e


def write_file(layout: StateLayout, name: str, path: str, data: bytes | io.BufferedIOBase,
               *, mode: int = 0o644) -> None:
    """Write ``data`` (bytes, or a binary stream read to its end) to the guest's ``path``
    (replaced atomically by the agent; its parent directories created)."""
    reader = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
    with agent_session(layout, name, "writing a file") as client:
        try:
            put_file(client, path, reader.read, mode=mode)
        except AgentFileError as e:
            raise translate(e, path) from e
