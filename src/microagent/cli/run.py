"""``run``: the one-shot form, a scratch workspace for one command."""

from __future__ import annotations

import argparse
import sys

from microagent.cli.exec import add_exec_options, output_sinks, report_result
from microagent.cli.output import Output, Verbs, add_verb, client_of, positive_seconds
from microagent.cli.workspaces import add_create_options, create_options


def cmd_run(args: argparse.Namespace, out: Output) -> int:
    from microagent.config import validate_name
    from microagent.workspace.execution import ExecOptions
    from microagent.workspace.oneshot import run_once, scratch_name

    client = client_of(args)
    layout = client.layout
    name = validate_name(args.name) if args.name else scratch_name(layout)
    spec = client.spec(name, args.image, **create_options(args))
    options = ExecOptions(argv=(), workdir=args.workdir or "", user=args.user or "",
                          interactive=args.interactive, tty=args.tty,
                          timeout=args.timeout or 0.0)
    argv = tuple(args.argv[1:] if args.argv[:1] == ["--"] else args.argv)
    stdout, stderr, captured = output_sinks(out)
    outcome = run_once(layout, spec, argv, options, stdout=stdout, stderr=stderr,
                       keep=args.keep, progress=out.progress(), timeout=args.start_timeout)
    from microagent.api.results import ExecResult

    code = report_result(out, ExecResult.from_agent(outcome.result), captured, args.timeout,
                         name=outcome.name, kept=outcome.kept)
    if outcome.kept and captured is None:
        sys.stderr.write(f"microagent: kept workspace {outcome.name} (halted)\n")
    return code


def register(verbs: Verbs) -> None:
    p = add_verb(verbs, "run", cmd_run,
                 "run one command in a scratch workspace, removed afterwards")
    add_create_options(p)
    p.add_argument("--name", metavar="NAME",
                   help="name of the scratch workspace (default: a generated one)")
    p.add_argument("--keep", action="store_true",
                   help="keep the workspace (halted) and print its name")
    add_exec_options(p, env=False)
    p.add_argument("--start-timeout", type=positive_seconds, default=120.0, metavar="S",
                   help="seconds to wait for the guest to boot (default 120)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="ARGV",
                   help="the command (default: the image's Entrypoint and Cmd)")
