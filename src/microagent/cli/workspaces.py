"""``create``, ``list``/``ps``, ``status`` and ``delete``: workspaces as records."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from microagent.cli.output import (
    Output,
    Verbs,
    add_name,
    add_verb,
    client_of,
    confirm,
    table,
    workspace_name,
)
from microagent.config import DEFAULT_PROFILE, DEFAULT_VOLUME_MIB
from microagent.errors import EXIT_OK, UsageError

if TYPE_CHECKING:
    pass


def create_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``Microagent.create`` that create's options (shared with
    ``run``) give."""
    from microagent.config import parse_env

    return {
        "profile": args.profile, "memory_mib": args.memory, "cpus": args.cpus,
        "disk_mib": args.size_mib, "backend": args.backend, "network": args.network,
        "restart": args.restart, "env": parse_env(args.env, os.environ, "--env"),
        "hostname": args.hostname, "setup": args.setup, "volumes": args.volume,
        "disks": args.disk, "bundles": args.bundle, "publish": args.publish,
        "kernel": args.kernel,
    }


def cmd_create(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    if args.from_snapshot:
        ws = client_of(args).create(name, args.image, **create_options(args),
                                    from_snapshot=args.from_snapshot, progress=out.progress())
    else:
        if not args.image:
            raise UsageError("create needs --image REF (or --from-snapshot NAME:TAG)")
        ws = client_of(args).create(name, args.image, **create_options(args),
                                    setup_output=_stderr, progress=out.progress())
    doc = ws.to_json()
    out.emit(doc, "\n".join([
        f"Workspace: {doc['name']}",
        f"State: {doc['state']}",
        f"Rootfs: {doc['rootfs']}",
        f"Profile: {doc['profile']}",
        f"Resources: {_describe(doc['resources'])}",
    ]))
    return EXIT_OK


def _describe(resources: dict[str, int]) -> str:
    from microagent.config import Resources

    return Resources("", resources["memory_mib"], resources["cpus"],
                     resources["disk_mib"]).describe()


def _stderr(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    name = workspace_name(args)
    doc = client_of(args).get(name).status(probe=out.as_json).to_json()
    if doc.get("error"):  # broken: its record cannot be read
        out.emit(doc, "\n".join([f"Workspace: {doc['name']}", f"State: {doc['state']}",
                                 f"Error: {doc['error']}", f"Hint: {doc['detail']}",
                                 f"Rootfs: {doc['rootfs']}"]))
        return EXIT_OK
    lines = [
        f"Workspace: {doc['name']}",
        f"State: {doc['state']}" + (f" ({doc['detail']})" if doc["detail"] else ""),
        f"Image: {doc['image']}",
        f"Profile: {doc['profile']}",
        f"Resources: memory={doc['resources']['memory_mib']}MiB cpus={doc['resources']['cpus']}"
        f" disk={doc['resources']['disk_mib']}MiB",
        f"Backend: {doc['backend']}" + (f" ({doc['accel']})" if doc.get("accel") else ""),
        f"Network: {doc['network']}"
        + (f" (guest {doc['guest_address']})" if doc.get("guest_address") else ""),
        f"Restart: {doc['restart']}",
        f"Rootfs: {doc['rootfs']}",
        _kernel_line(doc),
    ]
    for disk in doc.get("disks", []):
        lines.append(f"Disk: {disk['dest']} {disk['kind']} {disk['name']} "
                     f"({'ro' if disk['read_only'] else 'rw'})")
    for port in doc.get("ports", []):
        lines.append(f"Port: {port['host_ip']}:{port['host_port']} -> "
                     f"{port['guest_port']}/{port['protocol']}")
    if doc["pid"]:
        lines.append(f"PID: {doc['pid']}")
    if doc["uptime_seconds"] is not None:
        lines.append(f"Uptime: {doc['uptime_seconds']:.0f}s")
    for key in ("guestReady", "execReady", "consoleReady", "networkReady"):
        signal_doc = doc[key]
        lines.append(f"{key}: {'yes' if signal_doc['ok'] else 'no'} ({signal_doc['detail']})")
    if doc.get("snapshots"):
        lines.append(f"Snapshots: {doc['snapshots']} (microagent snapshot list {doc['name']})")
    if doc.get("resumes_from_memory"):
        lines.append("Memory: saved; the next start resumes from it (--cold boots the disk)")
    setup = doc.get("setup")
    if setup:
        count = len(setup["commands"])
        lines.append(f"Setup: {'pending' if setup['pending'] else 'done'} ({count} command"
                     f"{'s' if count != 1 else ''})")
        failure = setup.get("failure")
        if failure:
            lines.append(f"Setup failed: command {failure['index']} of {count} exited "
                         f"{failure['exit_code']}: {failure['command']}")
            lines += [f"  {line}" for line in failure["output"].splitlines()[-15:]]
    out.emit(doc, "\n".join(lines))
    return EXIT_OK


def _kernel_line(doc: dict[str, Any]) -> str:
    own = doc.get("own_kernel")
    if own:
        return f"Kernel: {own['version']} (own, from {own['source']})"
    return "Kernel: default" + (f" ({doc['kernel']})" if doc.get("kernel") else "")


def cmd_ps(args: argparse.Namespace, out: Output) -> int:
    return render_workspaces(args, out, running_only=True)


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    return render_workspaces(args, out, running_only=False)


def render_workspaces(args: argparse.Namespace, out: Output, *, running_only: bool) -> int:
    workspaces = [w.to_json() for w in client_of(args).list(running=running_only)]
    rows = [[w["name"], w["state"], *(str(w[k] or "-") for k in ("backend", "profile",
                                                                 "network", "restart"))]
            for w in workspaces]
    text = (table(["NAME", "STATE", "BACKEND", "PROFILE", "NETWORK", "RESTART"], rows)
            if workspaces else "No workspaces.")
    out.emit({"workspaces": workspaces}, text)
    return EXIT_OK


def cmd_delete(args: argparse.Namespace, out: Output) -> int:
    from microagent.config import validate_name

    name = validate_name(workspace_name(args))
    if not args.yes:
        confirm(f"Delete workspace {name} and its disk? [y/N] ")
    from microagent.state.snapshots import list_snapshots, resume_manifest

    layout = client_of(args).layout
    snapshots = len(list_snapshots(layout, name))
    suspended = resume_manifest(layout, name) is not None
    existed = client_of(args).delete(name)
    text = f"Deleted {name}" if existed else f"No workspace named {name}; nothing to delete."
    if existed and snapshots:
        text += f" and its {snapshots} snapshot" + ("s" if snapshots > 1 else "")
    if existed and suspended:
        text += " (its suspended memory was discarded)"
    out.emit({"name": name, "deleted": existed, "snapshots_deleted": snapshots if existed
              else 0, "suspended_memory_discarded": existed and suspended}, text)
    return EXIT_OK


def add_create_options(p: argparse.ArgumentParser) -> None:
    """The options that describe a workspace, for ``create`` and ``run``."""
    p.add_argument("--profile", metavar="P", help=f"resource profile (default {DEFAULT_PROFILE})")
    p.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB")
    p.add_argument("--cpus", type=int, metavar="N", help="virtual CPUs")
    p.add_argument("--size-mib", type=int, metavar="MIB", help="root disk size in MiB")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="environment for commands (repeatable); K alone passes the host's "
                        "value (none if unset)")
    p.add_argument("--hostname", metavar="H", help="guest hostname (default: the name)")
    p.add_argument("--network", default="user", metavar="MODE",
                   help="user (default: NAT to what the host reaches, not its loopback), "
                        "user:host-loopback (also the host's 127.0.0.1 at 10.0.2.2) or none")
    p.add_argument("--publish", "-p", action="append", default=[],
                   metavar="[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp]",
                   help="forward a host TCP port to a guest port (repeatable); the host "
                        "side binds 127.0.0.1 unless HOST_IP is given")
    p.add_argument("--restart", default="never", metavar="POLICY",
                   help="never (default), on-failure or always")
    p.add_argument("--backend", default="qemu", metavar="B", help="qemu (default)")
    p.add_argument("--volume", "-v", action="append", default=[], metavar="NAME:/DST[:ro|rw]",
                   help="attach the named volume at DST (repeatable); a missing volume is "
                        f"created, {DEFAULT_VOLUME_MIB} MiB sparse")
    p.add_argument("--disk", action="append", default=[], metavar="NAME=PATH:/DST[:ro|rw]",
                   help="attach an existing ext4 image at DST (repeatable)")
    p.add_argument("--bundle", action="append", default=[],
                   metavar="NAME=TAR:/DST[:ro|rw]",
                   help="attach a disk built from a .tar/.tar.gz/.tgz once per archive "
                        "content, fresh at each start (repeatable; writes do not "
                        "persist; at most 2048 MiB)")
    p.add_argument("--kernel", metavar="PATH",
                   help="boot this kernel instead of the default, at every start: a bzImage "
                        "(its modules beside it), a kernel bundle directory or its vmlinuz, "
                        "an unpacked kernel package or a .deb")
    p.add_argument("--setup", action="append", default=[], metavar="CMD",
                   help="a command run with /bin/sh -c once before the first start "
                        "(repeatable, in order)")


def register(verbs: Verbs) -> None:
    p = add_verb(verbs, "create", cmd_create, "create a workspace from an image")
    add_name(p)
    p.add_argument("--image", metavar="REF", help="image reference, oci:DIR or docker-archive:TAR")
    p.add_argument("--from-snapshot", metavar="NAME:TAG",
                   help="fork: a new workspace that resumes from that snapshot's memory on "
                        "its own copy of the disks (only --hostname and --publish apply)")
    add_create_options(p)

    add_verb(verbs, "list", cmd_list, "list saved workspaces", aliases=["ls"])
    add_verb(verbs, "ps", cmd_ps, "list running workspaces")
    add_name(add_verb(verbs, "status", cmd_status,
                      "one workspace in words (--json adds readiness signals)"))
    p = add_verb(verbs, "delete", cmd_delete, "delete a workspace and its disk", aliases=["rm"])
    add_name(p)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
