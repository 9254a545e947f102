"""Small test images built from files, and ``docker save``-style archives."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from ocilayout import ImageSpec, Layer, build_layout


def layer_of(files: dict[str, bytes], *, mode: int = 0o644) -> bytes:
    """An uncompressed tar layer holding ``files`` (parent directories implied)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def simple_layout(dest: Path, *, tag: str = "latest", files: dict[str, bytes] | None = None,
                  compression: str = "gzip", **config: object) -> Path:
    """An OCI layout with one small layer (plus any ImageSpec fields in ``config``)."""
    layer = Layer(layer_of(files or {"etc/hello": b"hello\n"}), compression)
    build_layout(dest, [ImageSpec(layers=[layer], **config)], tag=tag)  # type: ignore[arg-type]
    return dest


def docker_archive(dest: Path, layers: list[bytes], *, repo_tag: str = "test/app:latest",
                   config: dict[str, object] | None = None) -> Path:
    """A legacy ``docker save`` archive: manifest.json, <id>.json, <id>/layer.tar."""
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    config_doc = {"architecture": "amd64", "os": "linux",
                  "config": config or {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
                  "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_bytes = json.dumps(config_doc).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    members: dict[str, bytes] = {config_name: config_bytes}
    layer_names = []
    for i, layer in enumerate(layers):
        name = f"{i:064x}/layer.tar"
        members[name] = layer
        layer_names.append(name)
    manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]
    members["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(dest, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest
