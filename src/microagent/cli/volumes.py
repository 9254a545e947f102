"""``volume create|list|status|delete``: named volumes, the data that outlives workspaces."""

from __future__ import annotations

import argparse

from microagent.cli.images import usage_of
from microagent.cli.output import Output, Parser, Verbs, client_of, table
from microagent.config import DEFAULT_VOLUME_MIB as DEFAULT_SIZE_MIB
from microagent.errors import EXIT_OK


def cmd_volume_create(args: argparse.Namespace, out: Output) -> int:
    volume = client_of(args).volumes.create(args.name, args.size_mib)
    out.emit(volume.to_json(), f"Created volume {volume.name} ({volume.size_mib} MiB)")
    return EXIT_OK


def cmd_volume_list(args: argparse.Namespace, out: Output) -> int:
    volumes = client_of(args).volumes.list()
    rows = [[v.name, str(v.size_mib), v.attached_to or "-"] for v in volumes]
    text = table(["NAME", "SIZE-MIB", "ATTACHED"], rows) if volumes else "No volumes."
    out.emit({"volumes": [v.to_json() for v in volumes]}, text)
    return EXIT_OK


def cmd_volume_status(args: argparse.Namespace, out: Output) -> int:
    volumes = client_of(args).volumes
    volume = volumes.get(args.name)
    users = volumes.users(volume.name)
    document = {**volume.to_json(), "workspaces": users}
    out.emit(document, "\n".join([
        f"Volume: {volume.name}",
        f"Size: {volume.size_mib} MiB",
        f"Path: {volume.path}",
        f"Attached: {volume.attached_to or 'no'}",
        f"Workspaces: {', '.join(users) if users else '-'}",
        f"Created: {volume.created or '-'}",
    ]))
    return EXIT_OK


def cmd_volume_delete(args: argparse.Namespace, out: Output) -> int:
    existed = client_of(args).volumes.delete(args.name, force=args.force)
    text = (f"Deleted volume {args.name}" if existed
            else f"No volume named {args.name}; nothing to delete.")
    out.emit({"name": args.name, "deleted": existed}, text)
    return EXIT_OK


def register(verbs: Verbs) -> None:
    volume = verbs.add_parser("volume", help="manage named volumes", description="volumes")
    volume_verbs = volume.add_subparsers(dest="volume_verb", metavar="COMMAND",
                                         parser_class=Parser)
    volume.set_defaults(handler=lambda a, o: usage_of(volume))
    p = volume_verbs.add_parser("create", help="create an empty named volume")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--size-mib", type=int, default=DEFAULT_SIZE_MIB, metavar="MIB",
                   help=f"size in MiB, sparse (default {DEFAULT_SIZE_MIB})")
    p.set_defaults(handler=cmd_volume_create)
    p = volume_verbs.add_parser("list", aliases=["ls"],
                                help="list volumes and the running workspace each is attached to")
    p.set_defaults(handler=cmd_volume_list)
    p = volume_verbs.add_parser("status", aliases=["inspect"], help="one volume in words")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=cmd_volume_status)
    p = volume_verbs.add_parser("delete", aliases=["rm"],
                                help="delete a volume and its data (refused while a workspace "
                                     "uses it, unless --force; always while it runs)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--force", "-f", action="store_true",
                   help="delete it even though halted workspaces use it (their next start "
                        "fails until the volume is created again)")
    p.add_argument("--yes", "-y", action="store_true",
                   help="accepted for symmetry with delete; volume delete does not prompt")
    p.set_defaults(handler=cmd_volume_delete)
