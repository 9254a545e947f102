"""``exec``: one command in a running workspace, streamed or as one JSON document."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from microagent.cli.output import (
    Output,
    Parser,
    Verbs,
    add_verb,
    client_of,
    seconds,
    text_field,
)
from microagent.errors import UsageError

if TYPE_CHECKING:
    from microagent.api.results import ExecResult

Sink = Callable[[bytes], None]


def cmd_exec(args: argparse.Namespace, out: Output) -> int:
    from microagent.cli import processes
    from microagent.config import parse_env

    argv = list(args.argv)
    if args.attach is not None or args.signal is not None:
        if argv:
            raise UsageError("--attach and --signal take no command",
                             hint="microagent exec --attach ID NAME")
        if args.attach is not None and args.signal is not None:
            raise UsageError("--attach and --signal exclude each other")
        return (processes.attach(args, out) if args.attach is not None
                else processes.send_signal(args, out))
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
    env = parse_env(args.env, os.environ, "-e")
    if args.detach:
        if args.tty or args.interactive or args.timeout:
            raise UsageError("-d runs in the background: no -t, -i or --timeout",
                             hint="write to its stdin with the Python API (Process.write)")
        return processes.start_detached(args, out, argv, env)
    stdout, stderr, captured = output_sinks(out)
    result = client_of(args).handle(args.name).exec_attached(
        argv, env=env, cwd=args.workdir, user=args.user, interactive=args.interactive,
        tty=args.tty, timeout=args.timeout, stdout=stdout, stderr=stderr)
    return report_result(out, result, captured, args.timeout)


def output_sinks(out: Output) -> tuple[Sink, Sink, dict[str, bytearray] | None]:
    """Where a command's stdout and stderr go: straight through, or kept for ``--json``."""
    if out.as_json:
        captured = {"stdout": bytearray(), "stderr": bytearray()}
        return captured["stdout"].extend, captured["stderr"].extend, captured

    def writer(stream: Any) -> Sink:
        def sink(data: bytes) -> None:
            stream.buffer.write(data)
            stream.buffer.flush()
        return sink

    return writer(sys.stdout), writer(sys.stderr), None


def report_result(out: Output, result: ExecResult, captured: dict[str, bytearray] | None,
                  timeout: float | None, **fields: Any) -> int:
    """The ``--json`` document (with ``fields``) or the error line; the exit code."""
    if captured is not None:
        document: dict[str, Any] = {
            **fields, "exit_code": result.host_exit_code, "signal": result.signal,
            "timed_out": result.timed_out, "duration_ms": result.duration_ms}
        for key, data in captured.items():
            document.update(text_field(key, bytes(data)))
        if result.error:
            document["error"] = dict(result.error_detail)
        out.emit(document)
    elif result.error:
        sys.stderr.write(f"microagent: {result.error}\n")
    elif result.timed_out:
        sys.stderr.write(f"microagent: command timed out after {timeout}s\n")
    return result.host_exit_code


def add_exec_options(parser: argparse.ArgumentParser, *, env: bool = True) -> None:
    """The command's options, for ``exec`` and ``run`` (whose ``--env`` is create's)."""
    if env:
        parser.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                            help="set an environment variable (repeatable); K alone "
                                 "passes the host's value (none if unset)")
    parser.add_argument("-w", "--workdir", metavar="DIR", help="working directory")
    parser.add_argument("-u", "--user", metavar="USER", help="user name or UID[:GID]")
    parser.add_argument("-i", "--interactive", action="store_true", help="forward stdin")
    parser.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    parser.add_argument("--timeout", type=seconds, metavar="S",
                        help="kill the command after S seconds (0: no limit, the default)")


def register(verbs: Verbs) -> None:
    p = add_verb(verbs, "exec", cmd_exec, "run a command in a running workspace")
    add_exec_options(p)
    p.add_argument("-d", "--detach", action="store_true",
                   help="start the command in the background and print its process id")
    p.add_argument("--attach", type=int, metavar="ID",
                   help="stream a background process's output until it ends; exit with "
                        "its code")
    p.add_argument("--since", type=int, metavar="N",
                   help="with --attach: stdout from byte N (default 0)")
    p.add_argument("--signal", nargs=2, metavar=("SIG", "ID"),
                   help="send SIG (a name or number) to background process ID")
    p.add_argument("name", metavar="NAME")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND")
