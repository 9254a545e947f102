"""Bundle disks: built once per archive content, a fresh copy at each boot for rw, the
cached disk itself for ro, and refused past the bundle cap as the archive streams."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from microagent.disks import bundles
from microagent.disks.attachments import check_sources, parse_bundle, prepare_boot_disks
from microagent.errors import DiskTooSmallError, UnsafeImageError
from microagent.images.layers import MAX_DEPTH
from microagent.layout import StateLayout
from tests.support.distro import read_file
from tests.unit.test_attachments import files_under, make_tar
from tests.unit.test_layer_bounds import MIB, nested_tar, zeros_layer

pytestmark = pytest.mark.skipif(shutil.which("debugfs", path="/usr/sbin:/sbin:/usr/bin")
                                is None, reason="e2fsprogs is not installed")


def identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_a_bundle_is_built_once_per_archive_content(layout: StateLayout,
                                                    tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "tools.tar", {"bin/tool": b"v1\n"})
    item = parse_bundle(f"tools={tar}:/opt/tools")
    files = layout.run_files("ws")
    files.dir.mkdir(parents=True)
    cache = layout.workspace_bundles_dir("ws")

    first = prepare_boot_disks(layout, files, [item], cache)
    (cached,) = cache.glob("*/*")
    built = identity(cached)
    copy = files.bundle_disk("tools")
    assert first.disks[0].path == copy and read_file(copy, "/bin/tool") == b"v1\n"
    copy.write_bytes(b"what the last boot wrote")

    second = prepare_boot_disks(layout, files, [item], cache)
    assert identity(cached) == built  # not built again
    assert list(cache.glob("*/*")) == [cached]
    assert second.disks[0].path == copy and read_file(copy, "/bin/tool") == b"v1\n"

    make_tar(tar, {"bin/tool": b"v2\n"})  # a new content: built again, the old one goes
    prepare_boot_disks(layout, files, [item], cache)
    (rebuilt,) = cache.glob("*/*")
    assert rebuilt != cached and read_file(copy, "/bin/tool") == b"v2\n"
    assert files_under(layout.tmp_dir) == []


def test_a_ro_bundle_boots_the_cached_disk_itself(layout: StateLayout, tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "cfg.tar", {"app.conf": b"x=1\n"})
    files = layout.run_files("ws")
    files.dir.mkdir(parents=True)
    cache = layout.workspace_bundles_dir("ws")
    attached = prepare_boot_disks(layout, files, [parse_bundle(f"cfg={tar}:/cfg:ro")], cache)
    (cached,) = cache.glob("*/*")
    assert attached.disks[0].path == cached and attached.disks[0].read_only
    assert not files.bundle_disk("cfg").exists()


def test_create_keeps_the_disks_it_built_while_checking(layout: StateLayout,
                                                        tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "cfg.tar.gz", {"app.conf": b"x=1\n"}, gz=True)
    item = parse_bundle(f"cfg={tar}:/cfg")
    work = layout.tmp_dir
    work.mkdir(parents=True)
    with check_sources([item], work_dir=work) as built:
        adopted = tmp_path / "ws" / "bundles"
        adopted.parent.mkdir()
        built.adopt(adopted)
    (disk,) = adopted.glob("*/*")
    assert files_under(work) == []
    built = identity(disk)
    assert bundles.ensure_bundle_disk(item, adopted, work_dir=work) == disk
    assert identity(disk) == built


def test_bundles_whose_names_share_a_prefix_keep_their_disks(layout: StateLayout,
                                                             tmp_path: Path) -> None:
    items = [parse_bundle(f"{name}={make_tar(tmp_path / f'{name}.tar', {'f': name.encode()})}"
                          f":/{name}") for name in ("cfg", "cfg.v2")]
    cache = layout.workspace_bundles_dir("ws")
    disks = [bundles.ensure_bundle_disk(item, cache, work_dir=tmp_path) for item in items]
    assert all(disk.is_file() for disk in disks)


def test_what_create_does_not_adopt_is_removed(layout: StateLayout, tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "cfg.tar", {"app.conf": b"x=1\n"})
    layout.tmp_dir.mkdir(parents=True)
    with pytest.raises(RuntimeError), check_sources([parse_bundle(f"c={tar}:/c")],
                                                    work_dir=layout.tmp_dir):
        raise RuntimeError("the create failed later")
    assert files_under(layout.tmp_dir) == []


def test_a_bundle_bomb_is_refused_at_the_cap(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundles, "BUNDLE_MAX_MIB", 16)
    bomb = zeros_layer(tmp_path / "bomb.tar.gz", {"ok": 1, "zeros": 256 * MIB}).path
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(DiskTooSmallError) as info:
        bundles.build_bundle(parse_bundle(f"b={bomb}:/b"), work / "b.ext4", work_dir=work)
    assert info.value.message == (f"bundle b ({bomb}) holds more than the 16 MiB a bundle "
                                  "can; extraction stopped at entry 'zeros'; the bundle is "
                                  "refused")
    assert "--volume" in info.value.hint
    assert os.listdir(work) == []


def test_a_deeply_nested_bundle_is_refused(tmp_path: Path) -> None:
    tar = tmp_path / "deep.tar"
    tar.write_bytes(nested_tar(MAX_DEPTH + 10))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UnsafeImageError) as info:
        bundles.build_bundle(parse_bundle(f"d={tar}:/d"), work / "d.ext4", work_dir=work)
    assert info.value.message.startswith(f"bundle d ({tar}): entry ")
    assert info.value.message.endswith(f"is nested deeper than {MAX_DEPTH} directories; the "
                                       "bundle is refused")
    assert os.listdir(work) == []
