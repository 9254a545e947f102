"""Named volumes: ext4 images under ``volumes/`` that outlive the workspaces using them.

A volume is ``volumes/NAME.ext4`` (sparse) plus its record ``volumes/NAME.json`` (size,
creation time). The image is the commit point: a volume exists when its image does, so a
create interrupted before the rename leaves no volume, only a record that is ignored and
rewritten by the next create.

A volume is attached to at most one running workspace. The supervisor of that workspace
holds an flock on ``locks/volume-hold-NAME.lock`` for its whole life (see
:func:`hold_volumes`) and writes its workspace's name into the file; the kernel drops the
lock when the supervisor dies, however it dies, so a killed supervisor never leaves a
stale holder. Its QEMU inherits the descriptors, so the volume stays held while a VM
whose supervisor was killed runs on (vm/adopt.py). ``delete`` takes the same lock, so a
volume cannot be deleted under a running workspace nor attached while it is being
deleted; it also refuses a volume that any workspace records (:func:`volume_users`)
unless forced.

``create`` makes the missing volumes of a new workspace; ``start`` never does: a volume
deleted since is an error (:func:`missing_volume_error`), not a new empty disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent.config import DEFAULT_VOLUME_MIB, validate_name
from microagent.errors import (
    ConflictError,
    HostError,
    MicroagentError,
    NotFoundError,
    UsageError,
)
from microagent.events import now_iso
from microagent.layout import StateLayout
from microagent.store import ensure_dir, file_lock, fsync_dir, read_json, write_json_atomic

DEFAULT_SIZE_MIB = DEFAULT_VOLUME_MIB
MIN_SIZE_MIB = 16
MAX_SIZE_MIB = 16 * 1024 * 1024
_MIB = 1 << 20


@dataclass(frozen=True)
class Volume:
    """A named volume and, derived, the running workspace it is attached to."""

    name: str
    size_mib: int
    created: str
    path: Path
    attached_to: str | None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` shape of one volume."""
        return {"name": self.name, "size_mib": self.size_mib, "created": self.created,
                "path": str(self.path), "attached_to": self.attached_to}


def create_volume(layout: StateLayout, name: str, size_mib: int = DEFAULT_SIZE_MIB) -> Volume:
    """Create an empty ext4 volume; ConflictError if one with that name exists."""
    validate_name(name, what="volume")
    _check_size(size_mib)
    with _volume_lock(layout, name):
        if layout.volume_disk(name).exists():
            raise ConflictError(f"volume {name} already exists",
                                hint=f"`microagent volume status {name}` shows it")
        _make_volume(layout, name, size_mib)
    return get_volume(layout, name)


def ensure_volume(layout: StateLayout, name: str) -> bool:
    """Create ``name`` with the default size unless it exists; True when it was created."""
    validate_name(name, what="volume")
    with _volume_lock(layout, name):
        if layout.volume_disk(name).exists():
            return False
        _make_volume(layout, name, DEFAULT_SIZE_MIB)
    return True


def _check_size(size_mib: int) -> None:
    if not MIN_SIZE_MIB <= size_mib <= MAX_SIZE_MIB:
        raise UsageError(f"--size-mib {size_mib} is out of range "
                         f"({MIN_SIZE_MIB}..{MAX_SIZE_MIB} MiB)")


def _make_volume(layout: StateLayout, name: str, size_mib: int) -> None:
    from microagent.disks import ext4

    tools = ext4.find_tools()
    ensure_dir(layout.volumes_dir)
    write_json_atomic(layout.volume_record(name),
                      {"name": name, "size_mib": size_mib, "created": now_iso()})
    disk = layout.volume_disk(name)
    image: Path | None = None
    empty = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=layout.volumes_dir))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{disk.name}.", suffix=".tmp", dir=disk.parent)
        image = Path(tmp)
        try:
            os.ftruncate(fd, size_mib * _MIB)
        finally:
            os.close(fd)
        ext4.make_filesystem(tools, empty, image, label=name[:16],
                             inodes=ext4.inode_count(size_mib, ext4.TreeSize(0, 0)))
        os.replace(image, disk)
        image = None
        fsync_dir(disk.parent)
    except OSError as e:
        raise HostError(f"cannot create volume {name}: {e.strerror or e}") from e
    finally:
        if image is not None:
            with contextlib.suppress(FileNotFoundError):
                image.unlink()
            with contextlib.suppress(FileNotFoundError):
                layout.volume_record(name).unlink()
        shutil.rmtree(empty, ignore_errors=True)


def get_volume(layout: StateLayout, name: str) -> Volume:
    """One volume, or NotFoundError."""
    validate_name(name, what="volume")
    disk = layout.volume_disk(name)
    try:
        size = disk.stat().st_size
    except FileNotFoundError:
        raise NotFoundError(f"no volume named {name}",
                            hint="`microagent volume list` shows the volumes") from None
    created = ""
    with contextlib.suppress(FileNotFoundError, ValueError, Exception):
        created = str(read_json(layout.volume_record(name)).get("created", ""))
    return Volume(name=name, size_mib=size // _MIB, created=created, path=disk,
                  attached_to=volume_holder(layout, name))


def list_volumes(layout: StateLayout) -> list[Volume]:
    """Every volume, by name."""
    if not layout.volumes_dir.is_dir():
        return []
    volumes = []
    for path in sorted(layout.volumes_dir.glob("*.ext4")):
        if path.name.startswith("."):
            continue
        with contextlib.suppress(NotFoundError, UsageError):
            volumes.append(get_volume(layout, path.name[: -len(".ext4")]))
    return volumes


def delete_volume(layout: StateLayout, name: str, *, force: bool = False) -> bool:
    """Delete a volume and its data; False when there was none.

    Refused while attached to a running workspace, and, unless ``force``, while any
    workspace (running or not) records it: their next start would fail (a start never
    re-creates a volume).
    """
    validate_name(name, what="volume")
    with _volume_lock(layout, name):
        disk = layout.volume_disk(name)
        if not disk.exists():
            return False
        try:  # first: a running workspace's hold says what to do (halt it)
            fd = _hold(layout, "(being deleted)", name)
        except ConflictError as e:
            raise ConflictError(f"cannot delete volume {name}: {e.message}", hint=e.hint) \
                from None
        try:
            users = volume_users(layout, name)
            if users and not force:
                listed = ", ".join(users)
                raise ConflictError(
                    f"cannot delete volume {name}: the workspace"
                    f"{'s' if len(users) > 1 else ''} {listed} use"
                    f"{'' if len(users) > 1 else 's'} it",
                    hint=f"delete {listed} first, or pass --force (their next start then "
                         f"fails until `microagent volume create {name}` makes an empty one)")
            disk.unlink()
            with contextlib.suppress(FileNotFoundError):
                layout.volume_record(name).unlink()
            fsync_dir(disk.parent)
        finally:
            os.close(fd)
    return True


def volume_users(layout: StateLayout, name: str) -> list[str]:
    """The workspaces, running or not, whose records attach the volume ``name``.

    Read from the records themselves (not :mod:`microagent.state.records`, which sits above
    this module); a record that cannot be read is skipped.
    """
    if not layout.workspaces_dir.is_dir():
        return []
    users = []
    for directory in sorted(layout.workspaces_dir.iterdir()):
        if directory.name.startswith("."):
            continue
        try:
            disks = read_json(directory / "workspace.json").get("disks", ())
        except (OSError, MicroagentError):
            continue
        if any(isinstance(d, dict) and d.get("kind") == "volume" and d.get("name") == name
               for d in disks):
            users.append(directory.name)
    return users


def missing_volume_error(name: str, workspace: str = "") -> NotFoundError:
    """The refusal to start ``workspace`` whose volume ``name`` was deleted."""
    of = f" of workspace {workspace}" if workspace else ""
    return NotFoundError(f"volume {name}{of} does not exist (it was deleted); a start "
                         "never creates one, so that no data seems lost silently",
                         hint=f"create it, empty: microagent volume create {name}")


def volume_holder(layout: StateLayout, name: str) -> str | None:
    """The running workspace the volume is attached to, or None."""
    try:
        fd = os.open(layout.volume_hold(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 256, 0).decode(errors="replace").strip() or "another workspace"
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_volumes(layout: StateLayout, workspace: str, names: Sequence[str]
                 ) -> Iterator[list[int]]:
    """Attach ``names`` to ``workspace`` for the life of the block (see the module doc);
    yields the descriptors that hold them (a VMM that inherits them holds them too).

    Raises ConflictError naming the workspace that holds one of them; nothing stays held.
    """
    fds: list[int] = []
    try:
        for name in names:
            fds.append(_hold(layout, workspace, name))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def _hold(layout: StateLayout, workspace: str, name: str) -> int:
    path = layout.volume_hold(name)
    ensure_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another workspace"
        os.close(fd)
        raise held_error(name, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, workspace.encode(), 0)
    return fd


def held_error(name: str, holder: str) -> ConflictError:
    """The refusal for a volume attached to the running workspace ``holder``."""
    if holder.startswith("("):
        return ConflictError(f"volume {name} is busy {holder}")
    return ConflictError(f"volume {name} is attached to the running workspace {holder}",
                         hint=f"halt {holder} first (microagent halt {holder})")


def _volume_lock(layout: StateLayout, name: str) -> contextlib.AbstractContextManager[None]:
    return file_lock(layout.lock_file("volume", name), what=f"volume {name}", timeout=10)
