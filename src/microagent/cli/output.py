"""What every command shares: the output sink, the parser class, names and tables."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from microagent.errors import MicroagentError, UsageError
from microagent.layout import StateLayout

if TYPE_CHECKING:
    from microagent.api.client import Microagent

Handler = Callable[[argparse.Namespace, "Output"], int]
MAX_SECONDS = 1_000_000_000  # ~31 years: below the agent's 2**40 ms and threading's limit


class Output:
    """Where a command's result goes: text on stdout, or one JSON document."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, document: Any, text: str | None = None) -> None:
        """Print ``document`` as JSON, or ``text`` (when given) for people."""
        if self.as_json:
            sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
        elif text is not None:
            sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
        sys.stdout.flush()

    def progress(self) -> Any:
        from microagent.progress import progress_for

        return progress_for(sys.stderr, quiet=self.as_json)


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so ``--json`` sees it."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, hint=f"see `{self.prog} --help`")


Verbs = Any  # argparse's _SubParsersAction, which has no public name


def add_verb(verbs: Verbs, name: str, handler: Handler, help_text: str,
             aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A sub-command whose ``handler`` runs it."""
    parser: argparse.ArgumentParser = verbs.add_parser(
        name, help=help_text, aliases=list(aliases), description=help_text)
    parser.set_defaults(handler=handler)
    return parser


def add_name(parser: argparse.ArgumentParser) -> None:
    """The workspace name, positionally or with ``--name``."""
    parser.add_argument("name", nargs="?", help="workspace name")
    parser.add_argument("--name", dest="name_flag", metavar="NAME", help="workspace name")


def workspace_name(args: argparse.Namespace) -> str:
    """The name given positionally or with --name (not both, not neither)."""
    if args.name and args.name_flag:
        raise UsageError("give the workspace name once: positionally or with --name")
    name = args.name or args.name_flag
    if not name:
        raise UsageError("a workspace name is required")
    return str(name)


def seconds(text: str) -> float:
    """argparse type of a duration where 0 means something (no limit, or look once):
    a finite number of seconds from 0 to :data:`MAX_SECONDS`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number of seconds: {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"a negative number of seconds: {text}")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} seconds is more than the most allowed, "
                                         f"{MAX_SECONDS}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type of a time to wait for something: as :func:`seconds`, but more than 0."""
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 seconds leaves no time to wait; give more than 0")
    return value


def layout_of(args: argparse.Namespace, *, check: bool = True) -> StateLayout:
    """The state directory of ``--state-dir`` (or the default), refused if another user
    can write in it (``store.check_state_dir``, once per command; ``doctor`` passes
    ``check=False`` and reports it as one of its checks instead)."""
    layout = StateLayout.resolve(args.state_dir)
    if check and getattr(args, "checked_state_dir", None) != layout.root:
        from microagent.store import check_state_dir

        check_state_dir(layout.root)
        args.checked_state_dir = layout.root
    return layout


def client_of(args: argparse.Namespace) -> Microagent:
    """The public API's client for the command's state directory (checked as
    :func:`layout_of` checks it)."""
    from microagent.api.client import client_for

    return client_for(layout_of(args))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by three spaces, docker-style."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in [headers, *rows]]
    return "\n".join(lines)


def ago(iso: str) -> str:
    """``5 minutes ago`` for an ISO timestamp."""
    try:
        then = dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    seconds = int((dt.datetime.now(dt.UTC) - then).total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "just now" if seconds < 5 else f"{seconds} seconds ago"


def text_field(key: str, data: bytes) -> dict[str, Any]:
    """Output as text, or base64 with a flag when it is not valid UTF-8."""
    try:
        return {key: data.decode("utf-8"), f"{key}_encoding": "utf-8"}
    except UnicodeDecodeError:
        import base64

        return {key: base64.b64encode(data).decode(), f"{key}_encoding": "base64"}


def confirm(question: str) -> None:
    """Ask on stderr; refuse without a TTY, naming --yes."""
    if not sys.stdin.isatty():
        raise UsageError("confirmation needed but standard input is not a terminal",
                         hint="pass --yes to confirm")
    sys.stderr.write(question)
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise MicroagentError("not confirmed; nothing was deleted")
