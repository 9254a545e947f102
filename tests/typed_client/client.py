"""A small program that uses microagent's public API as a user's program would.

It is not run by the test suite: tests/unit/test_typed_client.py checks it with
``mypy --strict`` the way a user's project would see the installed package (its
``py.typed``), so that the API's annotations stay usable by typed callers.

Usage: ``python client.py IMAGE [STATE_DIR]``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import microagent
from microagent import (
    Check,
    Event,
    ExecResult,
    FileEntry,
    Microagent,
    Readiness,
    Workspace,
    WorkspaceStatus,
)
from microagent.errors import (
    CommandFailedError,
    ConflictError,
    MicroagentError,
    NotFoundError,
    StartError,
    UsageError,
    WaitTimeoutError,
)


def describe(result: ExecResult) -> str:
    """One line about how a command ended."""
    code: int | None = result.exit_code
    signal: int | None = result.signal
    if result.timed_out:
        return f"timed out after {result.duration_s:.1f}s"
    if signal is not None:
        return f"killed by signal {signal}"
    return f"exited {code}: {result.stdout_text.strip()!r} {result.stderr_text.strip()!r}"


def ready(status: WorkspaceStatus) -> bool:
    readiness: Readiness = status.readiness
    details: str = ", ".join(f"{k}={v}" for k, v in readiness.details.items())
    print(status.name, status.state, status.pid, status.uptime_s, status.ports, details)
    return readiness.guest and readiness.exec and readiness.console and readiness.network


def listing(ws: Workspace, directory: str) -> list[str]:
    entries: list[FileEntry] = ws.files.list(directory)
    return [f"{e.kind} {e.mode:o} {e.size} {e.mtime:.0f} {e.path}" for e in entries]


def build(ws: Workspace, steps: Sequence[str]) -> list[ExecResult]:
    results: list[ExecResult] = []
    chunks: list[bytes] = []
    for step in steps:
        result = ws.exec(step, env={"CI": "1"}, cwd="/", timeout=600.0,
                         on_stdout=chunks.append, on_stderr=sys.stderr.buffer.write)
        results.append(result.check())
    return results


def session(ma: Microagent, image: str) -> int:
    try:
        ws = ma.get("typed")
    except NotFoundError:
        ws = ma.create("typed", image, profile="tiny", env={"LANG": "C.UTF-8"},
                       volumes=["typed-data:/data"], setup=["mkdir -p /srv"])
    try:
        status: WorkspaceStatus = ws.start(timeout=120.0)
    except StartError as e:
        print(f"{e.kind}: {e.message}\n{e.hint}", file=sys.stderr)
        return e.exit_code
    print("ready" if ready(status) else "not all ready", status.to_json()["state"])
    assert ma.handle(ws.name) == ws

    first = ws.exec(["sh", "-c", "echo hi; exit 3"], stdin=b"", user="root")
    print(describe(first), first.ok, first.to_json()["exit_code"], first.host_exit_code)
    ws.files.write("/srv/notes.txt", "some notes\n", mode=0o600)
    text: str = ws.files.read_text("/srv/notes.txt")
    data: bytes = ws.files.read("/srv/notes.txt")
    entry: FileEntry = ws.files.stat("/srv/notes.txt")
    assert text.encode() == data and entry.size == len(data)
    target: str | None = ws.files.stat("/bin/sh").target
    made: bool = ws.files.mkdir("/srv/cache")
    if made and ws.files.exists("/srv/cache"):
        removed: int = ws.files.remove("/srv/cache", recursive=True)
        print(target, removed)
    print("\n".join(listing(ws, "/srv")))
    ws.copy_in(Path("client.py"), "/srv/client.py")
    copied = ws.copy_out("/srv/client.py", Path("client-back.py"))
    print(copied.copied, copied.bytes)

    try:
        build(ws, ["true", "exit 2"])
    except CommandFailedError as e:
        failed: ExecResult = e.result
        print(f"step failed: {describe(failed)}; the CLI would exit {e.exit_code}")

    try:
        ws.delete()
    except ConflictError as e:
        print(e.message)
    try:
        ws.wait(["halted", "stopped"], timeout=0)
    except WaitTimeoutError as e:
        print(e.kind)

    events: list[Event] = ws.events()
    print(events[-1].time, events[-1].state, events[-1].detail, ws.logs(tail=5))
    output, line_status = ws.console_send("uname -r", timeout=10.0)
    print(output.decode(errors="replace"), line_status if line_status is not None else "?")
    state: str = ws.halt()
    for event in ws.follow_events(follow=False):
        print(event.state)
    print(state, ws.state, ws.attrs.get("image"), ws.reload().to_json()["name"])
    return 0


def one_shots(ma: Microagent, image: str) -> None:
    result = ma.run(image, ["echo", "one shot"], profile="tiny", timeout=60.0)
    print(describe(result))
    with ma.scratch(image, profile="tiny") as box:
        out: bytes = box.exec("uname -r").check().stdout
        print(box.name, out)


def housekeeping(ma: Microagent) -> None:
    for image in ma.images.list():
        print(image.reference, image.digest, image.size)
    for volume in ma.volumes.list():
        print(volume.name, volume.size_mib, volume.attached_to)
    for kernel in ma.kernels.list():
        print(kernel.version, kernel.default)
    checks: list[Check] = ma.doctor()
    failing = [c.name for c in checks if c.status == "fail"]
    print("host ok" if not failing else f"fix: {failing}")
    workspaces: list[Workspace] = ma.list(running=True)
    print(sorted(w.name for w in workspaces), ma.state_dir, microagent.__version__)


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    ma = Microagent(argv[1]) if len(argv) > 1 else Microagent()
    try:
        code = session(ma, argv[0])
        one_shots(ma, argv[0])
        housekeeping(ma)
    except UsageError as e:  # also a ValueError
        print(f"usage: {e.message}", file=sys.stderr)
        return e.exit_code
    except MicroagentError as e:
        print(f"{e.kind}: {e.message}", file=sys.stderr)
        return e.exit_code
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
