"""Pulling from local sources (OCI layout, docker archive), the index, list and rm."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from ocilayout import ImageSpec, Layer, build_layout

from microagent.errors import IntegrityError, NotFoundError, RegistryError
from microagent.images.blobs import BlobStore
from microagent.images.catalog import find_image, list_images, pull_image, remove_image
from microagent.images.manifests import Platform
from microagent.layout import StateLayout
from tests.support.images import docker_archive, layer_of, simple_layout


def leftovers(layout: StateLayout) -> list[str]:
    blobs = layout.blobs_dir
    return [p.name for p in blobs.iterdir() if p.name.startswith(".")] if blobs.is_dir() else []


def test_pull_from_oci_layout_records_config(layout: StateLayout, tmp_path: Path) -> None:
    src = simple_layout(tmp_path / "img", tag="v1", cmd=["/bin/sh"], working_dir="/srv",
                        user="1000:1000", exposed_ports={"8080/tcp": {}},
                        env=["PATH=/bin", "A=b"])
    image = pull_image(layout, f"oci:{src}:v1")
    assert image.reference == f"oci:{src}:v1"
    cfg = image.config
    assert (cfg.cmd, cfg.working_dir, cfg.user, cfg.exposed_ports, cfg.env) == (
        ("/bin/sh",), "/srv", "1000:1000", ("8080/tcp",), ("PATH=/bin", "A=b"))
    store = BlobStore(layout)
    assert all(store.has(x.digest) for x in image.layers)
    assert store.has(image.config_digest)
    assert find_image(layout, f"oci:{src}:v1") == image
    assert [i.reference for i in list_images(layout)] == [image.reference]


def test_unknown_tag_in_layout_is_not_found(layout: StateLayout, tmp_path: Path) -> None:
    src = simple_layout(tmp_path / "img", tag="v1")
    with pytest.raises(NotFoundError, match="not found") as info:
        pull_image(layout, f"oci:{src}:v2")
    assert f"oci:{src}:v2" in info.value.message
    assert "v1" in info.value.hint
    assert not layout.image_index.exists()


def test_platform_is_chosen_from_an_index(layout: StateLayout, tmp_path: Path) -> None:
    arm = ImageSpec(layers=[Layer(layer_of({"arch": b"arm64"}))], architecture="arm64",
                    variant="v8")
    amd = ImageSpec(layers=[Layer(layer_of({"arch": b"amd64"}))], architecture="amd64")
    src = tmp_path / "multi"
    build_layout(src, [arm, amd], as_index=True)
    image = pull_image(layout, f"oci:{src}", platform=Platform("linux", "amd64"))
    assert image.config.platform == "linux/amd64"
    image = pull_image(layout, f"oci:{src}", platform=Platform("linux", "arm64", "v8"))
    assert image.config.platform == "linux/arm64/v8"
    with pytest.raises(NotFoundError, match="no image for linux/s390x") as info:
        pull_image(layout, f"oci:{src}", platform=Platform("linux", "s390x"))
    assert "linux/amd64" in info.value.message and "linux/arm64/v8" in info.value.message


def test_tampered_blob_is_refused_and_not_cached(layout: StateLayout, tmp_path: Path) -> None:
    src = simple_layout(tmp_path / "img")
    manifest = json.loads((tmp_path / "img" / "index.json").read_text())["manifests"][0]
    blob_dir = src / "blobs" / "sha256"
    doc = json.loads((blob_dir / manifest["digest"].split(":")[1]).read_text())
    layer_digest = doc["layers"][0]["digest"]
    layer_file = blob_dir / layer_digest.split(":")[1]
    data = bytearray(layer_file.read_bytes())
    data[-1] ^= 0xFF
    layer_file.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="digest mismatch") as info:
        pull_image(layout, f"oci:{src}")
    assert info.value.exit_code == 1
    assert not BlobStore(layout).has(layer_digest)
    assert leftovers(layout) == []
    assert list_images(layout) == []


def test_schema1_manifest_is_refused(layout: StateLayout, tmp_path: Path) -> None:
    src = simple_layout(tmp_path / "img")
    index = json.loads((src / "index.json").read_text())
    schema1 = json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode()
    import hashlib

    digest = "sha256:" + hashlib.sha256(schema1).hexdigest()
    (src / "blobs" / "sha256" / digest[7:]).write_bytes(schema1)
    index["manifests"][0].update(digest=digest, size=len(schema1), mediaType=
                                 "application/vnd.docker.distribution.manifest.v1+prettyjws")
    (src / "index.json").write_text(json.dumps(index))
    with pytest.raises(RegistryError, match="schema 1"):
        pull_image(layout, f"oci:{src}")


def test_docker_archive(layout: StateLayout, tmp_path: Path) -> None:
    layers = [layer_of({"a": b"1"}), layer_of({"b": b"2"})]
    archive = docker_archive(tmp_path / "img.tar", layers, repo_tag="team/app:v3")
    image = pull_image(layout, f"docker-archive:{archive}")
    assert len(image.layers) == 2
    assert image.config.cmd == ("/bin/sh",)
    same = pull_image(layout, f"docker-archive:{archive}:team/app:v3")
    assert same.digest == image.digest
    with pytest.raises(NotFoundError):
        pull_image(layout, f"docker-archive:{archive}:v9")
    with pytest.raises(NotFoundError, match="no such file"):
        pull_image(layout, f"docker-archive:{tmp_path}/missing.tar")


def test_docker_archive_layer_must_match_diff_id(layout: StateLayout, tmp_path: Path) -> None:
    good = layer_of({"a": b"1"})
    archive = docker_archive(tmp_path / "img.tar", [good])
    # rewrite the archive with a different layer body but the same config
    import tarfile

    evil = layer_of({"a": b"2"})
    patched = tmp_path / "patched.tar"
    with tarfile.open(archive) as src, tarfile.open(patched, "w") as dst:
        for member in src.getmembers():
            f = src.extractfile(member)
            data = f.read() if f else b""
            if member.name.endswith("layer.tar"):
                data = evil
                member.size = len(data)
            import io

            dst.addfile(member, io.BytesIO(data))
    with pytest.raises(IntegrityError, match="digest mismatch"):
        pull_image(layout, f"docker-archive:{patched}")
    assert not BlobStore(layout).has("sha256:" + __import__("hashlib").sha256(evil).hexdigest())
    assert leftovers(layout) == []


def test_rm_collects_blobs_no_other_image_uses(layout: StateLayout, tmp_path: Path) -> None:
    shared = Layer(layer_of({"shared": b"s"}))
    build_layout(tmp_path / "a", [ImageSpec(layers=[shared, Layer(layer_of({"a": b"a"}))])])
    build_layout(tmp_path / "b", [ImageSpec(layers=[shared, Layer(layer_of({"b": b"b"}))])])
    a = pull_image(layout, f"oci:{tmp_path / 'a'}")
    b = pull_image(layout, f"oci:{tmp_path / 'b'}")
    store = BlobStore(layout)
    removed = remove_image(layout, a.reference)
    assert removed.digest == a.digest
    assert store.has(a.layers[0].digest)  # shared with b
    assert not store.has(a.layers[1].digest)
    assert not store.has(a.config_digest)
    assert [i.reference for i in list_images(layout)] == [b.reference]
    with pytest.raises(NotFoundError, match="not found"):
        remove_image(layout, a.reference)


def _pull(state: str, ref: str, queue: multiprocessing.Queue[str]) -> None:
    try:
        queue.put(pull_image(StateLayout.resolve(state), ref).digest)
    except Exception as e:  # report to the parent
        queue.put(f"error: {e}")


def test_two_processes_pulling_the_same_image(layout: StateLayout, tmp_path: Path) -> None:
    big = {f"f{i}": bytes([i]) * 200_000 for i in range(20)}
    src = simple_layout(tmp_path / "img", files=big, compression="none")
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=_pull, args=(str(layout.root), f"oci:{src}", queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert results[0] == results[1] and not results[0].startswith("error")
    assert leftovers(layout) == []
    image = list_images(layout)[0]
    store = BlobStore(layout)
    for layer in image.layers:
        import hashlib

        assert "sha256:" + hashlib.sha256(store.path(layer.digest).read_bytes()).hexdigest() \
            == layer.digest
