"""Base root disks: the ext4 disk of an image at one size, built once and cached in
``images/disks/`` (keyed by :attr:`~microagent.images.catalog.Image.disk_key` and the
size); every workspace of that image starts from a copy (``rootfs.copy_disk``)."""

from __future__ import annotations

from pathlib import Path

from microagent.disks.rootfs import build_root_disk
from microagent.errors import IntegrityError
from microagent.images.blobs import BlobStore
from microagent.images.catalog import LOCK_WAIT, Image, check_diff_ids, forget_refused
from microagent.images.layers import LayerFile
from microagent.images.manifests import parse_config
from microagent.layout import StateLayout
from microagent.progress import NullProgress, Progress
from microagent.store import ensure_dir, file_lock


def ensure_base_disk(layout: StateLayout, image: Image, size_mib: int, *,
                     progress: Progress | None = None) -> Path:
    """The image's base root disk at ``size_mib``, built once and cached.

    Each layer is checked against the config's diff_id while it is applied; an image that
    fails (IntegrityError) is forgotten and nothing is cached.
    """

    progress = progress or NullProgress()
    path = layout.base_disk(image.disk_key, size_mib)
    lock = layout.lock_file("basedisk", path.stem)
    with file_lock(lock, what=f"base disk of {image.reference}", timeout=LOCK_WAIT):
        if path.is_file():
            return path
        store = BlobStore(layout)
        # the config blob, not the index record: the cache verified it by its digest
        config = parse_config(store.read_bytes(image.config_digest),
                              f"config of {image.reference}")
        try:
            check_diff_ids(config, len(image.layers), image.reference)
            layers = [LayerFile(store.path(x.digest), x.media_type, x.digest, diff_id)
                      for x, diff_id in zip(image.layers, config.diff_ids, strict=True)]
            ensure_dir(path.parent)
            progress.step(f"Building root disk of {image.reference} ({size_mib} MiB)")
            build_root_disk(layers, path, size_mib=size_mib,
                            work_dir=ensure_dir(layout.tmp_dir), on_step=progress.step)
        except IntegrityError:
            forget_refused(layout, image)
            raise
    return path
