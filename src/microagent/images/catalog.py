"""Images: pull into the shared cache, list, remove, and their cached base root disks.

``pull_image`` resolves a reference (registry, OCI layout or docker archive) to one
platform's manifest, fetches the config and the layers into the
:class:`~microagent.images.blobs.BlobStore` (verified, in parallel) and records the reference in
``images/index.json``. ``ensure_base_disk`` builds the ext4 root disk of an image once per
size; workspaces copy it.

Trust: blobs are verified by digest as they enter the cache (:mod:`microagent.images.blobs`);
each layer's uncompressed content is verified against the config's ``rootfs.diff_ids``
while the base disk is built (:mod:`microagent.images.layers`). A base disk is cached under
:attr:`Image.disk_key` (the config digest and the layer digests) and a size, and written
only after a build that verified every layer: an image that reuses another's config with
other layers never gets, nor leaves, a disk under the other's key. An image refused while
its disk is built is forgotten (its record, and its blobs that no other image uses).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from microagent.errors import IntegrityError, NotFoundError
from microagent.images.blobs import BlobStore
from microagent.images.manifests import (
    ImageConfig,
    ImageManifest,
    Platform,
    choose_platform,
    host_platform,
    is_index,
    parse_config,
    parse_manifest,
)
from microagent.images.references import ImageSource, parse_image_source
from microagent.layout import StateLayout
from microagent.progress import NullProgress, Progress
from microagent.staging import sweep_abandoned
from microagent.store import file_lock, read_json, write_json_atomic

if TYPE_CHECKING:
    from microagent.images.sources import ImageReader, RawManifest

MAX_INDEX_DEPTH = 4
# Part of every base disk's key: disks built before layers were checked against the
# config's diff_ids (keyed by the config digest alone) are never reused.
ROOTFS_RECIPE = "microagent-rootfs-2"
PARALLEL_LAYERS = 3
LOCK_WAIT = 600.0  # another process may be pulling or building the same thing


@dataclass(frozen=True)
class Layer:
    """One layer blob of an image."""

    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class Image:
    """A pulled image as recorded in the index."""

    reference: str
    digest: str
    config_digest: str
    layers: tuple[Layer, ...]
    config: ImageConfig
    pulled: str

    @property
    def size(self) -> int:
        """Bytes of the layer blobs (compressed, as pulled)."""
        return sum(layer.size for layer in self.layers)

    @property
    def disk_key(self) -> str:
        """What the image's base disks are cached by: its config and layer digests."""
        text = "\n".join([ROOTFS_RECIPE, self.config_digest, *(x.digest for x in self.layers)])
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """The index record (also the ``--json`` shape)."""
        return {
            "reference": self.reference,
            "digest": self.digest,
            "config_digest": self.config_digest,
            "layers": [{"digest": x.digest, "media_type": x.media_type, "size": x.size}
                       for x in self.layers],
            "config": self.config.to_json(),
            "size": self.size,
            "pulled": self.pulled,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Image:
        """Inverse of :meth:`to_json`."""
        return cls(
            reference=data["reference"],
            digest=data["digest"],
            config_digest=data["config_digest"],
            layers=tuple(Layer(x["digest"], x["media_type"], x["size"]) for x in data["layers"]),
            config=ImageConfig.from_json(data["config"]),
            pulled=data["pulled"],
        )


def normalize(source: str | ImageSource) -> ImageSource:
    """Parse a reference given as text; pass parsed ones through."""
    return parse_image_source(source) if isinstance(source, str) else source


def pull_image(
    layout: StateLayout,
    source: str | ImageSource,
    *,
    progress: Progress | None = None,
    platform: Platform | None = None,
) -> Image:
    """Fetch an image into the cache (skipping blobs already there) and record it."""
    from microagent.images.sources import open_reader

    parsed = normalize(source)
    progress = progress or NullProgress()
    sweep_abandoned(layout)  # what a killed pull or build left behind (staging.py)
    store = BlobStore(layout)
    want = platform or host_platform()
    reader = open_reader(parsed, store)
    try:
        progress.step(f"Pulling {parsed}")
        top = _top_reference(parsed)
        raw = reader.manifest(top)
        digest = raw.digest
        manifest = _resolve_platform(reader, raw, str(parsed), want)
        config_bytes = _fetch_small(reader, store, manifest.config.digest, manifest.config.size)
        config = parse_config(config_bytes, f"config of {parsed}")
        check_diff_ids(config, len(manifest.layers), str(parsed))
        _fetch_layers(reader, store, manifest, progress)
    finally:
        reader.close()
    image = Image(
        reference=str(parsed),
        digest=digest,
        config_digest=manifest.config.digest,
        layers=tuple(Layer(x.digest, x.media_type, x.size) for x in manifest.layers),
        config=config,
        pulled=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    with _index(layout) as index:
        index[image.reference] = image.to_json()
    progress.step(f"Digest: {digest}")
    return image


def check_diff_ids(config: ImageConfig, layers: int, what: str) -> None:
    """One diff_id per layer, as the OCI image spec requires: the layers are checked
    against them when the disk is built."""
    if len(config.diff_ids) != layers:
        raise IntegrityError(
            f"{what}: the manifest lists {layers} layers but the config has "
            f"{len(config.diff_ids)} diff_ids; the image is refused",
            hint="the image is malformed: its config does not describe its layers")


def _top_reference(source: ImageSource) -> str:
    from microagent.images.references import ImageReference

    if isinstance(source, ImageReference):
        return source.reference
    return source.tag or "latest"


def _resolve_platform(reader: ImageReader, raw: RawManifest, what: str,
                      want: Platform) -> ImageManifest:
    for _ in range(MAX_INDEX_DEPTH):
        if not is_index(raw.media_type):
            return parse_manifest(raw.data, raw.media_type, f"manifest of {what}")
        chosen = choose_platform(raw.data, f"image index of {what}", want)
        raw = reader.manifest(chosen.digest)
        if raw.digest != chosen.digest:
            raise IntegrityError(f"digest mismatch for manifest {chosen.digest} of {what}")
    raise IntegrityError(f"{what}: image indexes nested deeper than {MAX_INDEX_DEPTH}")


def _fetch_small(reader: ImageReader, store: BlobStore, digest: str, size: int) -> bytes:
    if not store.has(digest):
        reader.blob(digest, size, store, None)
    return store.read_bytes(digest)


def _fetch_layers(reader: ImageReader, store: BlobStore, manifest: ImageManifest,
                  progress: Progress) -> None:
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    stop = threading.Event()  # the pull failed or was interrupted: the others stop too

    def fetch(index: int) -> None:
        layer = manifest.layers[index]
        key = layer.digest
        label = f"layer {index + 1}/{len(manifest.layers)} {layer.digest[7:19]}"
        progress.item_started(key, label, layer.size)
        if store.has(layer.digest):
            progress.item_done(key, "already cached")
            return

        def advanced(count: int) -> None:
            if stop.is_set():
                raise _Abandoned  # at the next chunk; the blob's staging goes with it
            progress.item_advanced(key, count)

        reader.blob(layer.digest, layer.size, store, advanced)
        progress.item_done(key, "pulled")

    pool = ThreadPoolExecutor(max_workers=PARALLEL_LAYERS)
    try:
        futures = [pool.submit(fetch, i) for i in range(len(manifest.layers))]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future.done():
                future.result()  # the first failure, in layer order
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Abandoned(BaseException):
    """A layer download stopped because the pull as a whole failed or was interrupted
    (a BaseException, so that no retry loop takes it for a network error)."""


def ensure_image(layout: StateLayout, source: str | ImageSource, *,
                 progress: Progress | None = None) -> Image:
    """The recorded image for ``source`` if its blobs are cached, else pull it."""
    parsed = normalize(source)
    image = find_image(layout, parsed)
    if image is not None:
        store = BlobStore(layout)
        blobs = [image.config_digest, *(x.digest for x in image.layers)]
        if all(store.has(d) for d in blobs):
            return image
    return pull_image(layout, parsed, progress=progress)


def find_image(layout: StateLayout, source: str | ImageSource) -> Image | None:
    """The index record for ``source``, or None when it was never pulled."""
    data = _read_index(layout).get(str(normalize(source)))
    return Image.from_json(data) if data else None


def list_images(layout: StateLayout) -> list[Image]:
    """Every recorded image, by reference."""
    return [Image.from_json(v) for _, v in sorted(_read_index(layout).items())]


def remove_image(layout: StateLayout, source: str | ImageSource) -> Image:
    """Forget a reference and delete the blobs and base disks nothing else uses."""
    key = str(normalize(source))
    with _index(layout) as index:
        if key not in index:
            raise NotFoundError(f"image {key} not found in the local cache",
                                hint="`microagent image list` shows what is cached")
        image = Image.from_json(index.pop(key))
        _collect(layout, image, [Image.from_json(v) for v in index.values()])
    return image


def _collect(layout: StateLayout, image: Image, remaining: list[Image]) -> None:
    """Delete the blobs and base disks of ``image`` that no ``remaining`` image uses."""
    used = {d for other in remaining
            for d in (other.digest, other.config_digest, *(x.digest for x in other.layers))}
    store = BlobStore(layout)
    for digest in (image.digest, image.config_digest, *(x.digest for x in image.layers)):
        if digest not in used:
            store.remove(digest)
    if not layout.base_disks_dir.is_dir():
        return
    prefixes = []
    if image.disk_key not in {o.disk_key for o in remaining}:
        prefixes.append(image.disk_key.split(":", 1)[1])
    if image.config_digest not in {o.config_digest for o in remaining}:
        prefixes.append(image.config_digest.split(":", 1)[1])  # disks of older versions
    for prefix in prefixes:
        for disk in layout.base_disks_dir.glob(f"{prefix}-*.ext4"):
            disk.unlink(missing_ok=True)


def forget_refused(layout: StateLayout, image: Image) -> None:
    """Drop the record of an image refused while its disk was built, and its blobs that
    no other image uses: nothing of it stays cached (unless it was pulled again since)."""
    with _index(layout) as index:
        record = index.get(image.reference)
        if record is None or record.get("digest") != image.digest:
            return
        del index[image.reference]
        _collect(layout, image, [Image.from_json(v) for v in index.values()])


def _read_index(layout: StateLayout) -> dict[str, Any]:
    try:
        document = read_json(layout.image_index)
    except FileNotFoundError:
        return {}
    images = document.get("images", {})
    return images if isinstance(images, dict) else {}


@contextlib.contextmanager
def _index(layout: StateLayout) -> Iterator[dict[str, Any]]:
    """The index, locked for a read-modify-write; written back when the block succeeds."""
    with file_lock(layout.lock_file("images", "index"), what="the image index", timeout=60):
        images = _read_index(layout)
        yield images
        write_json_atomic(layout.image_index, {"images": images})
