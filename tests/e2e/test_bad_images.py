"""Bad images through `create`: refused with a clear error, nothing half-written."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import pytest
from ocilayout import OCI_CONFIG, OCI_MANIFEST, Blobs, ImageSpec, Layer, build_layout

from microagent.images.layers import LayerFile
from tests.e2e.conftest import microagent
from tests.support.distro import read_file
from tests.support.push import push_layout
from tests.support.registry import RunningRegistry
from tests.unit.test_image_trust import genuine_layout, poisoned_layout
from tests.unit.test_layer_bounds import zeros_layer


def leftovers(state_dir: Path) -> list[str]:
    """Anything a failed create might leave: workspace dirs, base disks, staging, temp."""
    found = []
    for sub in ("workspaces", "images/disks", "tmp"):
        directory = state_dir / sub
        if directory.is_dir():
            found += [str(p.relative_to(state_dir)) for p in directory.iterdir()]
    blobs = state_dir / "images" / "blobs" / "sha256"
    if blobs.is_dir():
        found += [p.name for p in blobs.iterdir() if p.name.startswith(".")]
    return found


def tar_with(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def entry(name: str, data: bytes = b"x", **fields: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def layout_of_layer(dest: Path, layer: LayerFile) -> Path:
    """An OCI layout of one image whose one layer is the blob ``layer`` (and its diff_id)."""
    blobs = Blobs(dest)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}).encode()
    blob = layer.path.read_bytes()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": blobs.put(config), "size": len(config)},
        "layers": [{"mediaType": layer.media_type, "digest": blobs.put(blob),
                    "size": len(blob)}]}).encode()
    top = {"mediaType": OCI_MANIFEST, "digest": blobs.put(manifest), "size": len(manifest),
           "annotations": {"org.opencontainers.image.ref.name": "latest"}}
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return dest


def push(registry: RunningRegistry, tmp_path: Path, name: str, layers: list[Layer]) -> str:
    layout = tmp_path / name
    build_layout(layout, [ImageSpec(layers=layers)])
    push_layout(registry.host, f"bad/{name}", "1", layout)
    return f"{registry.host}/bad/{name}:1"


@pytest.mark.parametrize(
    ("name", "members", "entry_name"),
    [
        ("dotdot", [entry("../../escape")], "../../escape"),
        ("absolute", [entry("/etc/evil")], "/etc/evil"),
        ("symlink", [entry("link", type=tarfile.SYMTYPE, linkname="/etc"),
                     entry("link/evil")], "link/evil"),
        ("hardlink", [entry("stolen", type=tarfile.LNKTYPE, linkname="../../etc/passwd")],
         "stolen"),
    ],
)
def test_malicious_layers_are_refused(registry: RunningRegistry, tmp_path: Path,
                                      state_dir: Path, name: str,
                                      members: list[tuple[tarfile.TarInfo, bytes]],
                                      entry_name: str) -> None:
    ref = push(registry, tmp_path, name, [Layer(tar_with(entry("ok", b"fine")), "none"),
                                          Layer(tar_with(*members))])
    result = microagent("create", "w", "--image", ref)
    assert result.returncode == 1, result.stderr
    assert entry_name in result.stderr
    assert leftovers(state_dir) == []
    assert not (tmp_path / "escape").exists()


def test_disk_too_small_says_how_much_is_needed(registry: RunningRegistry, tmp_path: Path,
                                                state_dir: Path) -> None:
    big = os.urandom(40 * 1024 * 1024)  # 40 MiB that does not compress away
    ref = push(registry, tmp_path, "big", [Layer(tar_with(entry("big.bin", big)), "none")])
    result = microagent("create", "w", "--image", ref, "--size-mib", "16")
    assert result.returncode == 1, result.stderr
    assert "needs at least" in result.stderr and "MiB" in result.stderr
    assert "--size-mib" in result.stderr
    assert leftovers(state_dir) == []
    ok = microagent("create", "w", "--image", ref, "--size-mib", "128")
    assert ok.returncode == 0, ok.stderr


def test_corrupt_layer_is_refused(registry: RunningRegistry, tmp_path: Path,
                                  state_dir: Path) -> None:
    whole = gzip.compress(tar_with(entry("file", os.urandom(200_000))))
    truncated = whole[: len(whole) // 2]
    # the digest is of the truncated bytes, so the registry and the cache accept the blob:
    # it is the layer itself that is broken
    layout = tmp_path / "corrupt"
    build_layout(layout, [ImageSpec(layers=[Layer(b"")])])
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest_path = blobs / index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(manifest_path.read_text())
    digest = "sha256:" + hashlib.sha256(truncated).hexdigest()
    (blobs / digest.split(":")[1]).write_bytes(truncated)
    manifest["layers"][0].update(digest=digest, size=len(truncated))
    data = json.dumps(manifest).encode()
    new_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / new_digest.split(":")[1]).write_bytes(data)
    index["manifests"][0].update(digest=new_digest, size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
    push_layout(registry.host, "bad/corrupt", "1", layout)

    result = microagent("create", "w", "--image", f"{registry.host}/bad/corrupt:1")
    assert result.returncode == 1, result.stderr
    assert digest[:19] in result.stderr or digest in result.stderr
    assert "corrupt" in result.stderr or "truncated" in result.stderr
    assert leftovers(state_dir) == []


def test_an_image_reusing_a_genuine_config_is_refused(registry: RunningRegistry,
                                                      tmp_path: Path, state_dir: Path) -> None:
    """Cache poisoning: the genuine image's config blob, byte for byte, with other layers."""
    genuine_src = genuine_layout(tmp_path / "genuine")
    push_layout(registry.host, "trust/genuine", "1", genuine_src)
    push_layout(registry.host, "trust/evil", "1",
                poisoned_layout(genuine_src, tmp_path / "evil"))
    genuine, evil = (f"{registry.host}/trust/{name}:1" for name in ("genuine", "evil"))

    refused = microagent("create", "w", "--image", evil, "--size-mib", "32")
    assert refused.returncode == 1, refused.stderr
    assert re.search(r"layer 1/1 sha256:[0-9a-f]{64} does not match the image config",
                     refused.stderr), refused.stderr
    assert leftovers(state_dir) == []
    listed = json.loads(microagent("--json", "image", "list").stdout)["images"]
    assert [i["reference"] for i in listed] == []

    created = microagent("create", "w", "--image", genuine, "--size-mib", "32")
    assert created.returncode == 0, created.stderr
    assert read_file(state_dir / "workspaces" / "w" / "rootfs.ext4", "/etc/motd") == \
        b"genuine\n"
    again = microagent("create", "w2", "--image", evil, "--size-mib", "32")
    assert again.returncode == 1 and "does not match the image config" in again.stderr


def test_a_bundle_bomb_is_refused_at_once(tmp_path: Path, state_dir: Path) -> None:
    """A 3 MB gzip that unpacks to 3 GiB of zeros: past the bundle cap at its header."""
    bomb = zeros_layer(tmp_path / "bomb.tar.gz", {"zeros": 3 << 30}).path
    assert bomb.stat().st_size < 8 << 20
    result = microagent("create", "w", "--image", "oci:/nonexistent", "--bundle",
                        f"b={bomb}:/data")
    assert result.returncode == 1, result.stderr
    assert f"bundle b ({bomb}) holds more than the 2048 MiB a bundle can" in result.stderr
    assert "extraction stopped at entry 'zeros'" in result.stderr
    assert leftovers(state_dir) == []


def test_a_zip_bomb_image_stops_at_the_disk_size(registry: RunningRegistry, tmp_path: Path,
                                                 state_dir: Path) -> None:
    """1 GiB of zeros in a 1 MB layer: nothing is written past the 64 MiB disk."""
    bomb = zeros_layer(tmp_path / "bomb.tar.gz", {"etc/motd": 1, "zeros": 1 << 30},
                       diff_id=True)
    layout = layout_of_layer(tmp_path / "bomb", bomb)
    push_layout(registry.host, "bad/bomb", "1", layout)

    result = microagent("create", "w", "--image", f"{registry.host}/bad/bomb:1",
                        "--size-mib", "64")
    assert result.returncode == 1, result.stderr
    assert "the image needs more than the disk's 64 MiB" in result.stderr, result.stderr
    assert f"layer 1/1 {bomb.digest} at entry 'zeros'" in result.stderr
    assert leftovers(state_dir) == []
