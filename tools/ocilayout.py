"""Build OCI image layouts from directories and tar layers (a development tool).

Used by the tests, the benches and ``install.sh``'s offline demo: they need real images
without reaching docker.io. Nothing here is part of the microagent package.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_directory(root: Path, *, owner: tuple[int, int] | None = (0, 0)) -> bytes:
    """A tar of ``root``'s contents (names relative, sorted), owned by ``owner``.

    ``owner=None`` keeps the owners on disk (for a tree made by root, e.g. debootstrap).
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                full = Path(dirpath) / name
                arcname = str(full.relative_to(root))
                info = tar.gettarinfo(str(full), arcname)
                if owner is not None:
                    info.uid, info.gid = owner
                    info.uname = info.gname = "root" if owner == (0, 0) else ""
                if info.isreg():
                    with full.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return buf.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "none":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        import zstandard

        return bytes(zstandard.ZstdCompressor(level=3).compress(data))
    raise ValueError(compression)


@dataclass
class Layer:
    """One layer: an uncompressed tar and how to compress it."""

    tar: bytes
    compression: str = "gzip"


@dataclass
class ImageSpec:
    """What goes into an image's config."""

    layers: Sequence[Layer]
    env: list[str] = field(default_factory=lambda: [DEFAULT_PATH])
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    working_dir: str = ""
    user: str = ""
    exposed_ports: dict[str, Any] | None = None
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None


class Blobs:
    """A blob directory writer (``blobs/sha256/<hex>``)."""

    def __init__(self, layout: Path) -> None:
        self.dir = layout / "blobs" / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> str:
        digest = sha256(data)
        path = self.dir / digest.split(":")[1]
        if not path.exists():
            path.write_bytes(data)
        return digest


def _descriptor(media_type: str, data: bytes, digest: str, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}


def write_image(blobs: Blobs, spec: ImageSpec) -> dict[str, Any]:
    """Write the layers, config and manifest of one image; return its descriptor."""
    layer_descs = []
    diff_ids = []
    for layer in spec.layers:
        data = compress(layer.tar, layer.compression)
        layer_descs.append(_descriptor(LAYER_TYPES[layer.compression], data, blobs.put(data)))
        diff_ids.append(sha256(layer.tar))
    config: dict[str, Any] = {"Env": spec.env}
    if spec.cmd is not None:
        config["Cmd"] = spec.cmd
    if spec.entrypoint is not None:
        config["Entrypoint"] = spec.entrypoint
    if spec.working_dir:
        config["WorkingDir"] = spec.working_dir
    if spec.user:
        config["User"] = spec.user
    if spec.exposed_ports:
        config["ExposedPorts"] = spec.exposed_ports
    platform: dict[str, Any] = {"os": spec.os, "architecture": spec.architecture}
    if spec.variant:
        platform["variant"] = spec.variant
    config_doc = {
        **platform,
        "created": "2026-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "microagent tests"} for _ in spec.layers],
    }
    config_bytes = json.dumps(config_doc, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _descriptor(OCI_CONFIG, config_bytes, blobs.put(config_bytes)),
        "layers": layer_descs,
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    return _descriptor(OCI_MANIFEST, manifest_bytes, blobs.put(manifest_bytes), platform=platform)


def build_layout(dest: Path, images: Iterable[ImageSpec], *, tag: str = "latest",
                 as_index: bool = False) -> dict[str, Any]:
    """Write an OCI image layout at ``dest`` holding ``images`` under ``tag``.

    One image and ``as_index=False``: ``index.json`` points at its manifest. Otherwise a
    nested image index (a multi-platform image) is written and tagged. Returns the
    top descriptor (manifest or index).
    """
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    blobs = Blobs(dest)
    descriptors = [write_image(blobs, spec) for spec in images]
    if len(descriptors) == 1 and not as_index:
        top = dict(descriptors[0])
    else:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        index_bytes = json.dumps(index, sort_keys=True).encode()
        top = _descriptor(OCI_INDEX, index_bytes, blobs.put(index_bytes))
    top.pop("platform", None)
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (dest / "index.json").write_text(json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]}))
    return top


def read_layout(layout: Path, tag: str = "latest") -> tuple[dict[str, Any], dict[Path, bytes]]:
    """The tagged top descriptor of a layout and all its blobs (for pushing)."""
    index = json.loads((layout / "index.json").read_text())
    top = next(m for m in index["manifests"]
               if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    blobs = {p: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}
    return top, blobs


def busybox_tree(root: Path, busybox: Path = Path("/bin/busybox")) -> Path:
    """A minimal root tree around busybox-static: applet links, /etc files, empty dirs."""
    import subprocess

    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys",
              "dev", "run", "var/log", "home"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "root", 0o700)
    target = root / "bin" / "busybox"
    target.write_bytes(busybox.read_bytes())
    target.chmod(0o755)
    applets = subprocess.run([str(busybox), "--list-full"], check=True, capture_output=True,
                             text=True).stdout.split()
    for applet in applets:
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, link.parent))
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (root / "etc" / "hostname").write_text("busybox\n")
    return root
