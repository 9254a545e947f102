"""``create --kernel PATH`` on real microVMs: a workspace boots its own kernel at every
start, in a state directory that has no default kernel at all.

The kernel is the cached test kernel (tests/vm/conftest.py), passed by path: once as the
``vmlinuz`` of its bundle (taken whole), once as a loose bzImage with its modules beside
it in ``lib/modules/VERSION/`` (assembled as ``kernel install --from`` does).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.kernel.kernels import KernelBundle
from tests.support.fixtures import PushedImage
from tests.vm.cli import ma, ok

pytestmark = pytest.mark.slow


@pytest.fixture
def bare_home(tmp_path: Path, guest_agent: Path) -> Iterator[Path]:
    """A state directory without any kernel: a start can only boot the workspace's own."""
    home = tmp_path / "state"
    yield home
    for ws in (home / "workspaces").glob("*"):  # never leave a VM behind
        ma(home, "kill", ws.name)


def loose_kernel(bundle: KernelBundle, dest: Path) -> Path:
    """The bundle's vmlinuz as a kernel build leaves it: a bzImage with its modules
    beside it (unpacked from the bundle's modules.cpio)."""
    dest.mkdir()
    with bundle.modules_cpio.open("rb") as archive:
        subprocess.run(["cpio", "-id", "--quiet", "lib/modules/*"], stdin=archive, cwd=dest,
                       check=True, timeout=60)
    assert (dest / "lib" / "modules" / bundle.version).is_dir()
    shutil.copyfile(bundle.vmlinuz, dest / "bzImage")
    return dest / "bzImage"


def boot_and_check(home: Path, name: str, kernel: Path, version: str) -> None:
    ok(ma(home, "start", name))
    assert ok(ma(home, "exec", name, "--", "uname", "-r")).stdout.strip() == version
    status = ok(ma(home, "status", name)).stdout.splitlines()
    assert f"Kernel: {version} (own, from {kernel})" in status
    assert json.loads(ok(ma(home, "--json", "status", name)).stdout)["kernel"] == version
    ok(ma(home, "halt", name))


def test_a_workspace_boots_its_own_kernel_at_every_start(
        bare_home: Path, guest_kernel: KernelBundle, busybox_image: PushedImage,
        tmp_path: Path) -> None:
    """``create --kernel PATH`` was in CLI.md but did not exist."""
    home = bare_home
    ok(ma(home, "create", "own", "--image", busybox_image.ref, "--profile", "tiny",
          "--kernel", str(guest_kernel.vmlinuz)))
    assert not (home / "kernels" / "default.json").exists()
    assert [p.name for p in (home / "kernels").iterdir()] == ["by-digest"]
    boot_and_check(home, "own", guest_kernel.vmlinuz, guest_kernel.version)
    boot_and_check(home, "own", guest_kernel.vmlinuz, guest_kernel.version)  # every start

    loose = loose_kernel(guest_kernel, tmp_path / "build")
    ok(ma(home, "create", "loose", "--image", busybox_image.ref, "--profile", "tiny",
          "--kernel", str(loose)))
    boot_and_check(home, "loose", loose, guest_kernel.version)
    # assembled again from the same kernel and modules: the same content, stored once
    assert len(list((home / "kernels" / "by-digest").iterdir())) == 1

    refused = ma(home, "create", "none", "--image", busybox_image.ref, "--kernel",
                 str(tmp_path / "nope"))
    assert refused.returncode == 2 and "--kernel" in refused.stderr
    assert not (home / "workspaces" / "none").exists()
    for name in ("own", "loose"):
        ok(ma(home, "delete", name, "--yes"))
