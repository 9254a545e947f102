"""Cache poisoning: an image that reuses another image's config blob with its own layers.

Base disks used to be cached by the config digest alone and the config's diff_ids were
never checked, so such an image's disk became the disk of every later workspace of the
genuine image in that state directory. Images come from OCI layouts (tools/ocilayout.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from ocilayout import ImageSpec, Layer, build_layout

from microagent.disks.basedisks import ensure_base_disk
from microagent.errors import IntegrityError
from microagent.images.blobs import BlobStore
from microagent.images.catalog import (
    find_image,
    list_images,
    pull_image,
    remove_image,
)
from microagent.layout import StateLayout
from tests.support.distro import read_file
from tests.support.images import layer_of

pytestmark = pytest.mark.skipif(shutil.which("debugfs", path="/usr/sbin:/sbin:/usr/bin")
                                is None, reason="e2fsprogs is not installed")
SIZE = 32


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_of(layout: Path) -> tuple[dict[str, object], Path]:
    blobs = layout / "blobs" / "sha256"
    top = json.loads((layout / "index.json").read_text())["manifests"][0]
    return json.loads((blobs / top["digest"].split(":")[1]).read_text()), blobs


def genuine_layout(dest: Path) -> Path:
    build_layout(dest, [ImageSpec(layers=[Layer(layer_of({"etc/motd": b"genuine\n"}))])])
    return dest


def poisoned_layout(genuine: Path, dest: Path, *, config: bytes | None = None) -> Path:
    """An image with its own layer and ``config`` (default: the genuine image's config
    blob, byte for byte)."""
    build_layout(dest, [ImageSpec(layers=[Layer(layer_of({"etc/motd": b"evil\n"}))])])
    manifest, blobs = manifest_of(dest)
    if config is None:
        genuine_manifest, genuine_blobs = manifest_of(genuine)
        descriptor = genuine_manifest["config"]
        digest = descriptor["digest"].split(":")[1]  # type: ignore[index]
        config = (genuine_blobs / digest).read_bytes()
    (blobs / sha256(config).split(":")[1]).write_bytes(config)
    manifest["config"] = {**manifest["config"], "digest": sha256(config),  # type: ignore[dict-item]
                          "size": len(config)}
    data = json.dumps(manifest).encode()
    (blobs / sha256(data).split(":")[1]).write_bytes(data)
    index = json.loads((dest / "index.json").read_text())
    index["manifests"][0].update(digest=sha256(data), size=len(data))
    (dest / "index.json").write_text(json.dumps(index))
    return dest


def cached_disks(layout: StateLayout) -> list[str]:
    directory = layout.base_disks_dir
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def test_a_poisoned_image_is_refused_and_the_genuine_one_gets_its_own_disk(
    layout: StateLayout, tmp_path: Path
) -> None:
    genuine_src = genuine_layout(tmp_path / "genuine")
    evil_src = poisoned_layout(genuine_src, tmp_path / "evil")
    evil = pull_image(layout, f"oci:{evil_src}")
    genuine = pull_image(layout, f"oci:{genuine_src}")
    assert evil.config_digest == genuine.config_digest

    with pytest.raises(IntegrityError) as info:
        ensure_base_disk(layout, evil, SIZE)
    message = info.value.message
    layer = evil.layers[0].digest
    assert f"layer 1/1 {layer} does not match the image config" in message
    assert info.value.exit_code == 1 and info.value.kind == "integrity"
    # nothing cached: no disk, no staging, the image and its own layer forgotten
    assert cached_disks(layout) == []
    assert not any(layout.tmp_dir.iterdir())
    assert find_image(layout, evil.reference) is None
    assert not BlobStore(layout).has(layer)
    assert BlobStore(layout).has(genuine.config_digest)  # the genuine image still uses it

    disk = ensure_base_disk(layout, genuine, SIZE)
    assert read_file(disk, "/etc/motd") == b"genuine\n"
    assert [i.reference for i in list_images(layout)] == [genuine.reference]


def test_a_poisoned_image_never_gets_the_genuine_disk(layout: StateLayout,
                                                      tmp_path: Path) -> None:
    genuine_src = genuine_layout(tmp_path / "genuine")
    genuine = pull_image(layout, f"oci:{genuine_src}")
    disk = ensure_base_disk(layout, genuine, SIZE)
    evil = pull_image(layout, f"oci:{poisoned_layout(genuine_src, tmp_path / 'evil')}")
    with pytest.raises(IntegrityError, match="does not match the image config"):
        ensure_base_disk(layout, evil, SIZE)
    assert cached_disks(layout) == [disk.name]
    assert read_file(disk, "/etc/motd") == b"genuine\n"


def test_disks_keyed_by_the_config_alone_are_not_reused(layout: StateLayout,
                                                        tmp_path: Path) -> None:
    """A disk an older microagent cached under the config digest may be poisoned."""
    genuine = pull_image(layout, f"oci:{genuine_layout(tmp_path / 'genuine')}")
    old = layout.base_disks_dir / f"{genuine.config_digest.split(':')[1]}-{SIZE}m.ext4"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"a disk built without checking the layers")
    disk = ensure_base_disk(layout, genuine, SIZE)
    assert disk != old and read_file(disk, "/etc/motd") == b"genuine\n"
    remove_image(layout, genuine.reference)
    assert cached_disks(layout) == []  # the old one is collected too


def test_the_disk_key_covers_the_config_and_every_layer(layout: StateLayout,
                                                        tmp_path: Path) -> None:
    genuine_src = genuine_layout(tmp_path / "genuine")
    genuine = pull_image(layout, f"oci:{genuine_src}")
    again = pull_image(layout, f"oci:{genuine_src}")
    evil = pull_image(layout, f"oci:{poisoned_layout(genuine_src, tmp_path / 'evil')}")
    assert genuine.disk_key == again.disk_key
    assert evil.config_digest == genuine.config_digest and evil.disk_key != genuine.disk_key


@pytest.mark.parametrize("diff_ids", [[], ["sha256:" + "0" * 64] * 2])
def test_a_config_that_does_not_describe_the_layers_is_refused(
    layout: StateLayout, tmp_path: Path, diff_ids: list[str]
) -> None:
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    src = poisoned_layout(tmp_path / "none", tmp_path / "bad", config=config)
    with pytest.raises(IntegrityError, match=f"the config has {len(diff_ids)} diff_ids"):
        pull_image(layout, f"oci:{src}")
    assert list_images(layout) == []
