"""``serve mcp``: the MCP server (``microagent.mcpserver``) on stdio or loopback HTTP.

The SDK is the optional extra ``microagent[mcp]``, imported only here, inside the
command: without it, the command says what to install and exits 1.
"""

from __future__ import annotations

import argparse

from microagent.cli.images import usage_of
from microagent.cli.output import Output, Parser, Verbs, client_of
from microagent.errors import EXIT_OK, MicroagentError, UsageError

INSTALL_HINT = "pip install 'microagent[mcp]'"
DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024  # mcpserver/bounded.py's, without importing the SDK


def cmd_serve_mcp(args: argparse.Namespace, out: Output) -> int:
    try:
        import mcp.server  # noqa: F401  (only to know whether the extra is installed)
    except ImportError:
        raise MicroagentError("serve mcp needs the MCP SDK (the extra microagent[mcp]), "
                              "which is not installed", hint=INSTALL_HINT) from None
    from microagent.mcpserver.server import build_server, serve

    if args.tools and args.all_tools:
        raise UsageError("give --tools or --all-tools, not both")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()] if args.tools else []
    if args.tools is not None and not tools:
        raise UsageError("--tools names no tool", hint="--tools exec,read_file")
    server = build_server(client_of(args), tools=tools, all_tools=args.all_tools,
                          max_output_bytes=args.max_output_bytes)
    serve(server, args.http)
    return EXIT_OK


def register(verbs: Verbs) -> None:
    serve = verbs.add_parser("serve", help="serve workspaces to agents (MCP)",
                             description="serve workspaces to agents")
    serve_verbs = serve.add_subparsers(dest="serve_verb", metavar="PROTOCOL",
                                       parser_class=Parser)
    serve.set_defaults(handler=lambda a, o: usage_of(serve))
    p = serve_verbs.add_parser(
        "mcp", help="the MCP server, on stdio (needs microagent[mcp])",
        description="The Model Context Protocol server: workspaces as tools for a model. "
                    f"Needs the extra: {INSTALL_HINT}")
    p.add_argument("--http", metavar="ADDR",
                   help="streamable HTTP at ADDR/mcp instead of stdio: 127.0.0.1:PORT or "
                        "unix:PATH")
    p.add_argument("--tools", metavar="A,B", help="offer only these tools")
    p.add_argument("--all-tools", action="store_true",
                   help="also stop, kill, quarantine, copy, images, volumes, doctor")
    p.add_argument("--max-output-bytes", type=int, default=DEFAULT_MAX_OUTPUT_BYTES,
                   metavar="N", help="bound of each output stream shown to the model "
                                     f"(head and tail kept; default {DEFAULT_MAX_OUTPUT_BYTES})")
    p.set_defaults(handler=cmd_serve_mcp)
