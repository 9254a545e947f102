"""Background processes from the command line: ``exec -d`` (start detached, print the
id), ``exec --attach ID`` (stream its output until it ends, exit with its code),
``exec --signal SIG ID`` and ``top`` (list them), as docker's ``exec -d`` and ``top``."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from microagent.cli.output import Output, Verbs, add_verb, client_of, table, text_field

if TYPE_CHECKING:
    from microagent.vm.agentprocs import ProcessInfo

IDLE_WAIT_S = 1.0  # an attach with nothing new waits this long in the guest per turn


def start_detached(args: argparse.Namespace, out: Output, argv: list[str],
                   env: Sequence[str]) -> int:
    """``exec -d``: start ``argv`` in the background; print its id. A command that could
    not start exits as ``exec``'s would (127 not found, 126 not executable)."""
    process = client_of(args).handle(args.name).spawn(argv, env=env, cwd=args.workdir,
                                                      user=args.user)
    out.emit({"id": process.id, "name": args.name}, str(process.id))
    return 0


def attach(args: argparse.Namespace, out: Output) -> int:
    """``exec --attach ID``: stdout from ``--since`` and stderr from its start, as they
    come, until the process ended and both were read to their end; its exit code."""
    from microagent.api.results import ExecResult

    process = client_of(args).handle(args.name).process(args.attach)
    offsets = {"stdout": args.since or 0, "stderr": 0}
    done = {"stdout": False, "stderr": False}
    captured = {"stdout": bytearray(), "stderr": bytearray()}
    wait = 0.0
    while not all(done.values()):
        got = False
        for stream in ("stdout", "stderr"):
            if done[stream]:
                continue
            chunk = process.read(offsets[stream], wait if stream == "stdout" or
                                 done["stdout"] else 0.0, stream=stream)
            if chunk.skipped:
                sys.stderr.write(f"microagent: [{chunk.skipped} bytes of {stream} dropped "
                                 "by the guest's bound]\n")
            if chunk.data:
                got = True
                if out.as_json:
                    captured[stream] += chunk.data
                else:
                    target = sys.stdout if stream == "stdout" else sys.stderr
                    target.buffer.write(chunk.data)
                    target.buffer.flush()
            offsets[stream] = chunk.next
            done[stream] = chunk.eof and not chunk.data
        wait = 0.0 if got else IDLE_WAIT_S
    info = process.info()
    while info.running:  # outputs ended, the reaping is a moment away
        time.sleep(0.05)
        info = process.info()
    result = ExecResult(exit_code=info.exit_code, signal=info.signal)
    if out.as_json:
        document: dict[str, Any] = {"id": info.id, "exit_code": result.host_exit_code,
                                    "signal": info.signal}
        for key, data in captured.items():
            document.update(text_field(key, bytes(data)))
        out.emit(document)
    return result.host_exit_code


def send_signal(args: argparse.Namespace, out: Output) -> int:
    """``exec --signal SIG ID``."""
    from microagent.errors import UsageError

    sig, text_id = args.signal
    if not text_id.isdigit():
        raise UsageError(f"invalid process id {text_id!r}", hint="see `microagent top NAME`")
    client_of(args).handle(args.name).process(int(text_id)).signal(sig)
    out.emit({"id": int(text_id), "signal": sig})
    return 0


def _exit_column(info: ProcessInfo) -> str:
    if info.running:
        return "-"
    return f"SIG{info.signal}" if info.signal is not None else str(info.exit_code)


def cmd_top(args: argparse.Namespace, out: Output) -> int:
    """``top NAME``: the background processes of the workspace."""
    from microagent.workspace.processes import list_processes

    client = client_of(args)
    infos = list_processes(client.layout, args.name)
    rows = []
    for info in infos:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.started_ms / 1000))
        rows.append((str(info.id), str(info.pid), info.state, _exit_column(info), started,
                     shlex.join(info.argv)))
    text = (table(("ID", "PID", "STATE", "EXIT", "STARTED", "COMMAND"), rows) if rows
            else f"{args.name} has no background processes.")
    document: dict[str, Any] = {"processes": [i.to_json() for i in infos]}
    out.emit(document, text)
    return 0


def register(verbs: Verbs) -> None:
    p = add_verb(verbs, "top", cmd_top, "list a workspace's background processes")
    p.add_argument("name", metavar="NAME")
