"""The ``microagent`` command: parse, call the library, render text or ``--json``.

A leaf: nothing in the library imports it. One module per group of verbs, each with a
``register(verbs)`` that adds its sub-commands and the handlers that run them
(``workspaces``, ``lifecycle``, ``exec``, ``images``); ``output`` holds what they share.
Every error is a :class:`~microagent.errors.MicroagentError` turned into a message, a hint
and an exit code in :func:`main`, the one place that does. Heavy modules are imported
inside the handlers so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType

from microagent import __version__
from microagent.cli import (
    completion,
    console,
    doctor,
    images,
    lifecycle,
    observe,
    processes,
    run,
    serve,
    snapshots,
    volumes,
    workspaces,
)
from microagent.cli import copy as copy_verbs
from microagent.cli import exec as exec_verbs
from microagent.cli.output import Handler, Output, Parser, add_verb, layout_of, table
from microagent.config import DEFAULT_PROFILE, PROFILES
from microagent.errors import (
    EXIT_EXEC_FAILED,
    EXIT_FAILURE,
    EXIT_OK,
    CommandNotExecutableError,
    CommandNotFoundError,
    MicroagentError,
    PausedError,
    Terminated,
    UsageError,
    interrupted_exit_code,
)
from microagent.layout import PRIVATE_UMASK
from microagent.store import check_state_dir_usable

__all__ = ["build_parser", "main"]

# they never read the state directory; doctor reports a bad one as one of its checks
STATELESS_VERBS = frozenset({"version", "profiles", "doctor", "completion"})


def cmd_version(args: argparse.Namespace, out: Output) -> int:
    out.emit({"version": __version__, "python": sys.version.split()[0]},
             f"microagent {__version__}")
    return EXIT_OK


def cmd_profiles(args: argparse.Namespace, out: Output) -> int:
    rows = [[p.name, f"{p.memory_mib}MiB", str(p.cpus), f"{p.disk_mib}MiB",
             p.description + (" (default)" if p.name == DEFAULT_PROFILE else "")]
            for p in PROFILES]
    document = {"profiles": [{"name": p.name, "memory_mib": p.memory_mib, "cpus": p.cpus,
                              "disk_mib": p.disk_mib, "description": p.description,
                              "default": p.name == DEFAULT_PROFILE} for p in PROFILES]}
    out.emit(document, table(["NAME", "MEMORY", "CPUS", "DISK", "DESCRIPTION"], rows))
    return EXIT_OK


def build_parser() -> Parser:
    with _translations_memoized():
        return _build_parser()


@contextlib.contextmanager
def _translations_memoized() -> Iterator[None]:
    """argparse has gettext translate each of its strings for every parser it builds
    (~100 calls for this tree, a handful of distinct strings), and gettext looks for the
    catalogues again at every call: half of the tree's build time, paid by every
    command. The same strings get the same translations, so they are asked for once."""
    original = argparse._  # type: ignore[attr-defined]
    argparse._ = functools.lru_cache(maxsize=None)(original)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        argparse._ = original  # type: ignore[attr-defined]


def _build_parser() -> Parser:
    parser = Parser(prog="microagent",
                    description="Persistent AI-agent workspaces in microVMs.")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="state directory (default ~/.microagent, env MICROAGENT_HOME)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=Parser)
    add_verb(verbs, "version", cmd_version, "print the version")
    add_verb(verbs, "profiles", cmd_profiles, "list the resource profiles")
    for group in (workspaces, lifecycle, snapshots, exec_verbs, copy_verbs, run, console,
                  images, observe, volumes, doctor, serve, completion, processes):
        group.register(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one command and return its exit code."""
    raw = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in raw[: _verb_position(raw)]
    debug = "--debug" in raw[: _verb_position(raw)]
    out = Output(as_json)
    umask = os.umask(PRIVATE_UMASK)  # what this command and its tools create: owner only
    previous = _terminate_as_interrupt()
    try:
        parser = build_parser()
        args = parser.parse_args(raw)
        if not getattr(args, "handler", None):
            parser.print_help(sys.stderr)
            return 2
        handler: Handler = args.handler
        if args.verb not in STATELESS_VERBS:
            check_state_dir_usable(layout_of(args, check=False).root)
        return handler(args, out)
    except MicroagentError as e:
        if debug:
            import traceback

            traceback.print_exc()
        report(out, e)
        if _is_exec(raw) and not isinstance(e, UsageError | PausedError | CommandNotFoundError
                                            | CommandNotExecutableError):
            return EXIT_EXEC_FAILED  # CLI.md: exec's own failures are 125
        return e.exit_code
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated) and e.message:  # e.g. a guest deaf to a signal
            sys.stderr.write(f"microagent: {e.message}\n")
        else:
            sys.stderr.write("terminated\n" if isinstance(e, Terminated) else "interrupted\n")
        return interrupted_exit_code(e)
    except BrokenPipeError:
        return EXIT_FAILURE
    except Exception as e:
        if debug:
            raise
        report(out, MicroagentError(f"internal error: {type(e).__name__}: {e}",
                                    hint="rerun with --debug for a traceback"))
        return EXIT_FAILURE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        os.umask(umask)


def _terminate_as_interrupt() -> signal.Handlers | Callable[..., object] | int | None:
    """SIGTERM unwinds the command as Ctrl-C does (staging removed, locks released,
    children killed), then exit 143; returns the previous handler (None off the main
    thread, where Python cannot set one)."""
    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise Terminated(signum)

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, terminate)


def _is_exec(raw: Sequence[str]) -> bool:
    position = _verb_position(raw)
    return position < len(raw) and raw[position] in ("exec", "run")


def _verb_position(raw: Sequence[str]) -> int:
    for i, word in enumerate(raw):
        if not word.startswith("-"):
            if i > 0 and raw[i - 1] == "--state-dir":
                continue
            return i
    return len(raw)


def report(out: Output, error: MicroagentError) -> None:
    """Print an error: JSON on stdout with --json, else message and hint on stderr."""
    if out.as_json:
        out.emit({"error": error.to_json()})
        return
    sys.stderr.write(f"microagent: error: {error.message}\n")
    if error.hint:
        sys.stderr.write(f"hint: {error.hint}\n")
