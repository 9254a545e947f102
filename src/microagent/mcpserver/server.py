"""``microagent serve mcp``: the MCP server over the public API (the official SDK).

:func:`build_server` registers the tools of ``tools.py`` on an ``MCPServer``;
:class:`WorkspaceServer` turns every :class:`~microagent.errors.MicroagentError` a tool
raises (and a malformed argument) into a tool error whose text is the kind, the message
and the hint, so the model reads what went wrong and what to do. :func:`serve` runs it
on stdio, on streamable HTTP bound to loopback, or on a Unix socket.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, Tool
from pydantic import ValidationError

from microagent import __version__
from microagent.api.client import Microagent
from microagent.errors import MicroagentError, UsageError
from microagent.mcpserver.bounded import DEFAULT_MAX_OUTPUT_BYTES, MIN_OUTPUT_BYTES
from microagent.mcpserver.tools import DEFAULT_TOOLS, EXTRA_TOOLS, Tools, tool_functions

INSTRUCTIONS = (
    "microagent runs persistent Linux workspaces, each a microVM with its own disk: files, "
    "installed packages and running state outlive this conversation until "
    "delete_workspace. create_workspace boots one from an OCI image (list_workspaces shows "
    "those that exist; start_workspace boots a halted one). exec runs a command (a string "
    "goes through /bin/sh -c); a non-zero exit is a result, not an error. One still "
    "running after yield_s (default 30) goes on in the background: the result says status "
    "running and its process_id; process_output (with the next_since offsets, wait_s) "
    "continues it, process_input writes its stdin, process_kill signals it, list_processes "
    "lists them; timeout_s still kills it. Output is bounded per stream: the head and tail "
    "are kept and a marker says how much was left out and which guest file keeps it all, "
    "to grep or read_file. Use read_file, write_file and "
    "edit_file (exact, unique replacement) for files rather than shell heredocs. "
    "snapshot_workspace and fork_workspace save and branch a running workspace; "
    "start_workspace from_snapshot takes a halted one back to a snapshot. "
    "suspend_workspace ends the VM but keeps its memory: the next start_workspace resumes "
    "its processes where they were. Errors say their kind, what happened and what to do."
)


class WorkspaceServer(MCPServer[Any]):
    """An ``MCPServer`` whose tool errors carry microagent's kind, message and hint, and
    whose tool list is compact (every tool costs the model context on every turn)."""

    async def list_tools(self) -> list[Tool]:
        return [tool.model_copy(update={
                    "input_schema": compact_schema(tool.input_schema),
                    "output_schema": compact_schema(tool.output_schema, output=True)
                    if tool.output_schema else None})
                for tool in await super().list_tools()]

    async def call_tool(self, name: str, arguments: dict[str, Any],
                        context: Any = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as e:
            cause = e.__cause__
            if isinstance(cause, MicroagentError):
                return error_result(cause)
            if isinstance(cause, ValidationError):
                return error_result(UsageError(
                    f"invalid arguments for {name}: " + "; ".join(
                        f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
                        for err in cause.errors()),
                    hint="see the tool's input schema"))
            raise


def compact_schema(schema: dict[str, Any], *, output: bool = False) -> dict[str, Any]:
    """A JSON schema without pydantic's generated titles and descriptions of the model,
    and an optional argument as its type (``anyOf [T, null]`` with default null: the
    argument is simply left out), and ``anyOf [T, null]`` otherwise as the type list
    ``[T, "null"]``; ``output``: without the list of required keys (a result has them
    all). Arguments are still validated by the full model."""
    properties = {}
    for key, prop in (schema.get("properties") or {}).items():
        prop = {k: v for k, v in prop.items() if k != "title"}
        options = prop.get("anyOf")
        if options and len(options) == 2 and {"type": "null"} in options \
                and "default" in prop and prop["default"] is None:
            (kept,) = [o for o in options if o != {"type": "null"}]
            prop = {**{k: v for k, v in prop.items() if k not in ("anyOf", "default")},
                    **kept}
        elif options and len(options) == 2 and {"type": "null"} in options \
                and all(set(o) == {"type"} and isinstance(o["type"], str) for o in options):
            prop = {**{k: v for k, v in prop.items() if k != "anyOf"},
                    "type": [o["type"] for o in options]}  # T or null, as a type list
        properties[key] = prop
    left_out = ("title", "description", "required") if output else ("title", "description")
    compact = {k: v for k, v in schema.items() if k not in left_out}
    compact["properties"] = properties
    return compact


# a hint's `microagent VERB NAME`, said as the tool a model calls instead
VERB_TOOLS = {"start": "start_workspace", "halt": "halt_workspace", "stop": "stop_workspace",
              "kill": "kill_workspace", "delete": "delete_workspace",
              "pause": "pause_workspace", "resume": "resume_workspace",
              "status": "workspace_status", "logs": "workspace_logs",
              "snapshot create": "snapshot_workspace", "suspend": "suspend_workspace",
              "quarantine": "quarantine_workspace", "top": "list_processes"}
_HINT_COMMAND = re.compile(r"`?microagent ((?:snapshot )?[a-z]+)((?: --[a-z-]+)*) "
                           r"([A-Za-z0-9][A-Za-z0-9_.-]*)`?")


def tool_hint(hint: str) -> str:
    """``hint`` with the CLI commands it names as tool calls (a model has no shell for
    them): ``microagent start --cold dev`` is ``start_workspace(name="dev", cold=true)``."""
    def call(match: re.Match[str]) -> str:
        tool = VERB_TOOLS.get(match.group(1))
        if tool is None:
            return match.group(0)
        flags = "".join(f", {flag[2:].replace('-', '_')}=true"
                        for flag in match.group(2).split())
        return f'{tool}(name="{match.group(3)}"{flags})'
    return _HINT_COMMAND.sub(call, hint)


def error_result(error: MicroagentError) -> CallToolResult:
    """A tool error the model can act on: ``kind: message`` and the hint (its commands
    as tool calls, :func:`tool_hint`)."""
    hint = tool_hint(error.hint) if error.hint else ""
    text = f"{error.kind}: {error.message}" + (f"\nhint: {hint}" if hint else "")
    document = error.to_json()
    if hint:
        document["hint"] = hint
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content={"error": document}, is_error=True)


def tool_names(tools: Sequence[str] = (), *, all_tools: bool = False) -> list[str]:
    """The tools a server offers: ``tools`` if given, else the default set (``all_tools``:
    and the extra ones)."""
    if tools:
        return list(tools)
    return [*DEFAULT_TOOLS, *(EXTRA_TOOLS if all_tools else ())]


def build_server(client: Microagent, *, tools: Sequence[str] = (), all_tools: bool = False,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> WorkspaceServer:
    """The MCP server of ``client``'s state directory, with the chosen tools."""
    if max_output_bytes < MIN_OUTPUT_BYTES:
        raise UsageError(f"invalid max output bytes {max_output_bytes}: "
                         f"at least {MIN_OUTPUT_BYTES}")
    # the SDK's INFO lines (sessions opened and closed) would fill a client's server log
    server = WorkspaceServer("microagent", version=__version__, instructions=INSTRUCTIONS,
                             log_level="WARNING")
    handler = Tools(client, max_output_bytes)
    chosen = tool_names(tools, all_tools=all_tools)
    for name, fn, hints in tool_functions(handler, chosen):
        server.add_tool(fn, name=name, annotations=hints)
    return server


def serve(server: WorkspaceServer, http: str | None = None) -> None:
    """Run ``server`` until its client goes: on stdio, or on streamable HTTP at ``http``
    (``127.0.0.1:PORT``, ``localhost:PORT``, ``[::1]:PORT`` or ``unix:PATH``; path
    ``/mcp``)."""
    if http is None:
        server.run("stdio")
        return
    import anyio
    import uvicorn
    from mcp.server.transport_security import TransportSecuritySettings

    # DNS rebinding protection as the SDK sets it for loopback, plus the bare host names
    # a client on a Unix socket sends (no port)
    loopback = ("127.0.0.1", "localhost", "[::1]")
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[*loopback, *(f"{h}:*" for h in loopback)],
        allowed_origins=[f"http://{h}{port}" for h in loopback for port in ("", ":*")])
    app = server.streamable_http_app(transport_security=security)
    if http.startswith("unix:"):
        config = uvicorn.Config(app, uds=http.removeprefix("unix:"), log_level="warning")
    else:
        host, port = parse_loopback(http)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning")
    anyio.run(uvicorn.Server(config).serve)


def parse_loopback(address: str) -> tuple[str, int]:
    """``HOST:PORT`` with a loopback host (the server is not for other machines)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1") or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise UsageError(f"invalid --http address {address!r}",
                         hint="127.0.0.1:PORT or unix:PATH (loopback only)")
    return host, int(port)
