"""``create --kernel PATH``: what PATH may be, the refusals before anything is written,
the content-addressed store, and the record (the boot itself is in tests/vm)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from microagent.cli import main
from microagent.errors import UsageError
from microagent.kernel.kernels import install_kernel, list_kernels
from microagent.kernel.ownkernels import (
    bundle_digest,
    check_kernel_path,
    install_own_kernel,
    own_kernel,
)
from microagent.layout import StateLayout
from tests.support.images import simple_layout
from tests.unit.test_kernels import VERSION, check_bundle, package_tree


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def loose_bzimage(tmp_path: Path) -> Path:
    """A bzImage with its modules beside it (lib/modules/VERSION), as a kernel build has."""
    tree = package_tree(tmp_path / "build")
    image = tree / "bzImage"
    shutil.move(tree / "boot" / f"vmlinuz-{VERSION}", image)
    shutil.move(tree / "boot" / f"config-{VERSION}", tree / f"config-{VERSION}")
    return image


def test_a_bzimage_becomes_a_bundle_stored_by_content(layout: StateLayout,
                                                      tmp_path: Path) -> None:
    image = loose_bzimage(tmp_path)
    bundle = install_own_kernel(layout, image)
    check_bundle(bundle, f"path:{image}")
    digest = bundle_digest(bundle)
    assert bundle.path == layout.kernels_dir / "by-digest" / digest.removeprefix("sha256:")
    assert own_kernel(layout, digest) == bundle
    # never the default, never listed as an installed kernel
    assert list_kernels(layout) == []
    assert not (layout.kernels_dir / "default.json").exists()
    # the same content is stored once
    assert install_own_kernel(layout, image).path == bundle.path
    assert [p.name for p in (layout.kernels_dir / "by-digest").iterdir()] == [bundle.path.name]
    assert files_under(layout.tmp_dir) == []


def test_a_bundle_or_its_vmlinuz_is_taken_whole(layout: StateLayout, tmp_path: Path) -> None:
    other = StateLayout.resolve(tmp_path / "other")
    installed = install_kernel(other, from_path=package_tree(tmp_path / "pkg"))
    for path in (installed.path, installed.vmlinuz):
        bundle = install_own_kernel(layout, path)
        assert bundle_digest(bundle) == bundle_digest(installed)
        assert bundle.files == installed.files
        assert bundle.source == installed.source
    # a vmlinuz that is not the bundle's own is assembled on its own (and has no modules)
    stray = installed.path / "copy"
    stray.write_bytes(installed.vmlinuz.read_bytes() + b"\0")
    with pytest.raises(UsageError, match="no module virtio_mmio"):
        install_own_kernel(layout, stray)


@pytest.mark.parametrize(("make", "words"), [
    (lambda d: d / "missing", "no such file or directory"),
    (lambda d: (d / "passwd").write_text("root:x:0:0\n") and d / "passwd",
     r"not a kernel image \(no bzImage header\)"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no kernel bundle"),
    (lambda d: (d / "fake.deb").write_bytes(b"not ar") and d / "fake.deb", "not a kernel image"),
])
def test_not_a_kernel_is_a_usage_error(tmp_path: Path, make: object, words: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(UsageError, match=words) as info:
        check_kernel_path(path)
    assert "bzImage" in info.value.hint


def test_a_kernel_without_its_modules_is_refused_leaving_nothing(layout: StateLayout,
                                                                 tmp_path: Path) -> None:
    image = loose_bzimage(tmp_path)
    alone = tmp_path / "alone" / "vmlinuz"
    alone.parent.mkdir()
    shutil.copyfile(image, alone)
    with pytest.raises(UsageError, match="no module virtio_mmio") as info:
        install_own_kernel(layout, alone)
    assert "modules beside it" in info.value.hint
    assert files_under(layout.kernels_dir / "by-digest") == []
    assert files_under(layout.tmp_dir) == []


@pytest.mark.parametrize("kernel", ["missing", "/etc/passwd"])
def test_create_refuses_a_bad_kernel_before_anything_is_written(
        state_dir: Path, tmp_path: Path, kernel: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    src = simple_layout(tmp_path / "img", tag="v1")
    assert main(["--json", "create", "ws", "--image", f"oci:{src}:v1", "--kernel",
                 str(tmp_path / kernel) if kernel == "missing" else kernel]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["kind"] == "usage" and error["message"].startswith("--kernel ")
    assert files_under(state_dir) == []


def test_create_records_the_kernel_and_status_shows_it(
        state_dir: Path, layout: StateLayout, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``create --kernel PATH`` was in CLI.md but did not exist."""
    src = simple_layout(tmp_path / "img", tag="v1")
    image = loose_bzimage(tmp_path)
    assert main(["create", "ws", "--image", f"oci:{src}:v1", "--profile", "tiny",
                 "--kernel", str(image)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "State: prepared"
    record = json.loads(layout.workspace_record("ws").read_text())
    digest = bundle_digest(install_own_kernel(layout, image))
    assert record["kernel"] == {"digest": digest, "version": VERSION, "source": str(image)}
    assert not (layout.kernels_dir / "default.json").exists()  # no default was installed
    assert main(["status", "ws"]) == 0
    assert f"Kernel: {VERSION} (own, from {image})" in capsys.readouterr().out.splitlines()
    assert main(["--json", "status", "ws"]) == 0
    assert json.loads(capsys.readouterr().out)["own_kernel"]["digest"] == digest
