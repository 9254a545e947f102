"""``connect``: the console shell, attached interactively or sent one line."""

from __future__ import annotations

import argparse
import sys

from microagent.cli.output import (
    Output,
    Verbs,
    add_name,
    add_verb,
    client_of,
    positive_seconds,
    text_field,
    workspace_name,
)
from microagent.errors import EXIT_OK, UsageError


def cmd_connect(args: argparse.Namespace, out: Output) -> int:
    from microagent.workspace.connect import DEFAULT_SEND_TIMEOUT

    name = workspace_name(args)
    ws = client_of(args).handle(name)
    if args.send is not None:
        output, exit_code = ws.console_send(args.send,
                                            timeout=args.timeout or DEFAULT_SEND_TIMEOUT)
        if out.as_json:
            out.emit({"name": name, "exit_code": exit_code, **text_field("output", output)})
        else:
            sys.stdout.buffer.write(output)
            if output and not output.endswith(b"\n"):
                sys.stdout.buffer.write(b"\n")
            sys.stdout.flush()
        return EXIT_OK
    if out.as_json:
        raise UsageError("--json needs --send: an interactive session is not a document")
    if args.timeout is not None:
        raise UsageError("--timeout applies to --send")
    ended = ws.attach_console()
    sys.stderr.write(f"\r\nDetached from {name}; it keeps running.\n" if ended == "detached"
                     else f"\r\nThe console of {name} closed (the VM stopped).\n")
    return EXIT_OK


def register(verbs: Verbs) -> None:
    p = add_verb(verbs, "connect", cmd_connect,
                 "attach to the serial console's shell (detach with Ctrl-])")
    add_name(p)
    p.add_argument("--send", metavar="LINE",
                   help="send one line, print what the command printed, and exit")
    p.add_argument("--timeout", type=positive_seconds, metavar="S",
                   help="with --send: give up (and interrupt the line) after S seconds "
                        "(default 10)")
