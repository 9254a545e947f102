"""Attached storage: named volumes, existing ext4 images and tar bundles.

``--volume NAME:/dst[:ro|rw]``, ``--disk NAME=PATH:/dst[:ro|rw]`` and
``--bundle NAME=TAR:/dst[:ro|rw]`` each become an :class:`Attachment`, recorded with the
workspace. At each boot the supervisor turns them into block devices
(:func:`prepare_boot_disks`): the volume's image (:mod:`microagent.disks.volumes`), the
``--disk`` image as it is, or the bundle's ext4 disk (:mod:`microagent.disks.bundles`: built
once per archive content, a fresh copy of it at each boot for a rw bundle). Each disk
gets a virtio serial (``ma-disk1``, ...) and one
``microagent.disk=SERIAL:NAME:DEST:MODE`` kernel parameter; the guest agent finds the
device by that serial and mounts it before its channel opens (``guest/disks.c``). ``ro``
is QEMU's ``readonly=on``: the guest's block device itself refuses writes.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent.config import validate_name
from microagent.errors import MicroagentError, NotFoundError, UsageError
from microagent.layout import RunFiles, StateLayout
from microagent.progress import NullProgress, Progress
from microagent.store import ensure_dir

if TYPE_CHECKING:
    from microagent.disks.bundles import BuiltBundles

KINDS = ("volume", "disk", "bundle")
MODES = ("ro", "rw")
MAX_DEST_BYTES = 255
MAX_DISKS = 16  # virtio-mmio slots of QEMU's microvm are shared with net and serial
EXT4_MAGIC_OFFSET = 1024 + 0x38
_SAFE_DEST = re.compile(rb"[A-Za-z0-9._/+@-]")
_RESERVED = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class Attachment:
    """One disk to attach: what it is, where it goes in the guest, read-only or not."""

    kind: str  # volume, disk or bundle
    name: str
    dest: str
    read_only: bool = False
    source: str = ""  # the --disk image or the bundle's archive (absolute); "" for volumes

    @property
    def flag(self) -> str:
        """The flag as a user would write it, for messages."""
        mode = ":ro" if self.read_only else ""
        if self.kind == "volume":
            return f"--volume {self.name}:{self.dest}{mode}"
        return f"--{self.kind} {self.name}={self.source}:{self.dest}{mode}"

    def to_json(self) -> dict[str, Any]:
        """The record's shape (also ``--json``)."""
        return {"kind": self.kind, "name": self.name, "dest": self.dest,
                "read_only": self.read_only, "source": self.source}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Attachment:
        """Inverse of :meth:`to_json`."""
        return cls(kind=str(doc["kind"]), name=str(doc["name"]), dest=str(doc["dest"]),
                   read_only=bool(doc.get("read_only")), source=str(doc.get("source", "")))


# --- parsing and validation (pure) -----------------------------------------------------


def parse_volume(value: str) -> Attachment:
    """``NAME:/dst[:ro|rw]``; see :func:`split_mode` for the grammar."""
    flag = f"--volume {value}"
    name, sep, rest = value.partition(":")
    if not sep:
        raise UsageError(f"invalid --volume {value!r}", hint="use --volume NAME:/dst[:ro|rw]")
    if name.startswith(("/", ".", "~")):
        raise UsageError(f"invalid --volume {value!r}: {name!r} is a path, and only named "
                         "volumes can be attached this way",
                         hint="use a volume name (created on first use), or attach an ext4 "
                         "image with --disk NAME=PATH:/dst")
    validate_name(name, what="volume")
    fields, read_only = split_mode(rest.split(":"), flag, min_fields=2)
    return Attachment("volume", name, check_dest(":".join(fields), flag), read_only)


def parse_disk(value: str) -> Attachment:
    """``NAME=PATH:/dst[:ro|rw]``; see :func:`split_mode` for the grammar."""
    return _parse_sourced("disk", value, "--disk NAME=/path/image.ext4:/dst[:ro|rw]")


def parse_bundle(value: str) -> Attachment:
    """``NAME=TAR:/dst[:ro|rw]``; see :func:`split_mode` for the grammar."""
    return _parse_sourced("bundle", value, "--bundle NAME=/path/x.tar[.gz]:/dst[:ro|rw]")


def _parse_sourced(kind: str, value: str, form: str) -> Attachment:
    flag = f"--{kind} {value}"
    name, sep, rest = value.partition("=")
    fields, read_only = split_mode(rest.split(":"), flag, min_fields=3)
    if not sep or len(fields) < 2 or not ":".join(fields[:-1]):
        raise UsageError(f"invalid --{kind} {value!r}", hint=f"use {form}")
    validate_name(name, what=kind)
    dest = check_dest(fields[-1], flag)
    path = Path(":".join(fields[:-1])).expanduser().absolute()
    return Attachment(kind, name, dest, read_only, str(path))


def split_mode(fields: list[str], flag: str, *, min_fields: int) -> tuple[list[str], bool]:
    """Take the mode off the ``:``-separated ``fields`` of a flag: ``(fields, read_only)``.

    The grammar is ``[SRC:]DST[:MODE]``: a destination is absolute and holds no ``:``,
    so the last field is the mode when the flag has room for one (``min_fields``: 2 for
    ``DST:MODE``, 3 for ``SRC:DST:MODE``) and it holds no ``/``; a mode is ``ro`` or
    ``rw``, lowercase, as docker's. A source path may hold ``:`` (everything between
    ``=`` and the destination). Anything else is a usage error, never a destination.
    """
    if len(fields) >= min_fields and "/" not in fields[-1]:
        mode = fields[-1]
        if mode not in MODES:
            raise UsageError(f"{flag}: unknown mode {mode!r}",
                             hint="a mode is ro or rw, lowercase (as docker's); a "
                             "destination is an absolute path without ':'")
        return fields[:-1], mode == "ro"
    return fields, False


def check_dest(dest: str, flag: str) -> str:
    """A guest mount point: absolute, no ``.``, ``..`` or ``:``, not /, /proc, /sys or
    /dev."""
    if not dest.startswith("/"):
        raise UsageError(f"{flag}: the destination {dest!r} must be an absolute path "
                         "in the guest", hint="for example /work")
    if ":" in dest:
        raise UsageError(f"{flag}: the destination {dest!r} contains ':'",
                         hint="a destination cannot contain ':' (it separates the mode, "
                         "ro or rw)")
    parts = [p for p in dest.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise UsageError(f"{flag}: the destination {dest!r} must not contain '.' or '..'")
    clean = "/" + "/".join(parts)
    if clean == "/":
        raise UsageError(f"{flag}: cannot mount over the root file system /")
    if any(clean == r or clean.startswith(r + "/") for r in _RESERVED):
        raise UsageError(f"{flag}: {clean} is reserved for the guest's own file systems")
    if "\0" in clean or len(clean.encode()) > MAX_DEST_BYTES:
        raise UsageError(f"{flag}: the destination is longer than {MAX_DEST_BYTES} bytes")
    return clean


def validate_attachments(attachments: Sequence[Attachment]) -> None:
    """Refuse two disks at one destination, a volume or name twice, too many disks."""
    if len(attachments) > MAX_DISKS:
        raise UsageError(f"{len(attachments)} disks are attached; at most {MAX_DISKS} can be")
    dests: dict[str, Attachment] = {}
    names: set[tuple[str, str]] = set()
    for item in attachments:
        if item.kind not in KINDS:
            raise UsageError(f"unknown attachment kind {item.kind!r}")
        other = dests.get(item.dest)
        if other is not None:
            raise UsageError(f"the destination {item.dest} is used twice "
                             f"({other.flag} and {item.flag})")
        dests[item.dest] = item
        if (item.kind, item.name) in names:
            raise UsageError(f"{item.kind} {item.name} is attached twice",
                             hint="attach each volume, disk or bundle once")
        names.add((item.kind, item.name))


# --- the host files ------------------------------------------------------------------


def is_ext4(path: Path) -> bool:
    """Whether ``path`` holds an ext2/3/4 superblock (the magic 0xEF53)."""
    with path.open("rb") as f:
        f.seek(EXT4_MAGIC_OFFSET)
        return f.read(2) == b"\x53\xef"


def check_sources(attachments: Sequence[Attachment], *, work_dir: Path,
                  progress: Progress | None = None, build_bundles: bool = True
                  ) -> BuiltBundles:
    """Check every ``--disk`` image is ext4 and every bundle can be built (built in
    ``work_dir``; the caller adopts the disks or discards them, ``with`` the result).
    Raises NotFoundError, UsageError, UnsafeImageError or DiskTooSmallError."""
    from microagent.disks.bundles import BuiltBundles

    progress = progress or NullProgress()
    built = BuiltBundles(work_dir)
    try:
        for item in attachments:
            if item.kind == "disk":
                check_disk(item)
            elif item.kind == "bundle":
                _check_readable(item)
                if build_bundles:
                    progress.step(f"Building bundle {item.name}")
                    built.build(item)
    except BaseException:
        built.discard()
        raise
    return built


def check_disk(item: Attachment) -> None:
    """The ``--disk`` image exists and is ext4."""
    path = _check_readable(item)
    try:
        ext4 = is_ext4(path)
    except OSError as e:
        raise UsageError(f"{item.flag}: cannot read {path}: {e.strerror}") from e
    if not ext4:
        raise UsageError(f"{item.flag}: {path} is not an ext4 file system",
                         hint="attach an ext4 image (mkfs.ext4 FILE), or use --bundle for "
                         "a tar archive")


def _check_readable(item: Attachment) -> Path:
    path = Path(item.source)
    if not path.exists():
        raise NotFoundError(f"{item.flag}: {path} does not exist")
    if not path.is_file():
        raise UsageError(f"{item.flag}: {path} is not a regular file")
    return path


# --- what one boot gets --------------------------------------------------------------


@dataclass(frozen=True)
class DiskSpec:
    """A block device for the guest, in attach order (the root disk first: /dev/vda).

    ``serial`` is the virtio serial the guest finds an attached disk by
    (``/sys/block/vdX/serial``); ``read_only`` makes the device itself read-only.
    """

    path: Path
    read_only: bool = False
    name: str = "root"
    serial: str = ""


@dataclass(frozen=True)
class BootDisks:
    """The extra block devices of one boot and the kernel parameters that describe them."""

    disks: tuple[DiskSpec, ...]
    params: tuple[str, ...]


def mount_order(attachments: Sequence[Attachment]) -> list[Attachment]:
    """Parents before children (``/work`` before ``/work/cache``), else as given."""
    return sorted(attachments, key=lambda a: a.dest.count("/"))


def boot_disks(layout: StateLayout, files: RunFiles, attachments: Sequence[Attachment],
               bundles: Mapping[str, Path] | None = None) -> BootDisks:
    """The disks and ``microagent.disk=`` parameters of ``attachments``. Pure.

    A bundle's disk is ``bundles[name]`` if given (a ro bundle's cached disk), else this
    boot's copy in the run directory."""
    disks: list[DiskSpec] = []
    params: list[str] = []
    for index, item in enumerate(mount_order(attachments), start=1):
        serial = f"ma-disk{index}"
        if item.kind == "volume":
            path = layout.volume_disk(item.name)
        elif item.kind == "bundle":
            path = (bundles or {}).get(item.name) or files.bundle_disk(item.name)
        else:
            path = Path(item.source)
        disks.append(DiskSpec(path, item.read_only, item.name, serial))
        mode = "ro" if item.read_only else "rw"
        params.append(f"{serial}:{item.name}:{encode_dest(item.dest)}:{mode}")
    return BootDisks(tuple(disks), tuple(params))


def encode_dest(dest: str) -> str:
    """Percent-encode every byte outside ``[A-Za-z0-9._/+@-]`` (the guest decodes it), so
    a destination never holds a space, quote or colon on the kernel command line."""
    return "".join(chr(b) if _SAFE_DEST.fullmatch(bytes([b])) else f"%{b:02X}"
                   for b in dest.encode())


def prepare_boot_disks(layout: StateLayout, files: RunFiles,
                       attachments: Sequence[Attachment], bundles_dir: Path) -> BootDisks:
    """Check the sources and give this boot its bundle disks: the cached disk of each
    (``bundles_dir``, built again only for a new archive content), as it is for a ro
    bundle, a fresh copy in the run directory for a rw one; see :func:`boot_disks`."""
    cached: dict[str, Path] = {}
    for item in attachments:
        if item.kind == "volume" and not layout.volume_disk(item.name).exists():
            from microagent.disks.volumes import missing_volume_error

            raise missing_volume_error(item.name)
        if item.kind == "volume" and item.read_only:
            replay_journal(layout.volume_disk(item.name))
        if item.kind == "disk":
            check_disk(item)
        if item.kind == "bundle":
            from microagent.disks.bundles import ensure_bundle_disk, fresh_copy

            disk = ensure_bundle_disk(item, bundles_dir, work_dir=ensure_dir(layout.tmp_dir))
            if item.read_only:
                cached[item.name] = disk
            else:
                fresh_copy(disk, files.bundle_disk(item.name))
    return boot_disks(layout, files, attachments, cached)


def replay_journal(disk: Path) -> None:
    """Replay the journal a killed VM left in ``disk`` (e2fsck -E journal_only).

    A read-only device cannot replay it, so the guest could only mount it without
    (``noload``) and miss the last writes. Only for volumes, which microagent owns and the
    caller holds.
    """
    import os
    import subprocess

    from microagent.disks.ext4 import journal_needs_recovery
    from microagent.errors import HostError

    if not journal_needs_recovery(disk):
        return
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    e2fsck = shutil.which("e2fsck", path=path)
    if e2fsck is None:
        return  # the guest mounts it without the journal (noload) and says so
    result = subprocess.run([e2fsck, "-p", "-E", "journal_only", str(disk)],
                            capture_output=True, text=True, check=False)
    if result.returncode >= 4:
        raise HostError(f"cannot replay the journal of {disk}: e2fsck exited "
                        f"{result.returncode}: {(result.stderr or result.stdout).strip()}")


def remove_bundle_disks(files: RunFiles, attachments: Sequence[Attachment]) -> None:
    """Remove the bundle disks copied for the last boot (the cached ones stay)."""
    for item in attachments:
        if item.kind == "bundle":
            with contextlib.suppress(FileNotFoundError):
                files.bundle_disk(item.name).unlink()


def check_before_start(layout: StateLayout, workspace: str,
                       attachments: Sequence[Attachment]) -> None:
    """What ``start`` checks before spawning the supervisor, for clear errors at once:
    volumes exist (never created here: ``create`` made them) and are not attached
    elsewhere, ``--disk`` images are ext4, bundle archives exist."""
    from microagent.disks.volumes import held_error, missing_volume_error, volume_holder

    for item in attachments:
        if item.kind == "volume":
            if not layout.volume_disk(item.name).exists():
                raise missing_volume_error(item.name, workspace)
            holder = volume_holder(layout, item.name)
            if holder is not None:
                raise held_error(item.name, holder)
    check_sources(attachments, work_dir=layout.tmp_dir, build_bundles=False)


@contextlib.contextmanager
def new_volumes(layout: StateLayout, attachments: Sequence[Attachment],
                progress: Progress | None = None) -> Iterator[list[str]]:
    """Create the missing volumes of ``attachments``; delete them again if the block fails
    (a failed ``create`` leaves nothing behind)."""
    from microagent.disks.volumes import delete_volume, ensure_volume

    created: list[str] = []
    try:
        for item in attachments:
            if item.kind == "volume" and not layout.volume_disk(item.name).exists():
                (progress or NullProgress()).step(f"Creating volume {item.name}")
                if ensure_volume(layout, item.name):
                    created.append(item.name)
        yield created
    except BaseException:
        for name in created:
            with contextlib.suppress(MicroagentError, OSError):
                delete_volume(layout, name)
        raise
