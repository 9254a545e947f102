"""``exec``: one command in a running workspace, streamed or as one JSON document."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from microagent.cli.output import Output, Parser, Verbs, add_verb, layout_of, text_field
from microagent.errors import UsageError


def cmd_exec(args: argparse.Namespace, out: Output) -> int:
    from microagent.execution import ExecOptions, run_exec

    argv = list(args.argv)
    if "--" in argv:
        # CLI.md's form: exec NAME [OPTIONS] -- ARGV; options may also precede NAME
        split = argv.index("--")
        leading = Parser(prog="microagent exec", add_help=False)
        add_exec_options(leading)
        leading.parse_args(argv[:split], namespace=args)
        argv = argv[split + 1 :]
    if not argv:
        raise UsageError("exec needs a command after the workspace name",
                         hint="microagent exec NAME -- COMMAND [ARGS...]")
    options = ExecOptions(argv=tuple(argv), env=tuple(args.env), workdir=args.workdir or "",
                          user=args.user or "", interactive=args.interactive, tty=args.tty,
                          timeout=args.timeout or 0.0)
    if out.as_json:
        captured: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        result = run_exec(layout_of(args), args.name, options,
                          stdout=captured["stdout"].extend, stderr=captured["stderr"].extend)
        document: dict[str, Any] = {
            "exit_code": result.host_exit_code, "signal": result.signal,
            "timed_out": result.timed_out, "duration_ms": result.duration_ms}
        for key, data in captured.items():
            document.update(text_field(key, bytes(data)))
        if result.error:
            document["error"] = result.error
        out.emit(document)
        return result.host_exit_code

    def write(stream: Any) -> Any:
        def sink(data: bytes) -> None:
            stream.buffer.write(data)
            stream.buffer.flush()
        return sink

    result = run_exec(layout_of(args), args.name, options, stdout=write(sys.stdout),
                      stderr=write(sys.stderr))
    if result.error:
        sys.stderr.write(f"microagent: {result.error.get('message', result.error)}\n")
    elif result.timed_out:
        sys.stderr.write(f"microagent: command timed out after {args.timeout}s\n")
    return result.host_exit_code


def add_exec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                        help="set an environment variable (repeatable)")
    parser.add_argument("-w", "--workdir", metavar="DIR", help="working directory")
    parser.add_argument("-u", "--user", metavar="USER", help="user name or UID[:GID]")
    parser.add_argument("-i", "--interactive", action="store_true", help="forward stdin")
    parser.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    parser.add_argument("--timeout", type=float, metavar="S", help="kill the command after S s")


def register(verbs: Verbs) -> None:
    p = add_verb(verbs, "exec", cmd_exec, "run a command in a running workspace")
    add_exec_options(p)
    p.add_argument("name", metavar="NAME")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND")
