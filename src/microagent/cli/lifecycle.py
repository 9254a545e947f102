"""``start``, ``halt``, ``stop``, ``kill``, ``resume`` and ``quarantine``:
a VM's life."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from microagent.cli.output import (
    Output,
    Verbs,
    add_name,
    add_verb,
    client_of,
    positive_seconds,
    workspace_name,
)
from microagent.errors import EXIT_OK, UsageError

if TYPE_CHECKING:
    from microagent.api.workspace import Workspace


def cmd_start(args: argparse.Namespace, out: Output) -> int:
    from microagent.workspace.lifecycle import stderr_sink

    name = workspace_name(args)
    if args.from_snapshot and args.cold:
        raise UsageError("--from-snapshot and --cold exclude each other")
    status = client_of(args).get(name).start(args.timeout, setup_output=stderr_sink,
                                             progress=out.progress(),
                                             from_snapshot=args.from_snapshot, cold=args.cold)
    out.emit({"name": name, "state": status.state, "pid": status.pid})
    return EXIT_OK


def cmd_halt(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    ws = _handle(args, name)
    suspended = ws.state == "suspended"
    state = ws.halt()
    out.emit({"name": name, "state": state, "suspended_memory_discarded": suspended},
             f"Discarded the suspended memory of {name}: it is halted, and its next start "
             "boots its disk" if suspended else None)
    return EXIT_OK


def cmd_stop(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    out.emit({"name": name, "state": _handle(args, name).stop()})
    return EXIT_OK


def cmd_kill(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    out.emit({"name": name, "state": _handle(args, name).kill()})
    return EXIT_OK


def cmd_pause(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    out.emit({"name": name, "state": _handle(args, name).pause()})
    return EXIT_OK


def cmd_resume(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    out.emit({"name": name, "state": _handle(args, name).resume()})
    return EXIT_OK


def cmd_quarantine(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    out.emit({"name": name, "state": _handle(args, name).quarantine()})
    return EXIT_OK


def _handle(args: argparse.Namespace, name: str) -> Workspace:
    """The workspace's handle without reading its record: these verbs also work on a
    broken one, whose processes they only talk to."""
    return client_of(args).handle(name)


def register(verbs: Verbs) -> None:
    p = add_verb(verbs, "start", cmd_start, "boot a workspace and wait until it is ready")
    add_name(p)
    p.add_argument("--timeout", type=positive_seconds, default=120.0, metavar="S",
                   help="seconds to wait for the guest (default 120)")
    p.add_argument("--from-snapshot", metavar="TAG",
                   help="restore the snapshot TAG: its disks replace the workspace's and it "
                        "runs on from that instant")
    p.add_argument("--cold", action="store_true",
                   help="boot the disk, discarding a suspended workspace's memory")
    for name, handler, text in (
        ("halt", cmd_halt, "clean, disk-preserving shutdown"),
        ("stop", cmd_stop, "ask the guest to shut down; failed if it has not within 5s"),
        ("kill", cmd_kill, "end the VM process at once"),
        ("pause", cmd_pause, "stop the VM's vCPUs; it keeps its memory and sockets"),
        ("resume", cmd_resume, "let a paused workspace run again (after pause, or once its "
                               "host disk has room)"),
        ("quarantine", cmd_quarantine,
         "sever network, exec, cp and console input; keep the VM running"),
    ):
        add_name(add_verb(verbs, name, handler, text))

