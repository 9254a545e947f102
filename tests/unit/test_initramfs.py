"""The newc cpio writer, checked against GNU cpio and against a parser of the format."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from microagent.kernel.cpio import (
    CpioEntry,
    append_cpio,
    char_device,
    directory,
    regular_file,
    symlink,
    write_cpio,
)
from microagent.kernel.initramfs import build_boot_initramfs
from microagent.kernel.kernels import KernelBundle

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None,
                                reason="GNU cpio is not installed (apt-get install cpio)")


def parse_newc(data: bytes) -> list[list[CpioEntry]]:
    """Every archive of a concatenation, as entries (trailers dropped); checks alignment."""
    archives: list[list[CpioEntry]] = []
    current: list[CpioEntry] = []
    pos = 0
    while pos < len(data):
        assert pos % 4 == 0, f"header at unaligned offset {pos}"
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        _ino, mode, uid, gid, _nlink, mtime, size, _, _, rmaj, rmin, namesize, _ = fields
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        body = name_start + namesize + (-(110 + namesize) % 4)
        content = data[body:body + size]
        pos = body + size + (-size % 4)
        if name == "TRAILER!!!":
            archives.append(current)
            current = []
        else:
            current.append(CpioEntry(name, mode, content, uid, gid, mtime, (rmaj, rmin)))
    assert not current, "archive without trailer"
    return archives


def sample_entries() -> list[CpioEntry]:
    return [
        directory("etc", 0o755),
        regular_file("etc/microagent/modules", b"/lib/a.ko\n/lib/b.ko\n", 0o600),
        regular_file("init", b"\x7fELF-ish", 0o755),
        regular_file("empty", b""),
        symlink("bin/sh", "busybox"),
        char_device("dev/console", 5, 1),
    ]


def archive(entries: list[CpioEntry]) -> bytes:
    buf = io.BytesIO()
    write_cpio(entries, buf)
    return buf.getvalue()


def test_archive_round_trips_through_a_newc_parser() -> None:
    [entries] = parse_newc(archive(sample_entries()))
    by_name = {e.name: e for e in entries}
    assert list(by_name) == ["etc", "etc/microagent", "etc/microagent/modules", "init",
                             "empty", "bin", "bin/sh", "dev", "dev/console"]
    assert by_name["etc/microagent"].mode == stat.S_IFDIR | 0o755  # parent added
    assert by_name["etc/microagent/modules"].mode == stat.S_IFREG | 0o600
    assert by_name["init"].data == b"\x7fELF-ish"
    assert by_name["bin/sh"].mode == stat.S_IFLNK | 0o777
    assert by_name["bin/sh"].data == b"busybox"
    assert by_name["dev/console"].rdev == (5, 1)
    assert stat.S_ISCHR(by_name["dev/console"].mode)


@needs_cpio
def test_gnu_cpio_lists_and_extracts_the_archive(tmp_path: Path) -> None:
    data = archive(sample_entries())
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=data, capture_output=True,
                             check=True, timeout=30).stdout.decode().splitlines()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing]
    assert names == ["etc", "etc/microagent", "etc/microagent/modules", "init", "empty",
                     "bin", "bin/sh", "dev", "dev/console"]
    console = next(line for line in listing if line.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console
    # Extract all but the device node (mknod needs root).
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames", "--nonmatching",
                    "dev/console"], input=data, cwd=dest, check=True, timeout=30)
    assert (dest / "etc/microagent/modules").read_bytes() == b"/lib/a.ko\n/lib/b.ko\n"
    assert stat.S_IMODE((dest / "etc/microagent/modules").stat().st_mode) == 0o600
    assert stat.S_IMODE((dest / "init").stat().st_mode) == 0o755
    assert (dest / "empty").read_bytes() == b""
    assert os.readlink(dest / "bin/sh") == "busybox"


@pytest.mark.parametrize("name_length", range(1, 9))
def test_every_name_length_keeps_members_aligned(name_length: int) -> None:
    entries = [regular_file("x" * name_length, b"y" * name_length)]
    [parsed] = parse_newc(archive(entries))
    assert parsed[0].data == b"y" * name_length
    assert len(archive(entries)) % 4 == 0


def test_duplicate_and_escaping_names_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        archive([regular_file("a", b"1"), regular_file("/a", b"2")])
    with pytest.raises(ValueError, match="invalid"):
        archive([regular_file("../etc/passwd", b"")])
    with pytest.raises(ValueError, match="invalid"):
        archive([directory("/")])


def test_concatenated_archives_keep_their_order(tmp_path: Path) -> None:
    first = tmp_path / "first.cpio"
    first.write_bytes(archive([regular_file("lib/a.ko", b"A")]))
    out = io.BytesIO()
    append_cpio([first], out)
    write_cpio([regular_file("init", b"I", 0o755)], out)
    archives = parse_newc(out.getvalue())
    assert [[e.name for e in a] for a in archives] == [["lib", "lib/a.ko"], ["init"]]


def test_boot_initramfs_is_the_modules_then_the_agent(tmp_path: Path) -> None:
    modules = tmp_path / "modules.cpio"
    modules.write_bytes(archive([regular_file("lib/modules/6.1/kernel/virtio.ko", b"KO"),
                                 regular_file("etc/microagent/modules", b"/lib/x.ko\n")]))
    bundle = KernelBundle(version="6.1", path=tmp_path, vmlinuz=tmp_path / "vmlinuz",
                          modules_cpio=modules, vmlinux=None, modules=("virtio",),
                          builtin=(), source="test", created="")
    agent = tmp_path / "agent"
    agent.write_bytes(b"\x7fELF agent v2")
    out = build_boot_initramfs(bundle, agent, tmp_path / "boot.cpio")
    first, second = parse_newc(out.read_bytes())
    assert "lib/modules/6.1/kernel/virtio.ko" in [e.name for e in first]
    init = {e.name: e for e in second}["init"]
    assert init.data == b"\x7fELF agent v2"
    assert init.mode == stat.S_IFREG | 0o755
    assert {e.name: e for e in second}["dev/console"].rdev == (5, 1)
    assert not list(tmp_path.glob(".boot.cpio.*")), "temporary file left behind"


def test_missing_agent_is_a_host_error(tmp_path: Path) -> None:
    from microagent.errors import HostError

    modules = tmp_path / "modules.cpio"
    modules.write_bytes(archive([]))
    bundle = KernelBundle(version="6.1", path=tmp_path, vmlinuz=tmp_path / "vmlinuz",
                          modules_cpio=modules, vmlinux=None, modules=(), builtin=(),
                          source="test", created="")
    with pytest.raises(HostError, match="guest agent"):
        build_boot_initramfs(bundle, tmp_path / "nope", tmp_path / "boot.cpio")
    assert not (tmp_path / "boot.cpio").exists()
