"""``Workspace``: a handle on one named workspace, and ``Files``, its guest's files.

A handle is a name and the state directory: cheap to make, never stale. Each call reads
what it needs from disk or asks the workspace's supervisor, as the CLI's verbs do.
``attrs`` is the record as it was when the handle was made or last :meth:`reload`-ed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from microagent.api.results import (
    ExecResult,
    FileEntry,
    WorkspaceStatus,
)
from microagent.errors import UsageError

if TYPE_CHECKING:
    from microagent.api.processes import Process
    from microagent.events import Event
    from microagent.layout import StateLayout
    from microagent.progress import Progress
    from microagent.state.snapshots import Snapshot
    from microagent.workspace.copy import CopyResult

Callback = Callable[[bytes], object]  # what it returns is ignored (file.write returns int)
DEFAULT_START_TIMEOUT = 120.0


def env_items(env: Mapping[str, str] | Sequence[str] | None, what: str) -> tuple[str, ...]:
    """``{"K": "V"}`` or ``["K=V"]`` as the ``K=V`` items the guest gets."""
    if env is None:
        return ()
    items = ([f"{k}={v}" for k, v in env.items()] if isinstance(env, Mapping)
             else list(env))
    for item in items:
        if not isinstance(item, str):
            raise UsageError(f"invalid {what} item {item!r}: a str K=V")
        key = item.partition("=")[0]
        if not key or "=" not in item or "\0" in item:
            raise UsageError(f"invalid {what} item {item!r}", hint="K=V with a non-empty K")
    return tuple(items)


def argv_of(command: str | Sequence[str]) -> tuple[str, ...]:
    """A str runs through ``/bin/sh -c``; a sequence is the argv itself."""
    if isinstance(command, str):
        if not command.strip():
            raise UsageError("empty command")
        return ("/bin/sh", "-c", command)
    argv = tuple(command)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise UsageError(f"invalid command {command!r}", hint="a str, or a list of str")
    return argv


class Workspace:
    """One named workspace (``ma.create``, ``ma.get``, ``ma.list``)."""

    def __init__(self, layout: StateLayout, name: str,
                 attrs: Mapping[str, Any] | None = None) -> None:
        self._layout = layout
        self.name = name
        self.attrs: Mapping[str, Any] = attrs or {}
        self.files = Files(self)

    def __repr__(self) -> str:
        return f"<Workspace {self.name}>"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Workspace) and other.name == self.name
                and other._layout.root == self._layout.root)

    def __hash__(self) -> int:
        return hash((self.name, self._layout.root))

    # --- state ----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The derived state now (``prepared``, ``running``, ``halted``...), cheaply."""
        from microagent.state.runtime import runtime_state

        return runtime_state(self._layout, self.name).state

    def reload(self) -> Workspace:
        """Read the record again into :attr:`attrs`; returns the handle."""
        from microagent.errors import BrokenWorkspaceError
        from microagent.state.records import get_workspace

        try:
            self.attrs = get_workspace(self._layout, self.name).to_json()
        except BrokenWorkspaceError as e:
            self.attrs = e.workspace.to_json() if e.workspace is not None else {}
        return self

    def to_json(self) -> dict[str, Any]:
        """The record as ``list --json`` shows it (as of :attr:`attrs`)."""
        return dict(self.attrs or self.reload().attrs)

    def status(self, *, probe: bool = True) -> WorkspaceStatus:
        """The workspace in full; ``probe`` asks a running guest's agent (bounded)."""
        from microagent.workspace.lifecycle import workspace_status

        return WorkspaceStatus.from_status(workspace_status(self._layout, self.name,
                                                            probe=probe))

    # --- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = DEFAULT_START_TIMEOUT, *,
              setup_output: Callback | None = None, progress: Progress | None = None,
              from_snapshot: str | None = None, cold: bool = False) -> WorkspaceStatus:
        """Boot the workspace; return once it is ready for exec. A setup that a failed
        ``create`` left pending runs first (its output to ``setup_output``).

        A suspended workspace (and a fork's first start) resumes from its memory instead,
        unless ``cold`` (the memory is then discarded); ``from_snapshot`` restores the
        snapshot of that tag: its disks replace the workspace's and it runs on from that
        instant. An image this host cannot load is refused (ConflictError, what changed)
        before anything is touched."""
        from microagent.workspace.start import start_workspace

        check_timeout(timeout, "start timeout", zero=False)
        if from_snapshot is not None and cold:
            raise UsageError("from_snapshot and cold exclude each other")
        start_workspace(self._layout, self.name, timeout=timeout, progress=progress,
                        setup_output=setup_output or _discard,
                        from_snapshot=_text(from_snapshot, "snapshot tag")
                        if from_snapshot is not None else None, cold=cold)
        return self.status(probe=False)

    def snapshot(self, tag: str | None = None) -> Snapshot:
        """Save the memory, device state and writable disks of this running (or paused)
        workspace at one instant; it pauses for as little as it can and runs on. Default
        tag ``snap-YYYYMMDD-HHMMSS``. ConflictError when it is not running or has a
        read-write volume; HostError when there is no room."""
        from microagent.workspace.snapshots import snapshot_workspace

        return snapshot_workspace(self._layout, self.name,
                                  _text(tag, "snapshot tag") if tag is not None else None)

    def snapshots(self) -> list[Snapshot]:
        """This workspace's snapshots, oldest first."""
        from microagent.workspace.snapshots import workspace_snapshots

        return workspace_snapshots(self._layout, self.name)

    def delete_snapshot(self, tag: str) -> None:
        """Delete the snapshot ``tag`` (NotFoundError if there is none); forks made from
        it keep running and starting."""
        from microagent.workspace.snapshots import remove_snapshot

        remove_snapshot(self._layout, self.name, _text(tag, "snapshot tag"))

    def suspend(self) -> str:
        """Save the memory into the workspace's own slot and end the VM; returns
        ``suspended``. The next :meth:`start` resumes from it."""
        from microagent.workspace.snapshots import suspend_workspace

        suspend_workspace(self._layout, self.name)
        return "suspended"

    def halt(self) -> str:
        """Clean shutdown (the guest syncs and powers off); returns the state, halted."""
        from microagent.workspace.lifecycle import halt_workspace

        return halt_workspace(self._layout, self.name)

    def stop(self) -> str:
        """Ask the guest to power off; returns ``stopped``. If it has not within 5 s,
        MicroagentError: the workspace is marked ``failed`` and its VM left running
        (``kill`` ends it)."""
        from microagent.workspace.lifecycle import stop_workspace

        return stop_workspace(self._layout, self.name)

    def kill(self) -> str:
        """End the VM process at once."""
        from microagent.workspace.lifecycle import kill_workspace

        return kill_workspace(self._layout, self.name)

    def pause(self) -> str:
        """Stop the vCPUs; the VM, its sockets and its memory stay (state ``paused``:
        exec, files and console input are refused until :meth:`resume`)."""
        from microagent.workspace.lifecycle import pause_workspace

        return pause_workspace(self._layout, self.name)

    def resume(self) -> str:
        """Let a paused workspace run again (paused by :meth:`pause`, or by the host
        when its disk was full)."""
        from microagent.workspace.lifecycle import resume_workspace

        return resume_workspace(self._layout, self.name)

    def quarantine(self) -> str:
        """Sever network, exec, cp and console input; the VM keeps running."""
        from microagent.workspace.quarantine import quarantine_workspace

        return quarantine_workspace(self._layout, self.name)

    def delete(self) -> bool:
        """Delete the workspace and its disk (ConflictError while a VM process lives);
        False when there was nothing to delete."""
        from microagent.config import validate_name
        from microagent.state.records import delete_workspace
        from microagent.vm.memory import sweep_memory_files

        deleted = delete_workspace(self._layout, validate_name(self.name))
        sweep_memory_files()  # a killed supervisor's RAM file, if any
        return deleted

    def wait(self, state: str | Sequence[str] = ("halted", "stopped", "failed"),
             timeout: float | None = 60.0) -> WorkspaceStatus:
        """Block until the workspace is in ``state`` (one or several); WaitTimeoutError
        after ``timeout`` seconds (None: no limit)."""
        import dataclasses

        from microagent.workspace.watch import wait_for_state

        if timeout is not None:
            check_timeout(timeout, "wait timeout", zero=True)
        states = [state] if isinstance(state, str) else list(state)
        reached = wait_for_state(self._layout, self.name, states, timeout=timeout)
        # the state waited for, even if it has moved on since (a restart policy)
        return dataclasses.replace(self.status(probe=False), state=reached.state,
                                   detail=reached.detail)

    # --- commands ---------------------------------------------------------------------

    def exec(self, command: str | Sequence[str], *,
             env: Mapping[str, str] | Sequence[str] | None = None, cwd: str | None = None,
             user: str | None = None, stdin: bytes | str | None = None,
             timeout: float | None = None, check: bool = False,
             on_stdout: Callback | None = None,
             on_stderr: Callback | None = None) -> ExecResult:
        """Run ``command`` in the running workspace and return how it ended, its output
        captured (and given to ``on_stdout``/``on_stderr`` as it arrives).

        A str runs through ``/bin/sh -c``. The image's Env, WorkingDir and User apply
        unless ``env``, ``cwd``, ``user`` say otherwise. ``stdin`` is the command's whole
        input (none: it reads end of file). ``timeout`` (seconds) ends the command;
        the result says ``timed_out``. A non-zero exit is a result; with ``check``,
        CommandFailedError.
        """
        from microagent.workspace.execution import ExecOptions, run_exec

        if timeout is not None:
            check_timeout(timeout, "exec timeout", zero=False)
        options = ExecOptions(argv=argv_of(command), env=env_items(env, "env"),
                              workdir=cwd or "", user=user or "",
                              interactive=stdin is not None, timeout=timeout or 0.0)
        out, err = bytearray(), bytearray()
        stdin_fd = _stdin_file(stdin) if stdin is not None else None
        try:
            raw = run_exec(self._layout, self.name, options,
                           stdout=_tee(out, on_stdout), stderr=_tee(err, on_stderr),
                           stdin_fd=stdin_fd, forward_signals=False)
        finally:
            if stdin_fd is not None:
                os.close(stdin_fd)
        result = ExecResult.from_agent(raw, bytes(out), bytes(err))
        return result.check() if check else result

    def exec_attached(self, command: str | Sequence[str], *,
                      env: Mapping[str, str] | Sequence[str] | None = None,
                      cwd: str | None = None, user: str | None = None,
                      interactive: bool = False, tty: bool = False,
                      timeout: float | None = None, stdout: Callback | None = None,
                      stderr: Callback | None = None) -> ExecResult:
        """Run ``command`` on this process's terminal, as ``microagent exec`` does:
        output streamed to ``stdout``/``stderr`` (default: this process's), not kept;
        with ``interactive`` this process's stdin is the command's; with ``tty`` a
        pseudo-terminal (the local terminal goes raw meanwhile, and follows resizes).
        In the main thread, SIGINT, SIGTERM, SIGHUP and SIGQUIT are forwarded to the
        command. The result's ``host_exit_code`` is what the CLI exits with."""
        from microagent.workspace.execution import ExecOptions, run_exec

        if timeout is not None:
            check_timeout(timeout, "exec timeout", zero=True)
        options = ExecOptions(argv=argv_of(command), env=env_items(env, "env"),
                              workdir=cwd or "", user=user or "", interactive=interactive,
                              tty=tty, timeout=timeout or 0.0)
        raw = run_exec(self._layout, self.name, options,
                       stdout=stdout or _stream_writer(1), stderr=stderr or _stream_writer(2))
        return ExecResult.from_agent(raw)

    def spawn(self, command: str | Sequence[str], *,
              env: Mapping[str, str] | Sequence[str] | None = None, cwd: str | None = None,
              user: str | None = None) -> Process:
        """Start ``command`` in the background and return its :class:`Process` at once.

        It belongs to the guest: it outlives this Python process and the workspace's
        supervisor relay, and ``ws.process(id)`` finds it again. A str runs through
        ``/bin/sh -c``; the image's Env, WorkingDir and User apply as for :meth:`exec`.
        Its stdin is a pipe until :meth:`Process.close_stdin`; its output is kept in the
        guest (the first and last MiB of each stream). A command that cannot start raises:
        CommandNotFoundError (a NotFoundError) when it is not found,
        CommandNotExecutableError when it cannot be executed, AgentFileError otherwise
        (a missing directory, an unknown user)."""
        from microagent.api.processes import Process
        from microagent.workspace.processes import spawn_process

        info = spawn_process(self._layout, self.name, argv_of(command),
                             env=env_items(env, "env"), cwd=cwd or "", user=user or "")
        return Process(self._layout, self.name, info.id)

    def processes(self) -> list[Process]:
        """The background processes the guest knows (running and ended), oldest first."""
        from microagent.api.processes import Process
        from microagent.workspace.processes import list_processes

        return [Process(self._layout, self.name, info.id)
                for info in list_processes(self._layout, self.name)]

    def process(self, process_id: int) -> Process:
        """The background process ``process_id``; NotFoundError when the guest has none."""
        from microagent.api.processes import Process
        from microagent.workspace.processes import process_info

        if isinstance(process_id, bool) or not isinstance(process_id, int) or process_id < 1:
            raise UsageError(f"invalid process id {process_id!r}: a positive int")
        process_info(self._layout, self.name, process_id)
        return Process(self._layout, self.name, process_id)

    def console_send(self, line: str, *, timeout: float = 10.0) -> tuple[bytes, int | None]:
        """Type one line into the console shell; return what it printed and the line's
        exit status (None when the shell did not say). ConsoleTimeoutError past
        ``timeout`` (the line is interrupted with Ctrl-C)."""
        from microagent.workspace.connect import send_line

        check_timeout(timeout, "console timeout", zero=False)
        answer = send_line(self._layout, self.name, line, timeout=timeout)
        return answer.output, answer.exit_code

    def attach_console(self) -> str:
        """Relay this process's terminal to the console shell until Ctrl-] (returns
        ``"detached"``) or the VM ends (``"closed"``)."""
        from microagent.workspace.connect import attach_console

        return attach_console(self._layout, self.name)

    # --- files ------------------------------------------------------------------------

    def copy_in(self, source: str | os.PathLike[str], destination: str, *,
                archive: bool = False) -> CopyResult:
        """Copy a host file or tree into the workspace (running: through the agent;
        halted: into its disk), by ``cp``'s rules."""
        from microagent.workspace.copy import copy

        return copy(self._layout, _local(source), f"{self.name}:{destination}",
                    archive=archive)

    def copy_out(self, source: str, destination: str | os.PathLike[str], *,
                 archive: bool = False) -> CopyResult:
        """Copy a guest file or tree to the host, by ``cp``'s rules (setuid and setgid
        dropped unless ``archive``)."""
        from microagent.workspace.copy import copy

        return copy(self._layout, f"{self.name}:{source}", _local(destination),
                    archive=archive)

    # --- observing --------------------------------------------------------------------

    def logs(self, tail: int | None = None, *, previous: bool = False) -> str:
        """The console captured during the last boot (``previous``: the one before),
        or its last ``tail`` lines, as text."""
        return self.log_bytes(tail, previous=previous).decode("utf-8", "replace")

    def log_bytes(self, tail: int | None = None, *, previous: bool = False) -> bytes:
        """:meth:`logs` as the bytes the console wrote (line ends as LF)."""
        from microagent.workspace.logs import read_log

        _check_tail(tail)
        return read_log(self._layout, self.name, tail=tail, previous=previous)

    def follow_logs(self, tail: int | None = None) -> Iterator[bytes]:
        """The console as it is written, across boots, until the caller stops iterating;
        starts with the last ``tail`` lines (None: all of the current boot's)."""
        from microagent.workspace.logs import follow_log

        _check_tail(tail)
        return follow_log(self._layout, self.name, tail=tail)

    def events(self) -> list[Event]:
        """Every lifecycle event of the workspace, oldest first."""
        return list(self.follow_events(follow=False))

    def follow_events(self, *, follow: bool = True) -> Iterator[Event]:
        """The events so far, then (with ``follow``) each new one as it is recorded,
        until the caller stops or the workspace is deleted."""
        from microagent.workspace.watch import follow_events

        return follow_events(self._layout, self.name, follow=follow)


class Files:
    """The files of a running workspace's guest, through its agent (``ws.files``)."""

    def __init__(self, workspace: Workspace) -> None:
        self._ws = workspace

    def read(self, path: str) -> bytes:
        """The whole content of the guest file ``path``; NotFoundError if missing."""
        from microagent.workspace.guestfiles import read_file

        data = bytearray()
        read_file(self._ws._layout, self._ws.name, _guest(path), data.extend)
        return bytes(data)

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """The guest file ``path`` as text."""
        return self.read(path).decode(encoding)

    def write(self, path: str, data: bytes | str | io.BufferedIOBase, *,
              mode: int = 0o644) -> None:
        """Write ``data`` to the guest file ``path`` (replaced atomically; parents
        created); a str is written as UTF-8, a binary stream read to its end."""
        from microagent.workspace.guestfiles import write_file

        if not 0 <= mode <= 0o7777:
            raise UsageError(f"invalid mode {mode:o}: permission bits, at most 0o7777")
        content = (data.encode() if isinstance(data, str) else
                   bytes(data) if isinstance(data, bytes | bytearray | memoryview) else data.read)
        write_file(self._ws._layout, self._ws.name, _guest(path), content, mode=mode)

    def list(self, path: str) -> list[FileEntry]:
        """The entries of the guest directory ``path``, sorted by name."""
        from microagent.workspace.guestfiles import list_dir

        return [FileEntry.from_guest(e)
                for e in list_dir(self._ws._layout, self._ws.name, _guest(path))]

    def stat(self, path: str) -> FileEntry:
        """What ``path`` is (a symlink itself, not its target); NotFoundError if missing."""
        from microagent.workspace.guestfiles import stat

        return FileEntry.from_guest(stat(self._ws._layout, self._ws.name, _guest(path)))

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists in the guest (a dangling symlink does)."""
        from microagent.errors import NotFoundError

        try:
            self.stat(path)
        except NotFoundError:
            return False
        return True

    def remove(self, path: str, *, recursive: bool = False) -> int:
        """Remove a file, a symlink or an empty directory (``recursive``: a tree; links
        are never followed); NotFoundError if missing. How many entries went."""
        from microagent.workspace.guestfiles import remove

        return remove(self._ws._layout, self._ws.name, _guest(path), recursive=recursive)

    def mkdir(self, path: str, *, mode: int = 0o755, parents: bool = True) -> bool:
        """Make the guest directory ``path`` (with its parents, unless ``parents`` is
        False); an existing directory is fine. Whether it was made."""
        from microagent.workspace.guestfiles import mkdir

        return mkdir(self._ws._layout, self._ws.name, _guest(path), mode=mode, parents=parents)


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"invalid {what} {value!r}: a non-empty str")
    return value


def _check_tail(tail: int | None) -> None:
    if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 0):
        raise UsageError(f"invalid tail {tail!r}: a number of lines, 0 or more")


def _guest(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise UsageError(f"invalid guest path {path!r}: an absolute path")
    return path


def _local(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    # cp's endpoint syntax reads NAME:/path; a local path with a colon stays local
    return text if text.startswith(("/", ".")) or ":" not in text else f"./{text}"


def check_timeout(value: float, what: str, *, zero: bool) -> None:
    import math

    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise UsageError(f"invalid {what} {value!r}: a number of seconds above 0")


def _stream_writer(fd: int) -> Callback:
    import sys

    stream = sys.stdout if fd == 1 else sys.stderr

    def sink(data: bytes) -> None:
        stream.buffer.write(data)
        stream.buffer.flush()
    return sink


def _tee(buffer: bytearray, callback: Callback | None) -> Callback:
    if callback is None:
        return buffer.extend

    def sink(data: bytes) -> None:
        buffer.extend(data)
        callback(bytes(data))
    return sink


def _stdin_file(data: bytes | str) -> int:
    """An fd holding ``data`` from its start: an anonymous memory file, read to EOF."""
    content = data.encode() if isinstance(data, str) else bytes(data)
    fd = os.memfd_create("microagent-stdin", os.MFD_CLOEXEC)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _discard(_data: bytes) -> None:
    pass
