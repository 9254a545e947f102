"""Images in the session's test registry, and a runner for the installed CLI.

Loaded as a pytest plugin by tests/conftest.py, so end-to-end and VM tests share them.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from ocilayout import ImageSpec, Layer, build_layout, busybox_tree, tar_directory

from tests.support.push import push_layout
from tests.support.registry import RunningRegistry

MICROAGENT = str(Path(sys.executable).parent / "microagent")


@dataclass(frozen=True)
class PushedImage:
    """An image in a test registry: its reference and manifest digest."""

    ref: str
    digest: str
    layout: Path


def microagent(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
               **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI as a user would (inherits MICROAGENT_HOME from the test)."""
    return subprocess.run([MICROAGENT, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})},
                          **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="session")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout of a busybox-static tree."""
    root = tmp_path_factory.mktemp("busybox")
    tree = busybox_tree(root / "tree")
    layout = root / "layout"
    env = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"]
    build_layout(layout, [ImageSpec(layers=[Layer(tar_directory(tree))], cmd=["/bin/sh"],
                                    working_dir="/root", env=env,
                                    exposed_ports={"8080/tcp": {}})])
    return layout


@pytest.fixture(scope="session")
def busybox_image(registry: RunningRegistry, busybox_layout: Path) -> PushedImage:
    """The busybox image pushed to the anonymous registry as ``test/busybox:1``."""
    digest = push_layout(registry.host, "test/busybox", "1", busybox_layout)
    return PushedImage(f"{registry.host}/test/busybox:1", digest, busybox_layout)


@pytest.fixture(scope="session")
def debian_image(registry: RunningRegistry, debian_layer: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> PushedImage:
    """A real distribution (Debian bookworm minbase, debootstrap) as ``test/debian:bookworm``."""
    layout = tmp_path_factory.mktemp("debian-image") / "layout"
    gz = debian_layer.with_suffix(".tar.gz")
    compression = "gzip"
    if gz.exists():  # the bench keeps a gzipped copy; reuse it rather than compress again
        data = gzip.decompress(gz.read_bytes())
    else:
        data = debian_layer.read_bytes()
        compression = "none"
    build_layout(layout, [ImageSpec(
        layers=[Layer(data, compression)], cmd=["bash"],
        env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])])
    digest = push_layout(registry.host, "test/debian", "bookworm", layout)
    return PushedImage(f"{registry.host}/test/debian:bookworm", digest, layout)
