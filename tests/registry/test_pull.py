"""Anonymous pulls from a real registry: manifests by tag and digest, indexes, blobs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from ocilayout import read_layout

from microagent.images.blobs import BlobStore
from microagent.images.registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryClient,
)
from microagent.layout import StateLayout
from tests.support.push import push_layout
from tests.support.registry import RunningRegistry


def _client(registry: RunningRegistry) -> RegistryClient:
    return RegistryClient(registry.host, plain_http=True, max_attempts=2, backoff_base=0.01)


def _layout_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def _manifest(layout: Path) -> tuple[str, dict[str, Any]]:
    top, _ = read_layout(layout)
    return top["digest"], json.loads(_layout_blob(layout, top["digest"]))


def test_manifest_by_tag_and_by_digest(registry: RunningRegistry, small_layout: Path) -> None:
    pushed = push_layout(registry.host, "pull/small", "v1", small_layout)
    digest, _ = _manifest(small_layout)
    assert pushed == digest
    with _client(registry) as client:
        by_tag = client.get_manifest("pull/small", "v1")
        by_digest = client.get_manifest("pull/small", digest)
    assert by_tag.digest == by_digest.digest == digest
    assert by_tag.media_type == by_digest.media_type == OCI_MANIFEST
    assert by_tag.data == _layout_blob(small_layout, digest)
    assert "sha256:" + hashlib.sha256(by_digest.data).hexdigest() == digest


def test_blobs_land_verified_in_the_store(registry: RunningRegistry, small_layout: Path,
                                          layout: StateLayout) -> None:
    push_layout(registry.host, "pull/blobs", "latest", small_layout)
    _, manifest = _manifest(small_layout)
    store = BlobStore(layout)
    progress: list[int] = []
    with _client(registry) as client:
        for descriptor in [manifest["config"], *manifest["layers"]]:
            path = client.fetch_blob("pull/blobs", descriptor["digest"],
                                     size=descriptor["size"], store=store,
                                     on_progress=progress.append)
            assert path == store.path(descriptor["digest"])
            assert path.read_bytes() == _layout_blob(small_layout, descriptor["digest"])
    assert sum(progress) == manifest["config"]["size"] + manifest["layers"][0]["size"]
    assert sorted(store.digests()) == sorted(
        d["digest"] for d in [manifest["config"], *manifest["layers"]])


def test_a_cached_blob_is_not_downloaded_again(registry: RunningRegistry,
                                               small_layout: Path, layout: StateLayout) -> None:
    _, manifest = _manifest(small_layout)
    config = manifest["config"]
    store = BlobStore(layout)
    store.ingest(config["digest"], [_layout_blob(small_layout, config["digest"])])
    # nothing was pushed under this name: a request would be a 404
    with _client(registry) as client:
        path = client.fetch_blob("pull/never-pushed", config["digest"], size=config["size"],
                                 store=store)
    assert path == store.path(config["digest"])


def test_a_large_layer_streams_in_chunks(registry: RunningRegistry, busybox_layout: Path,
                                         layout: StateLayout) -> None:
    push_layout(registry.host, "pull/busybox", "latest", busybox_layout)
    _, manifest = _manifest(busybox_layout)
    layer = manifest["layers"][0]
    assert layer["size"] > 1 << 20  # more than one chunk
    progress: list[int] = []
    with _client(registry) as client:
        path = client.fetch_blob("pull/busybox", layer["digest"], size=layer["size"],
                                 store=BlobStore(layout), on_progress=progress.append)
    assert path.stat().st_size == layer["size"]
    assert sum(progress) == layer["size"] and len(progress) > 1


def test_an_oci_index_and_its_children(registry: RunningRegistry,
                                       multiarch_layout: Path) -> None:
    digest = push_layout(registry.host, "pull/multiarch", "latest", multiarch_layout)
    with _client(registry) as client:
        index = client.get_manifest("pull/multiarch", "latest")
        assert (index.media_type, index.digest) == (OCI_INDEX, digest)
        children = json.loads(index.data)["manifests"]
        assert [c["platform"]["architecture"] for c in children] == ["amd64", "arm64"]
        for child in children:
            fetched = client.get_manifest("pull/multiarch", child["digest"])
            assert (fetched.media_type, fetched.digest) == (OCI_MANIFEST, child["digest"])


@pytest.mark.parametrize("image", ["small", "multiarch"])
def test_docker_schema2_manifests_and_lists(registry: RunningRegistry, small_layout: Path,
                                            multiarch_layout: Path, layout: StateLayout,
                                            image: str) -> None:
    source = small_layout if image == "small" else multiarch_layout
    repository = f"pull/docker-{image}"
    digest = push_layout(registry.host, repository, "latest", source, docker=True)
    with _client(registry) as client:
        top = client.get_manifest(repository, "latest")
        assert top.digest == digest
        if image == "multiarch":
            assert top.media_type == DOCKER_MANIFEST_LIST
            child = json.loads(top.data)["manifests"][0]
            assert child["mediaType"] == DOCKER_MANIFEST
            top = client.get_manifest(repository, child["digest"])
        assert top.media_type == DOCKER_MANIFEST
        manifest = json.loads(top.data)
        layer = manifest["layers"][0]
        assert layer["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"
        path = client.fetch_blob(repository, layer["digest"], size=layer["size"],
                                 store=BlobStore(layout))
    assert path.read_bytes() == _layout_blob(source, layer["digest"])
