"""``start``, ``halt``, ``stop``, ``kill``, ``resume`` and ``quarantine``:
a VM's life."""

from __future__ import annotations

import argparse

from microagent.cli.output import (
    Output,
    Verbs,
    add_name,
    add_verb,
    layout_of,
    positive_seconds,
    workspace_name,
)
from microagent.errors import EXIT_OK


def cmd_start(args: argparse.Namespace, out: Output) -> int:
    from microagent.workspace.start import start_workspace

    name = workspace_name(args)
    state = start_workspace(layout_of(args), name, timeout=args.timeout,
                            progress=out.progress())
    out.emit({"name": name, "state": state.state, "pid": state.vmm_pid})
    return EXIT_OK


def cmd_halt(args: argparse.Namespace, out: Output) -> int:
    from microagent.workspace.lifecycle import halt_workspace

    name = workspace_name(args)
    out.emit({"name": name, "state": halt_workspace(layout_of(args), name)})
    return EXIT_OK


def cmd_stop(args: argparse.Namespace, out: Output) -> int:
    from microagent.workspace.lifecycle import stop_workspace

    name = workspace_name(args)
    out.emit({"name": name, "state": stop_workspace(layout_of(args), name)})
    return EXIT_OK


def cmd_kill(args: argparse.Namespace, out: Output) -> int:
    from microagent.workspace.lifecycle import kill_workspace

    name = workspace_name(args)
    out.emit({"name": name, "state": kill_workspace(layout_of(args), name)})
    return EXIT_OK


def cmd_resume(args: argparse.Namespace, out: Output) -> int:
    from microagent.workspace.lifecycle import resume_workspace

    name = workspace_name(args)
    out.emit({"name": name, "state": resume_workspace(layout_of(args), name)})
    return EXIT_OK


def cmd_quarantine(args: argparse.Namespace, out: Output) -> int:
    from microagent.workspace.quarantine import quarantine_workspace

    name = workspace_name(args)
    out.emit({"name": name, "state": quarantine_workspace(layout_of(args), name)})
    return EXIT_OK


def register(verbs: Verbs) -> None:
    p = add_verb(verbs, "start", cmd_start, "boot a workspace and wait until it is ready")
    add_name(p)
    p.add_argument("--timeout", type=positive_seconds, default=120.0, metavar="S",
                   help="seconds to wait for the guest (default 120)")
    for name, handler, text in (
        ("halt", cmd_halt, "clean, disk-preserving shutdown"),
        ("stop", cmd_stop, "ask the guest to shut down; failed if it has not within 5s"),
        ("kill", cmd_kill, "end the VM process at once"),
        ("resume", cmd_resume, "let a paused workspace run again (e.g. once its host disk "
                               "has room)"),
        ("quarantine", cmd_quarantine,
         "sever network, exec, cp and console input; keep the VM running"),
    ):
        add_name(add_verb(verbs, name, handler, text))

