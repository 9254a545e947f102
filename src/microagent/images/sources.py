"""Where image content comes from: a registry, an OCI layout directory, a docker archive.

Each source is an :class:`ImageReader`: it serves manifests by tag or digest and copies
blobs into the :class:`~microagent.images.blobs.BlobStore`, which verifies every byte against its
digest. The pull logic in :mod:`microagent.images.catalog` does not care which source it reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from microagent.errors import IntegrityError, MicroagentError, NotFoundError, UsageError
from microagent.images.blobs import BlobStore, ProgressCallback, check_digest
from microagent.images.manifests import OCI_CONFIG_TYPE, OCI_MANIFEST, media_type_of
from microagent.images.references import ImageReference, LocalImageSource

if TYPE_CHECKING:
    from microagent.images.registry import RegistryClient

_REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class RawManifest:
    """A manifest or index as served, with its media type and verified digest."""

    data: bytes
    media_type: str
    digest: str


class ImageReader(Protocol):
    """A source of manifests and blobs for one image name."""

    def manifest(self, reference: str) -> RawManifest:
        """The manifest or index for a tag or a digest."""

    def blob(self, digest: str, size: int | None, store: BlobStore,
             on_progress: ProgressCallback | None) -> Path:
        """Copy the blob into ``store`` (verified) and return its cached path."""

    def close(self) -> None:
        """Release connections and files."""


class RegistryReader:
    """An image name in a registry, through the distribution API."""

    def __init__(self, ref: ImageReference) -> None:
        from microagent.images.credentials import load_credentials
        from microagent.images.registry import RegistryClient

        self.ref = ref
        self.client: RegistryClient = RegistryClient(
            ref.api_host, plain_http=ref.plain_http, credentials=load_credentials(ref.domain)
        )

    def manifest(self, reference: str) -> RawManifest:
        try:
            fetched = self.client.get_manifest(self.ref.path, reference)
        except NotFoundError as e:
            raise NotFoundError(
                f"image {self.ref} not found: {e.message}",
                hint=e.hint or "check the name and tag, and that you can pull it",
            ) from e
        return RawManifest(fetched.data, fetched.media_type, fetched.digest)

    def blob(self, digest: str, size: int | None, store: BlobStore,
             on_progress: ProgressCallback | None) -> Path:
        return self.client.fetch_blob(self.ref.path, digest, size=size, store=store,
                                      on_progress=on_progress, source=self.ref.domain)

    def close(self) -> None:
        self.client.close()


class OciLayoutReader:
    """An OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``)."""

    def __init__(self, source: LocalImageSource) -> None:
        self.source = source
        self.root = source.path
        if not (self.root / "oci-layout").is_file() or not (self.root / "index.json").is_file():
            raise NotFoundError(
                f"image {source} not found: {self.root} is not an OCI image layout "
                "(no oci-layout and index.json)",
            )

    def _blob_path(self, digest: str) -> Path:
        algorithm, _, hexdigest = check_digest(digest).partition(":")
        return self.root / "blobs" / algorithm / hexdigest

    def _read_blob(self, digest: str) -> bytes:
        try:
            data = self._blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{self.source}: blob {digest} is missing from the layout") \
                from None
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"digest mismatch for blob {digest} in {self.source}")
        return data

    def manifest(self, reference: str) -> RawManifest:
        if reference.startswith("sha256:"):
            data = self._read_blob(reference)
            return RawManifest(data, media_type_of(data, "", str(self.source)), reference)
        index = _load_json(self.root / "index.json", str(self.source))
        entries = index.get("manifests") or []
        tagged = [m for m in entries if (m.get("annotations") or {}).get(_REF_NAME) == reference]
        if not tagged and self.source.tag is None and len(entries) == 1:
            tagged = entries
        if not tagged:
            names = sorted({(m.get("annotations") or {}).get(_REF_NAME, "") for m in entries})
            raise NotFoundError(
                f"image {self.source} not found: no tag {reference!r} in the layout",
                hint=f"tags in the layout: {', '.join(n for n in names if n) or 'none'}",
            )
        digest = str(tagged[0].get("digest", ""))
        data = self._read_blob(digest)
        served = str(tagged[0].get("mediaType", ""))
        return RawManifest(data, media_type_of(data, served, str(self.source)), digest)

    def blob(self, digest: str, size: int | None, store: BlobStore,
             on_progress: ProgressCallback | None) -> Path:
        if store.has(digest):
            return store.path(digest)
        path = self._blob_path(digest)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise IntegrityError(f"{self.source}: blob {digest} is missing from the layout") \
                from None
        with f:
            return store.ingest(digest, iter(lambda: f.read(1 << 20), b""), size=size,
                                source=str(self.source), on_progress=on_progress)

    def close(self) -> None:
        pass


class DockerArchiveReader:
    """A ``docker save`` archive: ``manifest.json``, a config and layer tars.

    The archive has no distribution manifest, so one is synthesised (an OCI manifest over
    the archive's config and layers); its digest is the image's digest here.
    """

    def __init__(self, source: LocalImageSource, store: BlobStore) -> None:
        self.source = source
        self.store = store
        self.synthesised: RawManifest | None = None

    def manifest(self, reference: str) -> RawManifest:
        if self.synthesised is None:
            self.synthesised = self._import()
        if reference.startswith("sha256:") and reference != self.synthesised.digest:
            raise NotFoundError(f"image {self.source} not found: no manifest {reference}")
        return self.synthesised

    def blob(self, digest: str, size: int | None, store: BlobStore,
             on_progress: ProgressCallback | None) -> Path:
        if not store.has(digest):
            raise IntegrityError(f"{self.source}: blob {digest} was not imported")
        if on_progress is not None and size:
            on_progress(size)
        return store.path(digest)

    def close(self) -> None:
        pass

    def _import(self) -> RawManifest:
        try:
            archive = tarfile.open(self.source.path, "r:*")  # noqa: SIM115 closed below
        except FileNotFoundError:
            raise NotFoundError(f"image {self.source} not found: no such file") from None
        except (OSError, tarfile.TarError) as e:
            raise IntegrityError(f"{self.source} is not a readable tar archive: {e}") from e
        with archive:
            try:
                entries = json.loads(_member_bytes(archive, "manifest.json", self.source))
            except ValueError as e:
                raise IntegrityError(f"{self.source}: manifest.json is not valid JSON") from e
            entry = self._choose(entries)
            config_bytes = _member_bytes(archive, str(entry["Config"]), self.source)
            config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
            self.store.ingest(config_digest, [config_bytes], size=len(config_bytes))
            diff_ids = (json.loads(config_bytes).get("rootfs") or {}).get("diff_ids") or []
            layers = []
            for i, name in enumerate(entry.get("Layers") or []):
                member = _member(archive, str(name), self.source)
                with _extracted(archive, member, self.source) as f:
                    digest = self.store.ingest_computed(_chunks(f), source=str(self.source))
                if i < len(diff_ids) and _is_plain_tar(self.store.path(digest)) \
                        and digest != diff_ids[i]:
                    self.store.remove(digest)
                    raise IntegrityError(
                        f"digest mismatch for layer {name} in {self.source}: it hashes to "
                        f"{digest}, the image config says {diff_ids[i]}"
                    )
                layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                               "digest": digest, "size": member.size})
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG_TYPE, "digest": config_digest,
                       "size": len(config_bytes)},
            "layers": layers,
        }
        data = json.dumps(manifest, sort_keys=True).encode()
        return RawManifest(data, OCI_MANIFEST, "sha256:" + hashlib.sha256(data).hexdigest())

    def _choose(self, entries: Any) -> dict[str, Any]:
        if not isinstance(entries, list) or not entries:
            raise IntegrityError(f"{self.source}: manifest.json lists no image")
        if self.source.tag is None:
            if len(entries) > 1:
                raise UsageError(f"{self.source} holds {len(entries)} images; name one with "
                                 f"docker-archive:PATH:REPO:TAG")
            return dict(entries[0])
        for entry in entries:
            tags = entry.get("RepoTags") or []
            if any(t == self.source.tag or t.endswith(f":{self.source.tag}") for t in tags):
                return dict(entry)
        raise NotFoundError(f"image {self.source} not found: no such tag in the archive")


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{what}: cannot read {path.name}: {e}") from e
    if not isinstance(document, dict):
        raise IntegrityError(f"{what}: {path.name} is not a JSON object")
    return document


def _member(archive: tarfile.TarFile, name: str, source: LocalImageSource) -> tarfile.TarInfo:
    try:
        member = archive.getmember(name)
    except KeyError:
        raise IntegrityError(f"{source}: {name} is missing from the archive") from None
    # docker writes layer.tar as a symlink to a shared layer in some versions
    while member.issym() or member.islnk():
        target = member.linkname if member.islnk() else \
            str(Path(name).parent / member.linkname)
        try:
            member = archive.getmember(target)
        except KeyError:
            raise IntegrityError(f"{source}: {name} links to missing {target}") from None
    if not member.isfile():
        raise IntegrityError(f"{source}: {name} is not a file")
    return member


@contextlib.contextmanager
def _extracted(archive: tarfile.TarFile, member: tarfile.TarInfo,
               source: LocalImageSource) -> Iterator[IO[bytes]]:
    f = archive.extractfile(member)
    if f is None:
        raise IntegrityError(f"{source}: cannot read {member.name}")
    try:
        yield f
    except (OSError, tarfile.TarError, EOFError) as e:
        raise IntegrityError(f"{source}: {member.name} is truncated or corrupt: {e}") from e
    finally:
        f.close()


def _member_bytes(archive: tarfile.TarFile, name: str, source: LocalImageSource) -> bytes:
    member = _member(archive, name, source)
    with _extracted(archive, member, source) as f:
        return f.read()


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(1 << 20):
        yield chunk


def _is_plain_tar(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4)
    return not (head.startswith(b"\x1f\x8b") or head == b"\x28\xb5\x2f\xfd")


def open_reader(source: ImageReference | LocalImageSource, store: BlobStore) -> ImageReader:
    """The reader for a parsed image source."""
    if isinstance(source, ImageReference):
        return RegistryReader(source)
    if source.kind == "oci":
        return OciLayoutReader(source)
    if source.kind == "docker-archive":
        return DockerArchiveReader(source, store)
    raise MicroagentError(f"unknown image source kind {source.kind!r}")
