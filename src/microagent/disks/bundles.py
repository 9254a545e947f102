"""Bundle disks: the ext4 disk of a ``--bundle`` tar archive, built once per content.

A bundle is built like an image layer (:mod:`microagent.images.layers` and
:func:`microagent.disks.rootfs.build_root_disk`: the same safety checks, ``mkfs.ext4 -d``), sized
to fit, and refused past :data:`BUNDLE_MAX_MIB` as the archive streams (a gzip of zeros
stops there, not at the host's free space).

Each workspace keeps the built disks in ``workspaces/NAME/bundles/BUNDLE/KEY.ext4``,
KEY from :func:`bundle_key`: the archive's sha256, the bundle's name (it is the file
system's label) and :data:`BUNDLE_RECIPE` (how microagent builds it). ``create`` builds them while
it checks the flags (:class:`BuiltBundles`, adopted by the new workspace); a boot builds
one again only when the archive's content changed (:func:`ensure_bundle_disk`), and
takes a fresh copy of it for a rw bundle (``rootfs.copy_disk``: a reflink or a sparse
copy) so that writes never persist. A ro bundle is the cached disk itself, opened
read-only by QEMU.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from microagent.errors import (
    DiskTooSmallError,
    IntegrityError,
    NotFoundError,
    RetryableError,
    UnsafeImageError,
    UsageError,
)
from microagent.staging import Staged, stage_dir, sweep
from microagent.store import ensure_dir

if TYPE_CHECKING:
    from microagent.disks.attachments import Attachment

BUNDLE_MAX_MIB = 2048  # larger data belongs on a volume or a --disk image
BUNDLE_RECIPE = "microagent-bundle-1"
_TAR = "application/vnd.oci.image.layer.v1.tar"  # the compression is found by magic


def archive_digest(path: Path) -> str:
    """The sha256 of the file at ``path``."""
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def bundle_key(item: Attachment, digest: str) -> str:
    """What determines the disk of the bundle ``item`` whose archive hashes to ``digest``."""
    text = "\n".join([BUNDLE_RECIPE, item.name, digest])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached_disk(directory: Path, item: Attachment, digest: str) -> Path:
    """Where the disk of ``item`` with the archive ``digest`` is kept in ``directory``."""
    return directory / item.name / f"{bundle_key(item, digest)}.ext4"


def build_bundle(item: Attachment, dest: Path, *, work_dir: Path) -> None:
    """Build the ext4 disk of the bundle ``item`` at ``dest``, sized to fit.

    Raises NotFoundError (no archive), UsageError (not a tar), UnsafeImageError (an entry
    that escapes or nests too deep), DiskTooSmallError (past BUNDLE_MAX_MIB), HostError.
    """
    from microagent.disks.rootfs import build_root_disk
    from microagent.images.layers import ExtractLimitError, LayerFile

    source = Path(item.source)
    if not source.is_file():
        raise NotFoundError(f"bundle {item.name}: {source} does not exist")
    label = f"bundle {item.name} ({source})"
    try:
        build_root_disk([LayerFile(source, _TAR, str(source), label=label)], dest,
                        size_mib=None, max_mib=BUNDLE_MAX_MIB, work_dir=work_dir,
                        label=item.name[:16])
    except UnsafeImageError as e:
        reason = e.message.removesuffix("; the image is refused")
        raise UnsafeImageError(f"{reason}; the bundle is refused",
                               hint="nothing from the archive was used") from None
    except IntegrityError as e:
        raise UsageError(f"bundle {item.name}: {source} is not a readable tar archive "
                         f"(.tar, .tar.gz or .tgz): {e.message.removeprefix(label + ' ')}"
                         ) from None
    except ExtractLimitError as e:
        at = e.where.removeprefix(label).strip()
        raise DiskTooSmallError(
            f"bundle {item.name} ({source}) holds more than the {BUNDLE_MAX_MIB} MiB a "
            f"bundle can; extraction stopped{' ' if at else ''}{at}; the bundle is refused",
            hint="attach larger data as a volume (--volume) or an ext4 image (--disk)",
        ) from None


def ensure_bundle_disk(item: Attachment, directory: Path, *, work_dir: Path) -> Path:
    """The cached disk of the bundle ``item`` in ``directory``, built if its archive's
    content is new (the disks of its earlier contents are removed)."""
    source = Path(item.source)
    try:
        digest = archive_digest(source)
    except FileNotFoundError:
        raise NotFoundError(f"bundle {item.name}: {source} does not exist") from None
    except OSError as e:
        raise UsageError(f"bundle {item.name}: cannot read {source}: {e.strerror}") from e
    disk = cached_disk(directory, item, digest)
    if disk.is_file():
        return disk
    ensure_dir(disk.parent)
    sweep(disk.parent, ".", ".tmp")  # a build that was killed
    build_bundle(item, disk, work_dir=work_dir)
    try:
        changed = archive_digest(source) != digest
    except OSError:
        changed = True
    if changed:  # the disk may hold another content than its key says
        disk.unlink(missing_ok=True)
        raise RetryableError(f"bundle {item.name}: {source} changed while its disk was "
                             "being built", hint="try again once the archive is written")
    for old in disk.parent.glob("*.ext4"):
        if old != disk:
            old.unlink(missing_ok=True)
    return disk


class BuiltBundles:
    """The bundle disks ``create`` built while checking its flags, in a scratch directory
    under ``work_dir`` until :meth:`adopt` moves them into the new workspace; what is
    not adopted is removed when the ``with`` block ends."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.scratch: Staged | None = None  # tmp/bundle-*, swept if create is killed

    def build(self, item: Attachment) -> None:
        """Build the disk of ``item`` (refusing a bad archive, naming the entry)."""
        if self.scratch is None:
            self.scratch = stage_dir(self.work_dir, "bundle-")
        ensure_bundle_disk(item, self.scratch.path / "disks", work_dir=self.scratch.path)

    def adopt(self, directory: Path) -> None:
        """Move the built disks to ``directory`` (a workspace's ``bundles/``)."""
        if self.scratch is not None and (self.scratch.path / "disks").is_dir():
            (self.scratch.path / "disks").rename(directory)

    def discard(self) -> None:
        """Remove what was not adopted."""
        if self.scratch is not None:
            self.scratch.close()
            self.scratch = None

    def __enter__(self) -> BuiltBundles:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.discard()


def fresh_copy(cached: Path, dest: Path) -> Path:
    """This boot's copy of a rw bundle's cached disk (a reflink, else sparse)."""
    from microagent.disks.rootfs import copy_disk

    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    copy_disk(cached, dest)
    return dest
