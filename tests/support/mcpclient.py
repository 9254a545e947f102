"""The official MCP SDK's client, driven synchronously from a test."""

from __future__ import annotations

import json
from typing import Any

import anyio
from mcp import Client
from mcp.types import CallToolResult


def call(server: Any, tool: str, arguments: dict[str, Any] | None = None) -> CallToolResult:
    """``tools/call`` through the SDK's client (in-process for an MCPServer, a subprocess
    for StdioServerParameters)."""
    async def run() -> CallToolResult:
        async with Client(server, raise_exceptions=True) as client:
            return await client.call_tool(tool, arguments or {})
    return anyio.run(run)


def list_tools(server: Any) -> list[dict[str, Any]]:
    """``tools/list`` as the JSON a client receives."""
    async def run() -> list[dict[str, Any]]:
        async with Client(server, raise_exceptions=True) as client:
            tools = (await client.list_tools()).tools
        return [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools]
    return anyio.run(run)


def tools_json_size(tools: list[dict[str, Any]]) -> int:
    """Bytes of the tool list as compact JSON (what every turn of a model pays)."""
    return len(json.dumps(tools, separators=(",", ":")))


def text(result: CallToolResult) -> str:
    """The first text block of a result."""
    return str(getattr(result.content[0], "text", ""))


def ok(result: CallToolResult) -> dict[str, Any]:
    """A result that is not an error: its structured content."""
    assert not result.is_error, text(result)
    assert result.structured_content is not None
    return result.structured_content


def error(result: CallToolResult, kind: str) -> str:
    """A tool error of ``kind``: its text."""
    assert result.is_error, result
    message = text(result)
    assert message.startswith(f"{kind}: "), message
    return message
