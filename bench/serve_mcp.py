"""``microagent serve mcp``: its start, and ``exec`` of ``true`` through it.

Measured in turns so that the host's drift moves every figure alike, best and median of
``--runs`` each:

- **Start**: a real client (the SDK's stdio client, in this process) launching
  ``microagent serve mcp`` until its first ``tools/list`` is answered. Floor: the same
  client launching a bare SDK server of one tool (``python -c``): what the SDK costs
  anyway. Target: under 1.5 s (clients give a server about 10 s).
- **exec**: the ``exec`` tool with ``command: ["true"]`` on a running busybox workspace
  (profile tiny), through the SDK's in-process client on one open session. Floor:
  ``ws.exec(["true"])`` through the Python API in this process. Target: the MCP layer
  adds at most 20 ms (median over median). Also shown: the same tool through the stdio
  server (one open session), what a client really waits for.

Run: ``.venv/bin/python bench/serve_mcp.py [--runs N]`` (as a user who can run QEMU, with the
extra ``microagent[mcp]`` installed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "bench")]

import anyio  # noqa: E402
from figures import api_exec, busybox_workspace, summary, verdict  # noqa: E402
from mcp import Client, StdioServerParameters  # noqa: E402

from microagent import Microagent, Workspace  # noqa: E402
from microagent.mcpserver.server import build_server  # noqa: E402

TARGET_START_S = 1.5
TARGET_ADDED_MS = 20.0
WIDTH = 56
BARE_SERVER = ("from mcp.server import MCPServer\n"
               "s = MCPServer('bare')\n"
               "@s.tool()\n"
               "def ping() -> str:\n"
               "    return 'pong'\n"
               "s.run()\n")


async def first_tools_list(params: StdioServerParameters) -> float:
    start = time.perf_counter()
    async with Client(params) as client:
        tools = (await client.list_tools()).tools
        elapsed = time.perf_counter() - start
    if not tools:
        raise RuntimeError(f"{params.args}: no tools")
    return elapsed


async def timed_exec(client: Client, name: str) -> float:
    start = time.perf_counter()
    result = await client.call_tool("exec", {"name": name, "command": ["true"]})
    elapsed = time.perf_counter() - start
    if result.is_error or (result.structured_content or {}).get("exit_code") != 0:
        raise RuntimeError(f"exec tool: {result}")
    return elapsed


async def measure(home: Path, ws: Workspace, runs: int, start_runs: int
                  ) -> dict[str, list[float]]:
    serve = StdioServerParameters(command=sys.executable, args=[
        "-m", "microagent", "--state-dir", str(home), "serve", "mcp"])
    bare = StdioServerParameters(command=sys.executable, args=["-c", BARE_SERVER])
    figures: dict[str, list[float]] = {"start": [], "bare": [], "mcp": [], "api": [],
                                       "stdio": []}
    server = build_server(Microagent(home))
    async with Client(server) as local, Client(serve) as remote:
        steps: dict[str, Callable[[], Awaitable[float]]] = {
            "mcp": lambda: timed_exec(local, ws.name),
            "stdio": lambda: timed_exec(remote, ws.name),
            "api": lambda: anyio.to_thread.run_sync(api_exec, ws),
        }
        for step in steps.values():  # warm: imports, caches, the guest
            await step()
        for i in range(runs):
            for key, step in steps.items():
                figures[key].append(await step())
            if i < start_runs:
                figures["start"].append(await first_tools_list(serve))
                figures["bare"].append(await first_tools_list(bare))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="exec runs (default 50)")
    parser.add_argument("--start-runs", type=int, default=10,
                        help="server starts (default 10)")
    args = parser.parse_args()
    with busybox_workspace("bench-mcp-") as (home, ws):
        figures = anyio.run(measure, home, ws, args.runs, args.start_runs)
    start = statistics.median(figures["start"])
    print(f"serve mcp start to its first answered tools/list, {args.start_runs} runs")
    print(summary("figure: microagent serve mcp (stdio)", figures["start"], width=WIDTH)
          + f"   (target < {TARGET_START_S:g} s: {verdict(start < TARGET_START_S)})")
    print(summary("floor: a bare SDK server of one tool", figures["bare"], width=WIDTH))
    added = (statistics.median(figures["mcp"]) - statistics.median(figures["api"])) * 1000
    print(f"exec of `true` on a running busybox workspace (tiny), {args.runs} runs each")
    print(summary("figure: the exec tool (SDK client, in-process)", figures["mcp"],
                  width=WIDTH))
    print(summary('floor: ws.exec(["true"]) (Python API)', figures["api"], width=WIDTH))
    print(f"{'added by the MCP layer (median - median)':<{WIDTH}} {added:6.1f} ms   "
          f"(target <= {TARGET_ADDED_MS:g} ms: {verdict(added <= TARGET_ADDED_MS)})")
    print(summary("(the exec tool through the stdio server)", figures["stdio"], width=WIDTH))
    return 0


if __name__ == "__main__":
    sys.exit(main())
