"""OCI and Docker manifests, indexes and image configs: parsing and platform choice.

Pure functions over bytes; no I/O. Accepted documents:

- OCI image manifest and Docker schema-2 manifest (one image: config + layers);
- OCI image index and Docker manifest list (several platforms): the host's platform is
  chosen, variants respected (``linux/arm/v7``), attestation entries skipped.

Docker schema 1 is refused with a clear message; it has been deprecated since 2017.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from microagent.errors import IntegrityError, NotFoundError, RegistryError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]``."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


def host_platform() -> Platform:
    """The platform of this host, named as OCI names it."""
    import platform as _platform

    machine = _platform.machine().lower()
    table = {
        "x86_64": Platform("linux", "amd64"),
        "amd64": Platform("linux", "amd64"),
        "aarch64": Platform("linux", "arm64", "v8"),
        "arm64": Platform("linux", "arm64", "v8"),
        "armv7l": Platform("linux", "arm", "v7"),
        "armv6l": Platform("linux", "arm", "v6"),
        "i686": Platform("linux", "386"),
        "riscv64": Platform("linux", "riscv64"),
        "ppc64le": Platform("linux", "ppc64le"),
        "s390x": Platform("linux", "s390x"),
    }
    return table.get(machine, Platform("linux", machine))


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about a blob."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageManifest:
    """One image: its config and layers, in order."""

    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config a workspace uses."""

    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    exposed_ports: tuple[str, ...] = ()
    platform: str = ""
    diff_ids: tuple[str, ...] = field(default=(), compare=False)

    def to_json(self) -> dict[str, Any]:
        """The record form kept with images and workspaces."""
        return {
            "env": list(self.env),
            "working_dir": self.working_dir,
            "user": self.user,
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "exposed_ports": list(self.exposed_ports),
            "platform": self.platform,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageConfig:
        """Inverse of :meth:`to_json`."""
        return cls(
            env=tuple(data.get("env", ())),
            working_dir=data.get("working_dir", ""),
            user=data.get("user", ""),
            entrypoint=tuple(data.get("entrypoint", ())),
            cmd=tuple(data.get("cmd", ())),
            exposed_ports=tuple(data.get("exposed_ports", ())),
            platform=data.get("platform", ""),
        )


def load_document(data: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object, or raise RegistryError naming ``what``."""
    try:
        document = json.loads(data)
    except ValueError as e:
        raise RegistryError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(document, dict):
        raise RegistryError(f"{what} is not a JSON object")
    return document


def media_type_of(data: bytes, served_type: str, what: str) -> str:
    """The document's media type: the served one unless it is generic."""
    document = load_document(data, what)
    declared = document.get("mediaType")
    if served_type in MANIFEST_TYPES + INDEX_TYPES + DOCKER_SCHEMA1:
        return served_type
    if isinstance(declared, str) and declared:
        return declared
    if document.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1[0]
    if "manifests" in document:
        return OCI_INDEX
    return OCI_MANIFEST


def is_index(media_type: str) -> bool:
    """True for OCI indexes and Docker manifest lists."""
    return media_type in INDEX_TYPES


def parse_descriptor(raw: Any, what: str) -> Descriptor:
    """Validate one descriptor object."""
    if not isinstance(raw, dict):
        raise RegistryError(f"{what}: a descriptor is not an object")
    try:
        media_type = str(raw["mediaType"])
        from microagent.images.blobs import check_digest  # hashlib: not for every command

        digest = check_digest(str(raw["digest"]))
        size = int(raw["size"])
    except (KeyError, TypeError, ValueError, IntegrityError) as e:
        raise RegistryError(f"{what}: malformed descriptor {raw!r}") from e
    if size < 0:
        raise RegistryError(f"{what}: negative size in descriptor {digest}")
    platform = None
    plat = raw.get("platform")
    if isinstance(plat, dict):
        platform = Platform(
            str(plat.get("os", "")), str(plat.get("architecture", "")),
            str(plat.get("variant", "") or ""),
        )
    return Descriptor(media_type, digest, size, platform, tuple(raw.get("urls") or ()))


def parse_manifest(data: bytes, media_type: str, what: str) -> ImageManifest:
    """Parse an image manifest (OCI or Docker schema 2)."""
    if media_type in DOCKER_SCHEMA1:
        raise RegistryError(
            f"{what} is a Docker schema 1 manifest, which microagent does not support",
            hint="push the image again with a current docker or buildah",
        )
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(f"{what} has unsupported media type {media_type!r}")
    document = load_document(data, what)
    if document.get("schemaVersion") != 2:
        raise RegistryError(f"{what} has schemaVersion {document.get('schemaVersion')!r}")
    config = parse_descriptor(document.get("config"), what)
    raw_layers = document.get("layers")
    if not isinstance(raw_layers, list):
        raise RegistryError(f"{what} has no layer list")
    layers = tuple(parse_descriptor(layer, what) for layer in raw_layers)
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise RegistryError(f"{what}: layer {layer.digest} has unsupported media type "
                                f"{layer.media_type!r}")
    return ImageManifest(config=config, layers=layers)


def choose_platform(data: bytes, what: str, want: Platform) -> Descriptor:
    """Pick the manifest for ``want`` from an index, or raise NotFoundError listing choices."""
    document = load_document(data, what)
    raw = document.get("manifests")
    if not isinstance(raw, list):
        raise RegistryError(f"{what} has no manifest list")
    candidates = [parse_descriptor(m, what) for m in raw]
    available = [d for d in candidates if d.platform and d.platform.os != "unknown"]
    matches = [
        d for d in available
        if d.platform and d.platform.os == want.os and d.platform.architecture == want.architecture
    ]
    if want.variant:
        exact = [d for d in matches if d.platform and d.platform.variant == want.variant]
        # arm64 images often omit the v8 variant; any arm64 entry is fine then
        loose = [d for d in matches if d.platform and not d.platform.variant]
        matches = exact or loose
    if not matches:
        listed = ", ".join(sorted({str(d.platform) for d in available})) or "none"
        raise NotFoundError(
            f"{what} has no image for {want} (it has: {listed})",
            hint="pick an image published for this host's platform",
        )
    return matches[0]


def parse_config(data: bytes, what: str) -> ImageConfig:
    """The workspace-relevant fields of an image config blob."""
    document = load_document(data, what)
    config = document.get("config") or {}
    if not isinstance(config, dict):
        raise RegistryError(f"{what}: 'config' is not an object")
    rootfs = document.get("rootfs") or {}
    diff_ids = tuple(rootfs.get("diff_ids") or ()) if isinstance(rootfs, dict) else ()
    plat = Platform(str(document.get("os", "")), str(document.get("architecture", "")),
                    str(document.get("variant", "") or ""))

    def strings(key: str) -> tuple[str, ...]:
        value = config.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise RegistryError(f"{what}: config {key} is not a list of strings")

    ports = config.get("ExposedPorts") or {}
    return ImageConfig(
        env=strings("Env"),
        working_dir=str(config.get("WorkingDir") or ""),
        user=str(config.get("User") or ""),
        entrypoint=strings("Entrypoint"),
        cmd=strings("Cmd"),
        exposed_ports=tuple(sorted(ports)) if isinstance(ports, dict) else (),
        platform=str(plat) if plat.os else "",
        diff_ids=diff_ids,
    )
