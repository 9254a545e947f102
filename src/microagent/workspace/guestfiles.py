"""Files in a running workspace, through its agent: the public API's ``ws.files``.

Each call opens a relayed channel through the supervisor (as ``cp`` does while running),
says hello and runs one file operation (``vm/agentfiles.py``; the protocol's ``get``,
``put``, ``stat``, ``list``, ``remove``, ``mkdir``); reads and writes stream within the
agent's flow control, whatever their size. A workspace that is not running is refused
(``copy_in`` and ``copy_out`` also work on a halted disk). What the guest refuses is the
error tree's class: NotFoundError, ConflictError, UsageError, else AgentFileError.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from microagent.errors import ConflictError, PausedError
from microagent.layout import StateLayout
from microagent.state.records import get_workspace
from microagent.state.runtime import runtime_state
from microagent.vm.agent import AgentClient
from microagent.vm.agentfiles import GuestEntry
from microagent.workspace.supervisors import supervisor_of


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
    client = AgentClient(supervisor_of(layout, name).open_channel())
    try:
        client.hello()
        yield client
    finally:
        client.close()


def read_file(layout: StateLayout, name: str, path: str,
              sink: Callable[[bytes], object]) -> None:
    """Stream the guest file ``path`` of ``name`` into ``sink``."""
    with agent_session(layout, name, "reading a file") as client:
        client.read_file(path, sink)


def write_file(layout: StateLayout, name: str, path: str,
               data: bytes | Callable[[int], bytes], *, mode: int = 0o644) -> None:
    """Write ``data`` (bytes, or ``read(n)`` until it returns ``b""``) to the guest's
    ``path``: replaced atomically, its missing parent directories made."""
    with agent_session(layout, name, "writing a file") as client:
        client.write_file(path, data, mode=mode)


def stat(layout: StateLayout, name: str, path: str) -> GuestEntry:
    """What ``path`` is (a symlink itself, not its target)."""
    with agent_session(layout, name, "stat") as client:
        return client.stat(path)


def list_dir(layout: StateLayout, name: str, path: str) -> list[GuestEntry]:
    """The entries of the guest directory ``path``, by name."""
    with agent_session(layout, name, "listing a directory") as client:
        return client.list_dir(path)


def remove(layout: StateLayout, name: str, path: str, *, recursive: bool = False) -> int:
    """Remove ``path`` (a tree with ``recursive``; links never followed); how many went."""
    with agent_session(layout, name, "removing a file") as client:
        return client.remove(path, recursive=recursive)


def mkdir(layout: StateLayout, name: str, path: str, *, mode: int = 0o755,
          parents: bool = True) -> bool:
    """Make the guest directory ``path``; whether it was made."""
    with agent_session(layout, name, "making a directory") as client:
        return client.mkdir(path, parents=parents, mode=mode)
