"""The MCP tools: each a thin call into the public API (``microagent.api``).

Every tool returns a :class:`CallToolResult` with ``structured_content`` (the data) and a
short text rendering of it; a :class:`~microagent.errors.MicroagentError` it raises
becomes a tool error in ``server.py``. Output that can be large (command output, files,
logs, listings) is bounded by the server's ``max_output_bytes``.

No ``from __future__ import annotations`` here: the SDK reads these signatures to build
the tools' input schemas, and real annotation objects need no name resolution.
"""

import base64
import builtins
import contextlib
import json
import shlex
import time
from collections.abc import Callable
from typing import Annotated, Any, TypedDict

from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from microagent.api.client import Microagent
from microagent.api.results import WorkspaceStatus
from microagent.api.workspace import Workspace
from microagent.errors import (
    CommandNotExecutableError,
    CommandNotFoundError,
    ConflictError,
    MicroagentError,
    NotFoundError,
    UsageError,
)
from microagent.mcpserver.background import (
    KILL_WAIT_S,
    Deadlines,
    process_data,
    render,
    wait_ended,
)
from microagent.mcpserver.bounded import bound

DEFAULT_EXEC_TIMEOUT_S = 300.0
DEFAULT_YIELD_S = 30.0
MAX_WAIT_S = 300.0  # process_output's longest wait
SIGNAL_WAIT_S = 2.0  # process_kill's wait for the end
MAX_COMMAND_CHARS = 200
DEFAULT_READ_LINES = 2000
MAX_LIST_ENTRIES = 1000

Name = Annotated[str, Field(description="workspace name")]
Path = Annotated[str, Field(description="absolute path in the guest")]


class ExecOutput(TypedDict):
    """What ``exec`` returns (its published output schema)."""

    status: str  # exited, signaled, timed_out or running
    exit_code: int | None
    signal: int | None
    process_id: int | None  # None: the command did not start
    stdout: str
    stderr: str
    stdout_bytes: int  # from since
    stderr_bytes: int
    truncated: bool
    duration_ms: int | None
    next_since: int
    next_since_stderr: int


def result(data: dict[str, Any], text: str | None = None) -> CallToolResult:
    """A tool's answer: ``data`` structured, and ``text`` (default: ``data`` as JSON)."""
    rendered = text if text is not None else json.dumps(data, separators=(",", ":"))
    return CallToolResult(content=[TextContent(type="text", text=rendered)],
                          structured_content=data)


def status_data(st: WorkspaceStatus) -> dict[str, Any]:
    """The part of a status a model needs (the full document is ``microagent status``)."""
    data: dict[str, Any] = {"name": st.name, "state": st.state, "ready": st.readiness.exec}
    for key, value in (("detail", st.detail), ("image", st.image), ("profile", st.profile),
                       ("uptime_s", round(st.uptime_s, 1) if st.uptime_s else None),
                       ("address", st.address), ("ports", list(st.ports)),
                       ("error", st.error)):
        if value:
            data[key] = value
    return data


def _state(name: str, state: str) -> CallToolResult:
    return result({"name": name, "state": state}, f"{name}: {state}")


READ_ONLY = ToolAnnotations(read_only_hint=True)
IDEMPOTENT = ToolAnnotations(read_only_hint=False, destructive_hint=False,
                             idempotent_hint=True)
ADDITIVE = ToolAnnotations(read_only_hint=False, destructive_hint=False,
                           idempotent_hint=False)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True,
                              idempotent_hint=False)
DESTRUCTIVE_IDEMPOTENT = ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                         idempotent_hint=True)


class Tools:
    """The tools of one server: a client of one state directory and the output bound."""

    def __init__(self, client: Microagent, max_output_bytes: int) -> None:
        self.client = client
        self.max_output_bytes = max_output_bytes
        self.deadlines = Deadlines()

    def _ws(self, name: str) -> Workspace:
        return self.client.handle(name)

    def _limit(self, requested: int | None) -> int:
        if requested is None:
            return self.max_output_bytes
        if requested < 1:
            raise UsageError(f"invalid max_output_bytes {requested}: 1 or more")
        return requested

    # --- workspaces -----------------------------------------------------------------

    def list_workspaces(self) -> CallToolResult:
        """List the workspaces with their state and image."""
        rows = [{"name": w.name, "state": w.state, "image": w.attrs.get("image")}
                for w in self.client.list()]
        text = "\n".join(f"{r['name']}  {r['state']}  {r['image'] or ''}" for r in rows)
        return result({"workspaces": rows}, text or "no workspaces")

    def create_workspace(
            self, name: Name,
            image: Annotated[str, Field(description="OCI image reference")],
            profile: Annotated[str | None, Field(
                description="tiny, small, medium or large")] = None,
            setup: Annotated[list[str] | None, Field(
                description="shell commands run once at creation")] = None,
            volumes: Annotated[list[str] | None, Field(description="VOLUME:/dst[:ro]")] = None,
            publish: Annotated[list[str] | None, Field(
                description="[HOST_IP:]HOST_PORT:GUEST_PORT")] = None,
            network: Annotated[str, Field(description="user or none")] = "user",
            start: bool = True) -> CallToolResult:
        """Create a persistent workspace (a microVM) from an image, and start it."""
        ws = self.client.create(name, image, profile=profile, setup=setup or (),
                                volumes=volumes or (), publish=publish or (), network=network)
        st = ws.start() if start else ws.status(probe=False)
        data = status_data(st)
        return result(data, f"{name}: {data['state']}")

    def workspace_status(self, name: Name) -> CallToolResult:
        """The state of a workspace, whether exec is ready, its uptime and ports."""
        data = status_data(self._ws(name).status())
        return result(data)

    def start_workspace(self, name: Name,
                        timeout_s: Annotated[float, Field(gt=0)] = 120.0,
                        from_snapshot: Annotated[str | None, Field(description=(
                            "snapshot tag to restore (halt first); later writes are lost"))
                                                 ] = None,
                        cold: Annotated[bool, Field(
                            description="discard a suspended memory")] = False
                        ) -> CallToolResult:
        """Boot a workspace, or resume a suspended one; returns once exec is ready."""
        ws = self._ws(name)
        data = status_data(ws.start(timeout_s, from_snapshot=from_snapshot, cold=cold))
        text = f"{name}: {data['state']}"
        return result(data, f"{text} (from {from_snapshot})" if from_snapshot else text)

    def suspend_workspace(self, name: Name) -> CallToolResult:
        """Save a running workspace's memory and end its VM; start_workspace resumes it."""
        return _state(name, self._ws(name).suspend())

    def halt_workspace(self, name: Name) -> CallToolResult:
        """Shut a workspace down cleanly; its disk persists."""
        return _state(name, self._ws(name).halt())

    def delete_workspace(self, name: Name, force: Annotated[bool, Field(
            description="kill a running VM first")] = False) -> CallToolResult:
        """Delete a workspace and its disk (halt it first, or force)."""
        ws = self._ws(name)
        if force and ws.state not in ("prepared", "halted", "stopped", "failed",
                                      "suspended", "broken"):
            ws.kill()
        if not ws.delete():
            raise NotFoundError(f"no workspace named {name!r}",
                                hint="list_workspaces shows the names")
        return result({"name": name, "deleted": True}, f"{name}: deleted")

    def pause_workspace(self, name: Name) -> CallToolResult:
        """Freeze a running workspace in memory (resume_workspace)."""
        return _state(name, self._ws(name).pause())

    def resume_workspace(self, name: Name) -> CallToolResult:
        """Let a paused workspace run again."""
        return _state(name, self._ws(name).resume())

    def snapshot_workspace(self, name: Name, tag: str | None = None) -> CallToolResult:
        """Save a running workspace's memory and disks as snapshot TAG (fork_workspace)."""
        snap = self._ws(name).snapshot(tag)
        return result(snap.to_json(), f"snapshot {snap.workspace}:{snap.tag}")

    def fork_workspace(self, name: Name,
                       source: Annotated[str, Field(description="snapshot NAME:TAG")],
                       start: bool = True) -> CallToolResult:
        """A new workspace NAME from a snapshot, resuming from its memory."""
        ws = self.client.fork(name, source)
        data = status_data(ws.start() if start else ws.status(probe=False))
        return result(data, f"{name}: {data['state']} (from {source})")

    def workspace_logs(self, name: Name, tail: Annotated[int, Field(ge=1)] = 100
                       ) -> CallToolResult:
        """A workspace's console tail (boot and kernel messages)."""
        text, truncated, _ = bound(self._ws(name).log_bytes(tail), self.max_output_bytes)
        return result({"logs": text, "truncated": truncated}, text)

    # --- commands ---------------------------------------------------------------------

    def exec(self, name: Name,
             command: Annotated[str | list[str], Field(
                 description="a str runs through /bin/sh -c; a list is the argv")],
             cwd: str | None = None, env: dict[str, str] | None = None,
             stdin: Annotated[str | None, Field(description="the whole input")] = None,
             timeout_s: Annotated[float, Field(gt=0, description="then killed")
                                  ] = DEFAULT_EXEC_TIMEOUT_S,
             yield_s: Annotated[float, Field(ge=0, description=(
                 "then, still running, it goes on as process_id"))] = DEFAULT_YIELD_S,
             stdin_open: Annotated[bool, Field(description="for process_input")] = False,
             max_output_bytes: Annotated[int | None, Field(
                 description="per stream; head and tail kept")] = None,
             ) -> Annotated[CallToolResult, ExecOutput]:
        """Run a command in a running workspace. A non-zero exit is a result, not an error."""
        limit = self._limit(max_output_bytes)
        ws = self._ws(name)
        try:
            process = ws.spawn(command, env=env, cwd=cwd)
        except MicroagentError as e:
            failed = _not_started(e)
            if failed is None:
                raise
            return failed
        started = time.monotonic()
        if stdin is not None or not stdin_open:
            with contextlib.suppress(ConflictError):  # it ended (or closed stdin) already
                process.write(stdin or "", close=not stdin_open)
        ended = wait_ended(process, min(yield_s, timeout_s) - (time.monotonic() - started))
        if not ended and timeout_s <= yield_s:
            self.deadlines.expire(process)  # its timeout passed: kill it now
            ended = wait_ended(process, KILL_WAIT_S)
        elif not ended:
            self.deadlines.arm(process, timeout_s - (time.monotonic() - started))
        data = process_data(process, limit, deadlines=self.deadlines)
        if data["duration_ms"] is None:
            data["duration_ms"] = round((time.monotonic() - started) * 1000)
        return result(data, render(data))

    def process_output(self, name: Name, process_id: int,
                       since: Annotated[int, Field(ge=0, description="stdout offset")] = 0,
                       since_stderr: Annotated[int, Field(ge=0)] = 0,
                       wait_s: Annotated[float, Field(
                           ge=0, le=MAX_WAIT_S, description="wait up to this for its end")
                                         ] = 0.0,
                       max_output_bytes: int | None = None) -> CallToolResult:
        """A background process's output from offsets, bounded; its status (as exec)."""
        limit = self._limit(max_output_bytes)
        process = self._ws(name).process(process_id)
        wait_ended(process, wait_s)
        data = process_data(process, limit, since, since_stderr, self.deadlines)
        return result(data, render(data))

    def process_input(self, name: Name, process_id: int, data: str = "",
                      close_stdin: bool = False) -> CallToolResult:
        """Write text to a background process's stdin; close_stdin closes it."""
        written = self._ws(name).process(process_id).write(data, close=close_stdin)
        return result({"process_id": process_id, "written": written,
                       "stdin_open": not close_stdin},
                      f"wrote {written} bytes" + (", stdin closed" if close_stdin else ""))

    def process_kill(self, name: Name, process_id: int,
                     signal: Annotated[str, Field(description="TERM, KILL, INT, HUP...")
                                       ] = "TERM") -> CallToolResult:
        """Signal a background process's group; its status a moment later."""
        process = self._ws(name).process(process_id)
        process.signal(signal)
        wait_ended(process, SIGNAL_WAIT_S)
        info = process.info()
        data = {"process_id": process_id, "status": info.state,
                "exit_code": info.exit_code, "signal": info.signal}
        return result(data, f"process {process_id}: {info.state}")

    def list_processes(self, name: Name) -> CallToolResult:
        """The background processes of a workspace (running and ended)."""
        rows = []
        for process in self._ws(name).processes():
            info = process.info()
            rows.append({"process_id": info.id, "status": info.state,
                         "exit_code": info.exit_code, "signal": info.signal,
                         "command": shlex.join(info.argv)[:MAX_COMMAND_CHARS],
                         "stdout_bytes": info.stdout_size,
                         "stderr_bytes": info.stderr_size})
        text = "\n".join(f"{r['process_id']}  {r['status']}  "
                         f"{'' if r['exit_code'] is None else r['exit_code']}  {r['command']}"
                         for r in rows)
        return result({"processes": rows}, text or "no processes")

    # --- files ------------------------------------------------------------------------

    def read_file(self, name: Name, path: Path,
                  offset: Annotated[int, Field(ge=1, description="first line, from 1")] = 1,
                  limit: Annotated[int, Field(ge=1, description="lines")] = DEFAULT_READ_LINES
                  ) -> CallToolResult:
        """Read a text file's lines (UTF-8); next_offset says where to go on."""
        data = self._ws(name).files.read(path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            chunk = data[:self.max_output_bytes]
            return result({"path": path, "size": len(data), "encoding": "base64",
                           "content": base64.b64encode(chunk).decode(),
                           "truncated": len(chunk) < len(data)},
                          f"{path}: binary, {len(data)} bytes (base64 in structured content)")
        lines = text.splitlines(keepends=True)
        taken: list[str] = []
        size = 0
        for line in lines[offset - 1:offset - 1 + limit]:
            size += len(line.encode())
            if size > self.max_output_bytes and taken:
                break
            taken.append(line)
        content = "".join(taken)
        end = offset - 1 + len(taken)
        next_offset = end + 1 if end < len(lines) else None
        data_out = {"path": path, "content": content, "lines": len(lines),
                    "next_offset": next_offset}
        more = f"\n[lines {offset}-{end} of {len(lines)}; next offset {next_offset}]" \
            if next_offset else ""
        return result(data_out, content + more)

    def write_file(self, name: Name, path: Path, content: str) -> CallToolResult:
        """Write a UTF-8 text file (replaced whole; parent directories made)."""
        files = self._ws(name).files
        mode = _mode_of(files, path)
        data = content.encode()
        files.write(path, data, mode=mode)
        return result({"path": path, "bytes": len(data)}, f"wrote {len(data)} bytes to {path}")

    def edit_file(self, name: Name, path: Path,
                  old: Annotated[str, Field(description="exact text to replace")],
                  new: str, replace_all: bool = False) -> CallToolResult:
        """Replace exact text in a file; refused when old is missing or not unique."""
        files = self._ws(name).files
        try:
            text = files.read(path).decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{path} is not UTF-8 text", hint="use write_file") from None
        if not old:
            raise UsageError("old is empty", hint="give the exact text to replace")
        count = text.count(old)
        if count == 0:
            raise UsageError(f"old text not found in {path}",
                             hint="read_file it and copy the text exactly, whitespace included")
        if count > 1 and not replace_all:
            raise ConflictError(f"old text occurs {count} times in {path}",
                                hint="add surrounding lines to make it unique, "
                                     "or set replace_all")
        files.write(path, text.replace(old, new), mode=_mode_of(files, path))
        done = count if replace_all else 1
        return result({"path": path, "replacements": done},
                      f"{path}: {done} replacement{'s' if done != 1 else ''}")

    def list_files(self, name: Name, path: Path = "/") -> CallToolResult:
        """List a guest directory: kind, size and name of each entry."""
        entries = self._ws(name).files.list(path)
        rows = [{"name": e.name, "kind": e.kind, "size": e.size}
                for e in entries[:MAX_LIST_ENTRIES]]
        lines = [f"{r['kind']:<7} {r['size']:>10}  {r['name']}" for r in rows]
        data: dict[str, Any] = {"path": path, "entries": rows}
        if len(entries) > MAX_LIST_ENTRIES:
            data["left_out"] = len(entries) - MAX_LIST_ENTRIES
            lines.append(f"[{data['left_out']} more entries left out]")
        return result(data, "\n".join(lines) or f"{path}: empty")

    # --- more, with --all-tools -------------------------------------------------------

    def stop_workspace(self, name: Name) -> CallToolResult:
        """Ask the guest to power off now (no clean shutdown of its services)."""
        return _state(name, self._ws(name).stop())

    def kill_workspace(self, name: Name) -> CallToolResult:
        """End a workspace's VM process at once."""
        return _state(name, self._ws(name).kill())

    def quarantine_workspace(self, name: Name) -> CallToolResult:
        """Cut a workspace's network, exec and file access; the VM keeps running."""
        return _state(name, self._ws(name).quarantine())

    def copy(self, source: Annotated[str, Field(description="NAME:/path or a host path")],
             destination: Annotated[str, Field(description="NAME:/path or a host path")]
             ) -> CallToolResult:
        """Copy files between the host and a workspace (one side NAME:/path)."""
        done = self.client.copy(source, destination)
        return result({"source": source, "destination": destination, "done": str(done)})

    def list_images(self) -> CallToolResult:
        """List the cached images."""
        images = self.client.images.list()
        rows = [{"reference": i.reference, "size": i.size} for i in images]
        return result({"images": rows}, "\n".join(i.reference for i in images) or "no images")

    def pull_image(self, reference: str) -> CallToolResult:
        """Pull an OCI image into the cache."""
        image = self.client.images.pull(reference)
        return result({"reference": image.reference, "digest": image.digest,
                       "size": image.size})

    def list_volumes(self) -> CallToolResult:
        """List the named volumes and what they are attached to."""
        rows = [{"name": v.name, "size_mib": v.size_mib, "attached_to": v.attached_to}
                for v in self.client.volumes.list()]
        return result({"volumes": rows})

    def doctor(self) -> CallToolResult:
        """Check the host: whether workspaces can run here, and what to fix."""
        checks = [c.to_json() for c in self.client.doctor()]
        text = "\n".join(f"{c['status']} {c['name']}: {c['detail']}"
                         + (f" (fix: {c['fix']})" if c["fix"] else "") for c in checks)
        return result({"checks": checks}, text)


def _not_started(error: MicroagentError) -> CallToolResult | None:
    """A command the guest could not start (not found, not executable) as the result a
    shell gives (127, 126), with the reason on stderr; None for other errors."""
    if not isinstance(error, CommandNotFoundError | CommandNotExecutableError):
        return None
    code = error.exit_code
    data = {"status": "exited", "exit_code": code, "signal": None, "process_id": None,
            "stdout": "", "stderr": error.message, "stdout_bytes": 0,
            "stderr_bytes": len(error.message.encode()), "truncated": False,
            "duration_ms": None, "next_since": 0, "next_since_stderr": 0}
    return result(data, f"[exit {code}]\n[stderr]\n{error.message}")


def _mode_of(files: Any, path: str) -> int:
    """An existing file's permission bits (kept by a rewrite), else 0o644."""
    try:
        return int(files.stat(path).mode) & 0o7777
    except NotFoundError:
        return 0o644


DEFAULT_TOOLS: dict[str, ToolAnnotations] = {
    "list_workspaces": READ_ONLY,
    "create_workspace": ADDITIVE,
    "workspace_status": READ_ONLY,
    # from_snapshot replaces the disk: what was written since the snapshot is lost
    "start_workspace": DESTRUCTIVE_IDEMPOTENT,
    "halt_workspace": IDEMPOTENT,
    # as halt: the VM ends, and the memory is kept too (a second call is refused, no effect)
    "suspend_workspace": IDEMPOTENT,
    "delete_workspace": DESTRUCTIVE_IDEMPOTENT,
    "exec": DESTRUCTIVE,
    "process_output": READ_ONLY,
    "process_input": DESTRUCTIVE,
    "process_kill": DESTRUCTIVE,
    "list_processes": READ_ONLY,
    "read_file": READ_ONLY,
    "write_file": DESTRUCTIVE_IDEMPOTENT,
    "edit_file": DESTRUCTIVE,
    "list_files": READ_ONLY,
    "workspace_logs": READ_ONLY,
    "snapshot_workspace": ADDITIVE,
    "fork_workspace": ADDITIVE,
    "pause_workspace": IDEMPOTENT,
    "resume_workspace": IDEMPOTENT,
}
EXTRA_TOOLS: dict[str, ToolAnnotations] = {
    "stop_workspace": DESTRUCTIVE_IDEMPOTENT,
    "kill_workspace": DESTRUCTIVE_IDEMPOTENT,
    "quarantine_workspace": DESTRUCTIVE_IDEMPOTENT,
    "copy": DESTRUCTIVE,
    "list_images": READ_ONLY,
    "pull_image": ADDITIVE,
    "list_volumes": READ_ONLY,
    "doctor": READ_ONLY,
}
ALL_TOOLS = {**DEFAULT_TOOLS, **EXTRA_TOOLS}


def tool_functions(tools: Tools, names: builtins.list[str]
                   ) -> builtins.list[tuple[str, Callable[..., Any], ToolAnnotations]]:
    """The bound methods of ``names``, with their annotations, in catalogue order."""
    unknown = sorted(set(names) - set(ALL_TOOLS))
    if unknown:
        raise UsageError(f"unknown tool {', '.join(unknown)}",
                         hint="the tools are: " + ", ".join(ALL_TOOLS))
    return [(n, getattr(tools, n), a) for n, a in ALL_TOOLS.items() if n in names]
