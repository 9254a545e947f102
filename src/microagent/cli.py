"""The ``microagent`` command: parse, call the library, render text or ``--json``.

Nothing imports this module. Every error is a :class:`~microagent.errors.MicroagentError`
turned into a message, a hint and an exit code in :func:`main`, the one place that does.
Heavy modules are imported inside the command functions so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from microagent import __version__
from microagent.config import DEFAULT_PROFILE, PROFILES
from microagent.errors import (
    EXIT_EXEC_FAILED,
    EXIT_FAILURE,
    EXIT_OK,
    MicroagentError,
    UsageError,
)
from microagent.layout import StateLayout

Handler = Callable[[argparse.Namespace, "Output"], int]


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


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by three spaces, docker-style."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in [headers, *rows]]
    return "\n".join(lines)


def layout_of(args: argparse.Namespace) -> StateLayout:
    return StateLayout.resolve(args.state_dir)


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


# --- commands ------------------------------------------------------------------------


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


def cmd_image_pull(args: argparse.Namespace, out: Output) -> int:
    from microagent.images import pull_image

    image = pull_image(layout_of(args), args.reference, progress=out.progress())
    out.emit(image.to_json(), f"{image.reference} {image.digest}")
    return EXIT_OK


def cmd_image_list(args: argparse.Namespace, out: Output) -> int:
    from microagent.images import list_images
    from microagent.progress import format_size

    images = list_images(layout_of(args))
    rows = [[i.reference, i.digest[:19], format_size(i.size), ago(i.pulled)] for i in images]
    text = table(["REF", "DIGEST", "SIZE", "PULLED"], rows) if images else "No images."
    out.emit({"images": [i.to_json() for i in images]}, text)
    return EXIT_OK


def cmd_image_rm(args: argparse.Namespace, out: Output) -> int:
    from microagent.images import remove_image

    image = remove_image(layout_of(args), args.reference)
    out.emit({"removed": image.to_json()}, f"Removed {image.reference}")
    return EXIT_OK


def cmd_kernel_install(args: argparse.Namespace, out: Output) -> int:
    from pathlib import Path

    from microagent.kernels import install_kernel

    bundle = install_kernel(
        layout_of(args),
        from_path=Path(args.from_path).expanduser() if args.from_path else None,
        modules_dir=Path(args.modules).expanduser() if args.modules else None,
        progress=out.progress(),
    )
    out.emit(bundle.to_json(), f"Installed kernel {bundle.version} ({bundle.source}) "
                               f"with {len(bundle.modules)} modules")
    return EXIT_OK


def cmd_kernel_list(args: argparse.Namespace, out: Output) -> int:
    from microagent.kernels import list_kernels

    bundles = list_kernels(layout_of(args))
    rows = [[b.version, "yes" if b.default else "", b.source, str(len(b.modules))]
            for b in bundles]
    text = table(["VERSION", "DEFAULT", "SOURCE", "MODULES"], rows) if bundles \
        else "No kernels installed."
    out.emit({"kernels": [b.to_json() for b in bundles]}, text)
    return EXIT_OK


def cmd_create(args: argparse.Namespace, out: Output) -> int:
    from microagent.config import resolve_resources
    from microagent.workspaces import WorkspaceSpec, create_workspace

    name = workspace_name(args)
    if not args.image:
        raise UsageError("create needs --image REF")
    spec = WorkspaceSpec(
        name=name,
        image=args.image,
        resources=resolve_resources(args.profile, memory_mib=args.memory, cpus=args.cpus,
                                    disk_mib=args.size_mib),
        backend=args.backend,
        network=args.network,
        restart=args.restart,
        env=tuple(args.env),
        hostname=args.hostname or "",
    )
    ws = create_workspace(layout_of(args), spec, progress=out.progress())
    out.emit(ws.to_json(), "\n".join([
        f"Workspace: {ws.name}",
        f"State: {ws.state}",
        f"Rootfs: {ws.rootfs}",
        f"Profile: {ws.resources.profile}",
        f"Resources: {ws.resources.describe()}",
    ]))
    return EXIT_OK


def cmd_start(args: argparse.Namespace, out: Output) -> int:
    from microagent.lifecycle import start_workspace

    name = workspace_name(args)
    state = start_workspace(layout_of(args), name, timeout=args.timeout,
                            progress=out.progress())
    out.emit({"name": name, "state": state.state, "pid": state.vmm_pid})
    return EXIT_OK


def cmd_halt(args: argparse.Namespace, out: Output) -> int:
    from microagent.lifecycle import halt_workspace

    name = workspace_name(args)
    out.emit({"name": name, "state": halt_workspace(layout_of(args), name)})
    return EXIT_OK


def cmd_stop(args: argparse.Namespace, out: Output) -> int:
    from microagent.lifecycle import stop_workspace

    name = workspace_name(args)
    out.emit({"name": name, "state": stop_workspace(layout_of(args), name)})
    return EXIT_OK


def cmd_kill(args: argparse.Namespace, out: Output) -> int:
    from microagent.lifecycle import kill_workspace

    name = workspace_name(args)
    out.emit({"name": name, "state": kill_workspace(layout_of(args), name)})
    return EXIT_OK


def cmd_exec(args: argparse.Namespace, out: Output) -> int:
    from microagent.execution import ExecOptions, run_exec

    argv = list(args.argv)
    if "--" in argv:
        # CLI.md's form: exec NAME [OPTIONS] -- ARGV; options may also precede NAME
        split = argv.index("--")
        leading = Parser(prog="microagent exec", add_help=False)
        add_exec_options(leading)
        leading.parse_args(argv[:split], namespace=args)
        argv = argv[split + 1 :]
    if not argv:
        raise UsageError("exec needs a command after the workspace name",
                         hint="microagent exec NAME -- COMMAND [ARGS...]")
    options = ExecOptions(argv=tuple(argv), env=tuple(args.env), workdir=args.workdir or "",
                          user=args.user or "", interactive=args.interactive, tty=args.tty,
                          timeout=args.timeout or 0.0)
    if out.as_json:
        captured: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        result = run_exec(layout_of(args), args.name, options,
                          stdout=captured["stdout"].extend, stderr=captured["stderr"].extend)
        document: dict[str, Any] = {
            "exit_code": result.host_exit_code, "signal": result.signal,
            "timed_out": result.timed_out, "duration_ms": result.duration_ms}
        for key, data in captured.items():
            document.update(_text_field(key, bytes(data)))
        if result.error:
            document["error"] = result.error
        out.emit(document)
        return result.host_exit_code

    def write(stream: Any) -> Any:
        def sink(data: bytes) -> None:
            stream.buffer.write(data)
            stream.buffer.flush()
        return sink

    result = run_exec(layout_of(args), args.name, options, stdout=write(sys.stdout),
                      stderr=write(sys.stderr))
    if result.error:
        sys.stderr.write(f"microagent: {result.error.get('message', result.error)}\n")
    elif result.timed_out:
        sys.stderr.write(f"microagent: command timed out after {args.timeout}s\n")
    return result.host_exit_code


def _text_field(key: str, data: bytes) -> dict[str, Any]:
    """Output as text, or base64 with a flag when it is not valid UTF-8."""
    try:
        return {key: data.decode("utf-8"), f"{key}_encoding": "utf-8"}
    except UnicodeDecodeError:
        import base64

        return {key: base64.b64encode(data).decode(), f"{key}_encoding": "base64"}


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    from microagent.lifecycle import workspace_status

    name = workspace_name(args)
    doc = workspace_status(layout_of(args), name, probe=out.as_json)
    lines = [
        f"Workspace: {doc['name']}",
        f"State: {doc['state']}" + (f" ({doc['detail']})" if doc["detail"] else ""),
        f"Image: {doc['image']}",
        f"Profile: {doc['profile']}",
        f"Resources: memory={doc['resources']['memory_mib']}MiB cpus={doc['resources']['cpus']}"
        f" disk={doc['resources']['disk_mib']}MiB",
        f"Backend: {doc['backend']}" + (f" ({doc['accel']})" if doc.get("accel") else ""),
        f"Network: {doc['network']}",
        f"Restart: {doc['restart']}",
        f"Rootfs: {doc['rootfs']}",
    ]
    if doc["pid"]:
        lines.append(f"PID: {doc['pid']}")
    if doc["uptime_seconds"] is not None:
        lines.append(f"Uptime: {doc['uptime_seconds']:.0f}s")
    for key in ("guestReady", "execReady", "consoleReady", "networkReady"):
        signal_doc = doc[key]
        lines.append(f"{key}: {'yes' if signal_doc['ok'] else 'no'} ({signal_doc['detail']})")
    out.emit(doc, "\n".join(lines))
    return EXIT_OK


def cmd_ps(args: argparse.Namespace, out: Output) -> int:
    return render_workspaces(args, out, running_only=True)


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    return render_workspaces(args, out, running_only=False)


def cmd_supervise(args: argparse.Namespace, out: Output) -> int:
    from microagent.supervisor import run_supervisor

    return run_supervisor(layout_of(args), args.name, args.timeout)


def render_workspaces(args: argparse.Namespace, out: Output, *, running_only: bool) -> int:
    from microagent.workspaces import list_workspaces

    workspaces = list_workspaces(layout_of(args))
    if running_only:
        workspaces = [w for w in workspaces
                      if w.state in ("starting", "running", "halting", "quarantined")]
    rows = [[w.name, w.state, w.backend, w.resources.profile, w.network, w.restart]
            for w in workspaces]
    text = (table(["NAME", "STATE", "BACKEND", "PROFILE", "NETWORK", "RESTART"], rows)
            if workspaces else "No workspaces.")
    out.emit({"workspaces": [w.to_json() for w in workspaces]}, text)
    return EXIT_OK


def cmd_delete(args: argparse.Namespace, out: Output) -> int:
    from microagent.config import validate_name
    from microagent.workspaces import delete_workspace

    name = validate_name(workspace_name(args))
    if not args.yes:
        confirm(f"Delete workspace {name} and its disk? [y/N] ")
    existed = delete_workspace(layout_of(args), name)
    text = f"Deleted {name}" if existed else f"No workspace named {name}; nothing to delete."
    out.emit({"name": name, "deleted": existed}, text)
    return EXIT_OK


def workspace_name(args: argparse.Namespace) -> str:
    """The name given positionally or with --name (not both, not neither)."""
    if args.name and args.name_flag:
        raise UsageError("give the workspace name once: positionally or with --name")
    name = args.name or args.name_flag
    if not name:
        raise UsageError("a workspace name is required")
    return str(name)


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


# --- parser --------------------------------------------------------------------------


def add_exec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                        help="set an environment variable (repeatable)")
    parser.add_argument("-w", "--workdir", metavar="DIR", help="working directory")
    parser.add_argument("-u", "--user", metavar="USER", help="user name or UID[:GID]")
    parser.add_argument("-i", "--interactive", action="store_true", help="forward stdin")
    parser.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    parser.add_argument("--timeout", type=float, metavar="S", help="kill the command after S s")


def add_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="workspace name")
    parser.add_argument("--name", dest="name_flag", metavar="NAME", help="workspace name")


def build_parser() -> Parser:
    parser = Parser(prog="microagent",
                    description="Persistent AI-agent workspaces in microVMs.")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="state directory (default ~/.microagent, env MICROAGENT_HOME)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=Parser)

    def verb(name: str, handler: Handler, help_text: str,
             aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help_text, aliases=list(aliases),
                             description=help_text)
        p.set_defaults(handler=handler)
        return p

    verb("version", cmd_version, "print the version")
    verb("profiles", cmd_profiles, "list the resource profiles")

    p = verb("create", cmd_create, "create a workspace from an image")
    add_name(p)
    p.add_argument("--image", metavar="REF", help="image reference, oci:DIR or docker-archive:TAR")
    p.add_argument("--profile", metavar="P", help=f"resource profile (default {DEFAULT_PROFILE})")
    p.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB")
    p.add_argument("--cpus", type=int, metavar="N", help="virtual CPUs")
    p.add_argument("--size-mib", type=int, metavar="MIB", help="root disk size in MiB")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="environment for commands (repeatable)")
    p.add_argument("--hostname", metavar="H", help="guest hostname (default: the name)")
    p.add_argument("--network", default="user", metavar="MODE", help="user (default) or none")
    p.add_argument("--restart", default="never", metavar="POLICY",
                   help="never (default), on-failure or always")
    p.add_argument("--backend", default="qemu", metavar="B", help="qemu (default)")

    verb("list", cmd_list, "list saved workspaces", aliases=["ls"])
    verb("ps", cmd_ps, "list running workspaces")

    p = verb("start", cmd_start, "boot a workspace and wait until it is ready")
    add_name(p)
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for the guest (default 120)")
    for name, handler, text in (
        ("halt", cmd_halt, "clean, disk-preserving shutdown"),
        ("stop", cmd_stop, "ask the guest to shut down; failed if it has not within 5s"),
        ("kill", cmd_kill, "end the VM process at once"),
        ("status", cmd_status, "one workspace in words (--json adds readiness signals)"),
    ):
        add_name(verb(name, handler, text))

    p = verb("exec", cmd_exec, "run a command in a running workspace")
    add_exec_options(p)
    p.add_argument("name", metavar="NAME")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND")

    p = verbs.add_parser("_supervise")  # hidden: the per-workspace supervisor
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(handler=cmd_supervise)

    p = verb("delete", cmd_delete, "delete a workspace and its disk", aliases=["rm"])
    add_name(p)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    image = verbs.add_parser("image", help="manage cached images", description="images")
    image_verbs = image.add_subparsers(dest="image_verb", metavar="COMMAND", parser_class=Parser)
    image.set_defaults(handler=lambda a, o: usage_of(image))
    p = image_verbs.add_parser("pull", help="pull an image into the cache")
    p.add_argument("reference", metavar="REF")
    p.set_defaults(handler=cmd_image_pull)
    p = image_verbs.add_parser("list", aliases=["ls"], help="list cached images")
    p.set_defaults(handler=cmd_image_list)
    p = image_verbs.add_parser("rm", aliases=["remove"], help="remove a cached image")
    p.add_argument("reference", metavar="REF")
    p.set_defaults(handler=cmd_image_rm)

    kernel = verbs.add_parser("kernel", help="manage guest kernels", description="kernels")
    kernel_verbs = kernel.add_subparsers(dest="kernel_verb", metavar="COMMAND",
                                         parser_class=Parser)
    kernel.set_defaults(handler=lambda a, o: usage_of(kernel))
    p = kernel_verbs.add_parser("install", help="install a kernel bundle")
    p.add_argument("--from", dest="from_path", metavar="PATH",
                   help="a bzImage, an unpacked kernel package or a .deb")
    p.add_argument("--modules", metavar="DIR", help="the modules directory for a bzImage")
    p.set_defaults(handler=cmd_kernel_install)
    p = kernel_verbs.add_parser("list", aliases=["ls"], help="list installed kernels")
    p.set_defaults(handler=cmd_kernel_list)
    return parser


def usage_of(parser: argparse.ArgumentParser) -> int:
    raise UsageError(f"{parser.prog} needs a command", hint=f"see `{parser.prog} --help`")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one command and return its exit code."""
    raw = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in raw[: _verb_position(raw)]
    debug = "--debug" in raw[: _verb_position(raw)]
    out = Output(as_json)
    try:
        parser = build_parser()
        args = parser.parse_args(raw)
        if not getattr(args, "handler", None):
            parser.print_help(sys.stderr)
            return 2
        handler: Handler = args.handler
        return handler(args, out)
    except MicroagentError as e:
        if debug:
            import traceback

            traceback.print_exc()
        report(out, e)
        if _is_exec(raw) and not isinstance(e, UsageError):
            return EXIT_EXEC_FAILED  # CLI.md: exec's own failures are 125
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_FAILURE
    except Exception as e:
        if debug:
            raise
        report(out, MicroagentError(f"internal error: {type(e).__name__}: {e}",
                                    hint="rerun with --debug for a traceback"))
        return EXIT_FAILURE


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
