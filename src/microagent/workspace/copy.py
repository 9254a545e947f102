"""``microagent cp``: files and trees between the host and a workspace, both ways.

``cp NAME:/path LOCAL`` and ``cp LOCAL NAME:/path``, with ``docker cp``'s rules: a
source directory copied to an existing directory lands inside it, to a new path
creates that path; a source ending in ``/.`` copies a directory's contents (merged into
the destination); a file replaces a file; a source symlink is copied as a symlink.

How, by the workspace's derived state (:func:`microagent.state.runtime.runtime_state`):

- **running**: through the agent. A regular file moves with the protocol's ``get`` and
  ``put`` (mode and owner travel with it; ``put`` is atomic in the guest); anything
  else as a tar stream through exec (:mod:`microagent.workspace.copytar`). A small ``sh`` probe
  says what the guest paths are.
- **prepared, halted, stopped, failed** (no live process): on the root disk with
  debugfs (:mod:`microagent.disks.diskfiles`), under the workspace lock so no start races it.
- **quarantined** and **paused** are refused; so are ``starting``/``halting`` and a
  failed workspace whose VM process still runs.

On the host every write goes through :class:`~microagent.disks.hostfiles.HostWriter`: what
comes from the guest never makes the host write outside the destination the user named.
As ``docker cp``: modes are kept and files belong to the user at the destination (the
host user going out, root going in), and an archive copy (``archive``, ``cp -a``) keeps
the owners too. Going out, a plain copy also drops setuid and setgid (and sticky on
files): a guest's setuid-root file must not land on the host as one. Devices and sockets
are skipped with a warning.
"""

from __future__ import annotations

import os
import posixpath
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent.config import validate_name
from microagent.disks.hostfiles import HostWriter, Meta, host_entries
from microagent.errors import (
    ConflictError,
    MicroagentError,
    NotFoundError,
    PausedError,
    UsageError,
)
from microagent.layout import StateLayout
from microagent.state.records import get_workspace
from microagent.state.runtime import runtime_state
from microagent.state.snapshots import resume_manifest
from microagent.store import file_lock
from microagent.vm.agent import AgentClient, ExecRequest
from microagent.vm.agentfiles import AgentFileError, get_file, put_file
from microagent.workspace.copytar import GUEST_PATH, tar_from_guest, tar_into_guest, write_tar
from microagent.workspace.supervisors import supervisor_of

PROBE_TIMEOUT = 30.0  # the path probe is one `sh`: a guest that takes longer is stuck
PROBE_GRACE = 10.0  # beyond the guest's own timeout, before the host gives up
FROM_GUEST = "from-guest"
TO_GUEST = "to-guest"
# one line per path: what it is (dir/file/link/other/missing); $1 says whether to follow
_PROBE = ('f=$1; shift; for p; do if [ "$f" = n ] && [ -L "$p" ]; then echo link; '
          'elif [ -d "$p" ]; then echo dir; elif [ -f "$p" ]; then echo file; '
          'elif [ -e "$p" ] || [ -L "$p" ]; then echo other; else echo missing; fi; done')


@dataclass(frozen=True)
class Endpoint:
    """One side of a copy: a workspace path (``workspace`` set) or a host path."""

    path: str
    workspace: str | None = None

    def __str__(self) -> str:
        return f"{self.workspace}:{self.path}" if self.workspace else self.path


@dataclass(frozen=True)
class CopyResult:
    """What a copy did: entries (files, symlinks, fifos) and bytes written."""

    copied: int
    bytes: int
    direction: str
    via: str
    destination: str
    skipped: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"copied": self.copied, "bytes": self.bytes, "direction": self.direction,
                "via": self.via, "destination": self.destination,
                "skipped": list(self.skipped)}


def parse_endpoint(spec: str) -> Endpoint:
    """``NAME:PATH`` is a workspace path; anything else (also ``./a:b``, ``/x:y``) local."""
    if not spec:
        raise UsageError("an empty path was given")
    name, sep, path = spec.partition(":")
    if sep and name and not spec.startswith((".", "/", "~")):
        validate_name(name)
        path = path or "/"
        return Endpoint(path if path.startswith("/") else "/" + path, name)
    return Endpoint(spec)


def copy(layout: StateLayout, source: str, destination: str, *,
         archive: bool = False) -> CopyResult:
    """Copy ``source`` to ``destination``; exactly one of them is ``NAME:/path``.

    ``archive`` keeps owners (numeric uid/gid) and, on the host, setuid and setgid."""
    src, dst = parse_endpoint(source), parse_endpoint(destination)
    if (src.workspace is None) == (dst.workspace is None):
        raise UsageError("cp copies between a workspace and the host: give exactly one "
                         "side as NAME:/path", hint="microagent cp NAME:/path LOCAL, or "
                         "microagent cp LOCAL NAME:/path")
    remote = src if src.workspace else dst
    name = str(remote.workspace)
    get_workspace(layout, name)
    if src.workspace:
        return _run(layout, name, lambda via: _from_guest(layout, name, src.path,
                                                           dst.path, via, archive))
    return _run(layout, name, lambda via: _to_guest(layout, name, src.path, dst.path, via,
                                                    archive))


def _run(layout: StateLayout, name: str,
         work: Callable[[AgentClient | None], CopyResult]) -> CopyResult:
    state = runtime_state(layout, name)
    if state.state == "paused":
        raise PausedError(name, state.detail)
    if state.state == "quarantined":
        raise ConflictError(f"workspace {name} is quarantined: cp is refused",
                            hint="halt, stop or kill it to end the quarantine")
    if state.state != "running" and resume_manifest(layout, name) is not None:
        # suspended, or a fork not started yet: replaying the disk's journal, or writing
        # to it, would break the disk that its saved memory expects
        raise ConflictError(f"workspace {name} resumes from a saved memory at its next "
                            "start: cp does not touch its disk until then",
                            hint=f"start it first, or `microagent start --cold {name}` "
                                 "(the memory is discarded)")
    if state.state == "running":
        sock = supervisor_of(layout, name).open_channel()
        client = AgentClient(sock)
        try:
            client.hello()
            return work(client)
        finally:
            client.close()
    with file_lock(layout.lock_file("workspace", name), what=f"workspace {name}", timeout=30):
        state = runtime_state(layout, name)
        if state.has_live_process or state.state in ("starting", "running", "halting"):
            raise ConflictError(f"workspace {name} is {state.state}: cp needs it running "
                                "or with no VM process", hint=f"wait, or microagent kill "
                                f"{name}" if state.has_live_process else "")
        from microagent.disks.diskfiles import replay_journal

        replay_journal(layout.workspace_rootfs(name))
        return work(None)


# --- guest → host -----------------------------------------------------------------


def _host_target(local: str, base: str, src_is_dir: bool, contents: bool) -> tuple[Path, str]:
    """(parent, name) of what the copy creates on the host, by docker cp's rules."""
    path = Path(local)
    if path.is_dir():
        if contents or not base:
            real = path.resolve()
            return real.parent, real.name
        return path, base
    if local.endswith("/"):
        raise NotFoundError(f"no such directory: {local}")
    if path.exists() and src_is_dir:
        raise MicroagentError(f"cannot copy a directory onto the file {local}")
    return path.parent, path.name


def _guest_parts(path: str) -> tuple[str, str, bool]:
    """(parent, base, contents) of a guest source path."""
    contents = path.endswith("/.") or path == "/"
    clean = posixpath.normpath(path)
    if clean == "/":
        return "/", "", True
    return posixpath.dirname(clean), posixpath.basename(clean), contents


def _from_guest(layout: StateLayout, name: str, path: str, local: str,
                client: AgentClient | None, archive: bool) -> CopyResult:
    parent, base, contents = _guest_parts(path)
    where = f"{name}:{path}"
    if client is None:
        return _from_disk(layout.workspace_rootfs(name), path, local, where, archive)
    kind = probe(client, [posixpath.normpath(path)], follow=False)[0]
    if kind == "missing":
        raise NotFoundError(f"no such file: {where}")
    host_parent, host_name = _host_target(local, base, kind == "dir", contents)
    skipped: list[str] = []
    with HostWriter(host_parent, host_name, archive=archive) as writer:
        if kind == "file":
            def fill(fd: int) -> Meta:
                meta = get_file(client, posixpath.normpath(path), lambda data: _write(fd, data))
                return Meta(int(meta.get("mode", 0o644)) & 0o7777, int(meta.get("uid", 0)),
                            int(meta.get("gid", 0)),
                            int(meta["mtime"]) * 1_000_000_000 if "mtime" in meta else None)
            try:
                writer.file((), fill)
            except AgentFileError as e:
                raise MicroagentError(f"cannot read {where}: {e.message}") from e
        else:
            skipped = tar_from_guest(client, parent, base, writer)
        writer.commit()
    return _done(writer, FROM_GUEST, "agent", skipped)


def _from_disk(image: Path, path: str, local: str, where: str, archive: bool) -> CopyResult:
    from microagent.disks.diskfiles import read_from_disk, stat_path

    _parent, base, contents = _guest_parts(path)
    top = stat_path(image, posixpath.normpath(path))
    if top is None:
        raise NotFoundError(f"no such file: {where}")
    host_parent, host_name = _host_target(local, base, top.kind == "dir", contents)
    with HostWriter(host_parent, host_name, archive=archive) as writer:
        skipped = read_from_disk(image, top, writer)
        writer.commit()
    return _done(writer, FROM_GUEST, "disk", skipped)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _done(writer: HostWriter, direction: str, via: str, skipped: list[str]) -> CopyResult:
    return CopyResult(writer.files, writer.bytes, direction, via,
                      str(writer.parent / writer.name), tuple(skipped))


def probe(client: AgentClient, paths: list[str], *, follow: bool) -> list[str]:
    """What each guest path is: ``dir``, ``file``, ``link`` (not followed), ``other``,
    ``missing``."""
    out = bytearray()
    err = bytearray()
    result = client.exec(ExecRequest(argv=("sh", "-c", _PROBE, "sh", "y" if follow else "n",
                                           *paths), env=(GUEST_PATH,),
                                     timeout_ms=int(PROBE_TIMEOUT * 1000)),
                         stdout=out.extend, stderr=err.extend,
                         deadline=time.monotonic() + PROBE_TIMEOUT + PROBE_GRACE)
    kinds = out.decode(errors="replace").split()
    if result.host_exit_code != 0 or len(kinds) != len(paths):
        detail = err.decode(errors="replace").strip() or str(result.error or "")
        raise MicroagentError(f"cannot inspect the guest's paths (cp needs sh in the "
                              f"image): {detail}")
    return kinds


# --- host → guest -----------------------------------------------------------------


def _to_guest(layout: StateLayout, name: str, local: str, path: str,
              client: AgentClient | None, archive: bool) -> CopyResult:
    contents = local.endswith("/.")
    source = Path(local)
    try:
        st = source.lstat()
    except FileNotFoundError:
        raise NotFoundError(f"no such file: {local}") from None
    except OSError as e:
        raise MicroagentError(f"cannot read {local}: {e.strerror}") from e
    base = source.absolute().name if not contents else ""
    dest = posixpath.normpath(path)
    keep = archive  # the host's owners; else root's in the guest, as docker cp
    if client is None:
        from microagent.disks.diskfiles import stat_path

        image = layout.workspace_rootfs(name)
        found = stat_path(image, dest)
        dest_kind = "missing" if found is None else found.kind
        parent_entry = stat_path(image, posixpath.dirname(dest))
        parent_kind = "dir" if parent_entry and parent_entry.kind == "dir" else "missing"
    else:
        dest_kind, parent_kind = probe(client, [dest, posixpath.dirname(dest)], follow=True)
    directory, top = _guest_target(name, dest, path, dest_kind, parent_kind, base,
                                   stat.S_ISDIR(st.st_mode), contents)
    skipped: list[str] = []
    target = posixpath.join(directory, top)
    if client is None:
        from microagent.disks.diskfiles import write_to_disk

        files, size, skipped = write_to_disk(layout.workspace_rootfs(name),
                                             host_entries(source), directory, top,
                                             keep_owners=keep)
        return CopyResult(files, size, TO_GUEST, "disk", f"{name}:{target}", tuple(skipped))
    if stat.S_ISREG(st.st_mode):
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            put_file(client, target, lambda n: os.read(fd, n), mode=stat.S_IMODE(st.st_mode),
                     uid=st.st_uid if keep else 0, gid=st.st_gid if keep else 0)
        except AgentFileError as e:
            raise MicroagentError(f"cannot write {name}:{target}: {e.message}") from e
        finally:
            os.close(fd)
        return CopyResult(1, size, TO_GUEST, "agent", f"{name}:{target}")
    files, size = tar_into_guest(client, directory, lambda pipe: write_tar(
        host_entries(source), top, pipe, keep_owners=keep, skipped=skipped))
    return CopyResult(files, size, TO_GUEST, "agent", f"{name}:{target}", tuple(skipped))


def _guest_target(name: str, dest: str, given: str, dest_kind: str, parent_kind: str,
                  base: str, src_is_dir: bool, contents: bool) -> tuple[str, str]:
    """(directory, name) of what the copy creates in the guest, by docker cp's rules."""
    if dest_kind == "dir" and not contents and base:
        return dest, base
    if dest_kind == "dir" and (contents or not base):
        if dest == "/":
            raise UsageError("copy a directory's contents onto / by naming its entries")
        return posixpath.dirname(dest), posixpath.basename(dest)
    if (dest == "/" or given.endswith("/")) and dest_kind == "missing":
        raise NotFoundError(f"no such directory: {name}:{given}")
    if dest_kind != "missing" and src_is_dir:
        raise MicroagentError(f"cannot copy a directory onto the file {name}:{given}")
    if parent_kind != "dir":
        raise NotFoundError(f"no such directory: {name}:{posixpath.dirname(dest)}")
    return posixpath.dirname(dest), posixpath.basename(dest)
