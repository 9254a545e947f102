"""Images for the registry tests: small OCI layouts built from real trees, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from ocilayout import ImageSpec, Layer, build_layout, busybox_tree, tar_directory


def _tree(root: Path, name: str) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text(f"{name}\n")
    (root / "hello.txt").write_text(f"hello from {name}\n")
    return root


@pytest.fixture(scope="session")
def small_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout of one single-layer linux/amd64 image, tagged ``latest``."""
    work = tmp_path_factory.mktemp("small-image")
    tree = _tree(work / "tree", "small")
    build_layout(work / "layout", [ImageSpec(layers=[Layer(tar_directory(tree))])])
    return work / "layout"


@pytest.fixture(scope="session")
def multiarch_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout whose ``latest`` is an index of a linux/amd64 and a linux/arm64 image."""
    work = tmp_path_factory.mktemp("multiarch-image")
    images = [
        ImageSpec(layers=[Layer(tar_directory(_tree(work / arch, arch)))], architecture=arch)
        for arch in ("amd64", "arm64")
    ]
    build_layout(work / "layout", images, as_index=True)
    return work / "layout"


@pytest.fixture(scope="session")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout of busybox-static (a layer of a few MiB, so several download chunks)."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.skip("busybox-static is not installed")
    work = tmp_path_factory.mktemp("busybox-image")
    tree = busybox_tree(work / "tree", busybox)
    build_layout(work / "layout", [ImageSpec(layers=[Layer(tar_directory(tree), "none")])])
    return work / "layout"
