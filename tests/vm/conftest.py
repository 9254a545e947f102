"""Fixtures of the VM tests, staged: kernel and agent → boot initramfs → root disk.

The kernel bundle comes from ``guest_kernel`` (tests/support/kernel.py); the agent is
built with make at every session (make is quick when nothing changed).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.kernel.kernels import KernelBundle
from microagent.store import write_json_atomic
from tests.support.agent import build_guest_agent
from tests.support.kernel import give_default_kernel
from tests.vm.cli import ma
from tests.vm.qemu import SESSION_TMP

DISK_MIB = 64


@pytest.fixture(scope="session")
def guest_agent() -> Path:
    """The agent binary, built from the current sources."""
    return build_guest_agent()


@pytest.fixture(scope="session")
def boot_initramfs(guest_kernel: KernelBundle, guest_agent: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """modules.cpio followed by the agent as /init, as a start builds it."""
    from microagent.kernel.initramfs import build_boot_initramfs

    return build_boot_initramfs(guest_kernel, guest_agent,
                                tmp_path_factory.mktemp("initramfs") / "boot.cpio")


@pytest.fixture(scope="session")
def busybox_disk(busybox_layer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine ext4 root disk of the busybox image (tests boot copies of it)."""
    base = tmp_path_factory.mktemp("busybox-disk")
    disk = base / "rootfs.ext4"
    from microagent.disks.rootfs import build_root_disk
    from microagent.images.layers import LayerFile

    digest = "sha256:" + hashlib.sha256(busybox_layer.read_bytes()).hexdigest()
    layer = LayerFile(busybox_layer, "application/vnd.oci.image.layer.v1.tar", digest)
    work = base / "work"
    work.mkdir()
    build_root_disk([layer], disk, size_mib=DISK_MIB, work_dir=work)
    return disk


@pytest.fixture
def root_disk(busybox_disk: Path, tmp_path: Path) -> Iterator[Path]:
    """A fresh copy of the busybox disk for one boot."""
    disk = tmp_path / "rootfs.ext4"
    shutil.copyfile(busybox_disk, disk)
    yield disk
    disk.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Lets vm_pids tell this session's VMs from another test run's on the same host."""
    SESSION_TMP[:] = [tmp_path_factory.getbasetemp()]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, guest_kernel: KernelBundle,
         guest_agent: Path) -> Iterator[Path]:
    """A state directory per test module, with the cached kernel bundle as its default."""
    home = tmp_path_factory.mktemp("vm-home")
    give_default_kernel(home, guest_kernel)
    yield home
    for ws in (home / "workspaces").glob("*"):  # never leave a VM behind
        ma(home, "kill", ws.name)


@pytest.fixture
def own_home(tmp_path: Path, guest_kernel: KernelBundle) -> Path:
    """A state directory of the test's own (0700), with the cached kernel bundle as its
    default, installed as microagent installs one (directories 0700, files 0600)."""
    home = tmp_path / "state"
    bundle = home / "kernels" / guest_kernel.version
    shutil.copytree(guest_kernel.path, bundle)
    for path in (home, home / "kernels", bundle, *bundle.rglob("*")):
        path.chmod(0o700 if path.is_dir() else 0o600)
    write_json_atomic(home / "kernels" / "default.json", {"version": guest_kernel.version})
    return home
