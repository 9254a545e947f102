"""``snapshot create|list|delete`` and ``suspend``: a workspace's memory state."""

from __future__ import annotations

import argparse

from microagent.cli.images import usage_of
from microagent.cli.output import (
    Output,
    Parser,
    Verbs,
    add_name,
    add_verb,
    client_of,
    table,
    workspace_name,
)
from microagent.errors import EXIT_OK


def cmd_snapshot_create(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    snapshot = client_of(args).get(name).snapshot(args.tag)
    doc = snapshot.to_json()
    out.emit(doc, snapshot.tag)
    return EXIT_OK


def cmd_snapshot_list(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    snapshots = client_of(args).get(name).snapshots()
    rows = [[s.tag, _size(s.size_bytes), s.created, s.parent or "-"] for s in snapshots]
    out.emit({"snapshots": [s.to_json() for s in snapshots]},
             table(["TAG", "SIZE", "CREATED", "PARENT"], rows) if rows
             else f"{name} has no snapshots.")
    return EXIT_OK


def cmd_snapshot_delete(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    client_of(args).get(name).delete_snapshot(args.tag)
    out.emit({"name": name, "tag": args.tag, "deleted": True},
             f"Deleted snapshot {name}:{args.tag}")
    return EXIT_OK


def cmd_suspend(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    out.emit({"name": name, "state": client_of(args).get(name).suspend()},
             f"Suspended {name}: `microagent start {name}` resumes it")
    return EXIT_OK


def _size(count: int) -> str:
    mib = count / (1 << 20)
    return f"{mib / 1024:.1f}GiB" if mib >= 1024 else f"{mib:.0f}MiB"


def register(verbs: Verbs) -> None:
    snapshot = verbs.add_parser("snapshot", help="save and list a workspace's memory state",
                                description="snapshots: memory, device state and disks")
    snapshot_verbs = snapshot.add_subparsers(dest="snapshot_verb", metavar="COMMAND",
                                             parser_class=Parser)
    snapshot.set_defaults(handler=lambda a, o: usage_of(snapshot))
    p = snapshot_verbs.add_parser("create", help="snapshot a running workspace (it runs on)")
    add_name(p)
    p.add_argument("--tag", metavar="T", help="the snapshot's name (default "
                                               "snap-YYYYMMDD-HHMMSS)")
    p.set_defaults(handler=cmd_snapshot_create)
    p = snapshot_verbs.add_parser("list", aliases=["ls"], help="a workspace's snapshots")
    add_name(p)
    p.set_defaults(handler=cmd_snapshot_list)
    p = snapshot_verbs.add_parser("delete", aliases=["rm"], help="delete one snapshot")
    p.add_argument("name", metavar="NAME")
    p.add_argument("tag", metavar="TAG")
    p.add_argument("--name", dest="name_flag", help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_snapshot_delete)
    add_name(add_verb(verbs, "suspend", cmd_suspend,
                      "save a workspace's memory and end its VM; start resumes it"))
