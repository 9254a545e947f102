"""``completion bash|zsh``: the shell completion script, generated from the parser.

shtab writes a static script from the argparse tree, so a TAB never starts Python (a
dynamic completer such as argcomplete imports the CLI at every TAB) and shtab itself is
imported only here. Workspace names are completed from the state directory's listing,
read by the shell (``$MICROAGENT_HOME`` or ``~/.microagent``; a ``--state-dir`` on the
line is not seen).
"""

from __future__ import annotations

import argparse
from typing import Any

from microagent.cli.output import Output, Verbs, add_verb
from microagent.errors import EXIT_OK

SHELLS = ("bash", "zsh")
# verbs whose NAME is a new workspace (or none): nothing to complete from the listing
NEW_NAME_VERBS = frozenset({"create", "run", "volume"})
LIST_WORKSPACES = 'command ls -1 "${MICROAGENT_HOME:-$HOME/.microagent}/workspaces" 2>/dev/null'
WORKSPACE_NAMES: dict[str, Any] = {
    "bash": "_microagent_workspaces",
    "zsh": f"($({LIST_WORKSPACES}))",
    "preamble": {"bash": "_microagent_workspaces() {\n"
                         f'  compgen -W "$({LIST_WORKSPACES})" -- "$1"\n'
                         "}\n"},
}


def cmd_completion(args: argparse.Namespace, out: Output) -> int:
    import shtab

    from microagent.cli import build_parser

    parser = build_parser()
    _complete_workspace_names(parser)
    for action in parser._actions:
        if action.dest == "state_dir":
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    script = shtab.complete(parser, shell=args.shell)
    out.emit({"shell": args.shell, "script": script}, script)
    return EXIT_OK


def _complete_workspace_names(parser: argparse.ArgumentParser) -> None:
    """Mark every verb's workspace NAME (positional or ``--name``) for completion."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for verb, sub in action.choices.items():
            if verb in NEW_NAME_VERBS:
                continue
            for argument in sub._actions:
                if argument.dest in ("name", "name_flag"):
                    argument.complete = WORKSPACE_NAMES


def register(verbs: Verbs) -> None:
    p = add_verb(verbs, "completion", cmd_completion,
                 "print the shell completion script (bash or zsh)")
    p.add_argument("shell", choices=SHELLS, help="the shell: bash or zsh")
