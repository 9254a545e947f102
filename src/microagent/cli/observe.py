"""``logs``, ``events`` and ``wait``: watching a workspace without touching it.

Following (``logs -f``, ``events -f``) and ``wait`` end quietly with exit 130 on Ctrl-C,
as ``docker logs -f`` does: an interrupt is how a user stops them, not a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from microagent.cli.output import (
    Output,
    Verbs,
    add_name,
    add_verb,
    client_of,
    seconds,
    workspace_name,
)
from microagent.errors import EXIT_OK, UsageError, interrupted_exit_code

if TYPE_CHECKING:
    from microagent.events import Event


def cmd_logs(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    if args.follow and out.as_json:
        raise UsageError("logs -f streams text and --json prints one document",
                         hint="use one of them")
    if args.follow and args.previous:
        raise UsageError("logs --previous shows a boot that has ended: there is nothing "
                         "to follow", hint="drop -f")
    ws = client_of(args).handle(name)
    if not args.follow:
        data = ws.log_bytes(args.tail, previous=args.previous)
        if out.as_json:
            out.emit({"name": name, "log": data.decode("utf-8", errors="replace")})
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        return EXIT_OK
    try:
        for chunk in ws.follow_logs(args.tail):
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
    except KeyboardInterrupt as e:
        return interrupted_exit_code(e)  # 130, or 143 for SIGTERM
    return EXIT_OK


def event_line(event: Event) -> str:
    """``TIME STATE DETAIL``, the state padded so that details line up."""
    return f"{event.time}  {event.state:<11}  {event.detail}".rstrip()


def cmd_events(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    stream = client_of(args).handle(name).follow_events(follow=args.follow)
    if not args.follow:
        events = list(stream)
        out.emit({"name": name, "events": [e.to_json() for e in events]},
                 "\n".join(event_line(e) for e in events))
        return EXIT_OK
    try:
        for event in stream:  # with --json: one compact document per line (JSON Lines)
            sys.stdout.write((json.dumps(event.to_json(), sort_keys=True) if out.as_json
                              else event_line(event)) + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt as e:
        return interrupted_exit_code(e)  # 130, or 143 for SIGTERM
    return EXIT_OK


def cmd_wait(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    try:
        state = client_of(args).handle(name).wait(args.state or (), timeout=args.timeout)
    except KeyboardInterrupt as e:
        return interrupted_exit_code(e)  # 130, or 143 for SIGTERM
    out.emit({"name": name, "state": state.state, "detail": state.detail}, state.state)
    return EXIT_OK


def _tail(value: str) -> int | None:
    """``--tail N`` or ``--tail all``."""
    if value == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of lines: {value!r}") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"a negative number of lines: {count}")
    return count


def register(verbs: Verbs) -> None:
    p = add_verb(verbs, "logs", cmd_logs,
                 "print the captured serial console of the last boot")
    add_name(p)
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing until the workspace stops (or Ctrl-C)")
    p.add_argument("-n", "--tail", type=_tail, default=None, metavar="N",
                   help="only the last N lines (default all)")
    p.add_argument("-p", "--previous", action="store_true",
                   help="the console of the boot before the last one (e.g. the boot that "
                        "panicked before a restart)")

    p = add_verb(verbs, "events", cmd_events, "print the lifecycle history: TIME STATE DETAIL")
    add_name(p)
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new events until the workspace stops (or Ctrl-C); "
                        "with --json, one JSON object per line")

    p = add_verb(verbs, "wait", cmd_wait, "block until a workspace reaches a state")
    add_name(p)
    p.add_argument("--state", action="append", metavar="S",
                   help="a state to wait for, repeatable (default: halted, stopped or "
                        "failed)")
    p.add_argument("--timeout", type=seconds, default=None, metavar="S",
                   help="give up after S seconds (exit 75; 0: look once)")
