"""``cp``: files and directories between the host and a workspace."""

from __future__ import annotations

import argparse
import sys

from microagent.cli.output import Output, Verbs, add_verb, client_of
from microagent.errors import EXIT_OK


def cmd_cp(args: argparse.Namespace, out: Output) -> int:
    result = client_of(args).copy(args.source, args.destination, archive=args.archive)
    for skipped in result.skipped:
        sys.stderr.write(f"microagent: skipped {skipped} (devices and sockets are not "
                         "copied)\n")
    noun = "entry" if result.copied == 1 else "entries"
    out.emit(result.to_json(), f"Copied {result.copied} {noun} ({_size(result.bytes)}) "
                               f"to {result.destination}")
    return EXIT_OK


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def register(verbs: Verbs) -> None:
    p = add_verb(verbs, "cp", cmd_cp, "copy files or directories between the host and a "
                 "workspace (NAME:/path)")
    p.add_argument("source", metavar="SRC", help="NAME:/path or a local path")
    p.add_argument("destination", metavar="DST", help="a local path or NAME:/path")
    p.add_argument("--archive", "-a", action="store_true",
                   help="archive mode: keep owners (uid/gid) and, on the host, setuid and "
                        "setgid bits (a plain copy gives files to the user at the "
                        "destination and drops those bits on the host)")
