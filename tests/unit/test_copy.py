"""``microagent cp`` without a VM: endpoints, the safe host writer, the guest's tar
stream, and the stopped-workspace path on a real ext4 disk (debugfs)."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.disks.hostfiles import HostWriter, UnsafeCopyError
from microagent.errors import MicroagentError, NotFoundError, UsageError
from microagent.layout import StateLayout
from microagent.workspace.copy import Endpoint, copy, parse_endpoint
from microagent.workspace.copytar import archive_parts, extract_tar
from tests.support.workspaces import make_workspace


def tar_of(*members: tuple[str, str, bytes | str, int]) -> Iterator[bytes]:
    """A tar stream of (name, type, data or link target, mode) members, in chunks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, data, mode in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            else:
                payload = data if isinstance(data, bytes) else data.encode()
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    return iter([data[i:i + 1000] for i in range(0, len(data), 1000)])


# --- endpoints ------------------------------------------------------------------------


def test_endpoints() -> None:
    assert parse_endpoint("ws:/etc/passwd") == Endpoint("/etc/passwd", "ws")
    assert parse_endpoint("ws:tmp/x") == Endpoint("/tmp/x", "ws")
    assert parse_endpoint("ws:") == Endpoint("/", "ws")
    assert parse_endpoint("./a:b") == Endpoint("./a:b")
    assert parse_endpoint("/abs/a:b") == Endpoint("/abs/a:b")
    assert parse_endpoint("plain") == Endpoint("plain")
    with pytest.raises(UsageError):
        parse_endpoint("bad/name:/x")


def test_bad_direction_is_a_usage_error(layout: StateLayout, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="exactly one"):
        copy(layout, str(tmp_path / "a"), str(tmp_path / "b"))
    with pytest.raises(UsageError, match="exactly one"):
        copy(layout, "ws:/a", "other:/b")


def test_unknown_workspace(layout: StateLayout, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no workspace named nope"):
        copy(layout, "nope:/etc/passwd", str(tmp_path))


def test_quarantined_is_refused(layout: StateLayout, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from microagent.state.runtime import RuntimeState
    from microagent.workspace import copy as copy_module

    make_workspace(layout, "q")
    monkeypatch.setattr(copy_module, "runtime_state", lambda *_: RuntimeState(
        state="quarantined", detail="", event=None, supervisor_alive=True))
    with pytest.raises(MicroagentError, match="quarantined: cp is refused"):
        copy(layout, "q:/etc/passwd", str(tmp_path))


# --- the guest's tar stream -------------------------------------------------------------


def test_archive_names_are_checked() -> None:
    assert archive_parts("d/a/b", "d") == ("a", "b")
    assert archive_parts("./d/./a", "d") == ("a",)
    assert archive_parts("d", "d") == ()
    for bad in ("/etc/passwd", "d/../x", "other/x", "d/a/../../.."):
        with pytest.raises(UnsafeCopyError):
            archive_parts(bad, "d")


def test_symlinks_from_the_guest_stay_symlinks(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with HostWriter(dest, "d", archive=False) as writer:
        extract_tar(tar_of(("d", "dir", b"", 0o750), ("d/x", "link", "/etc/passwd", 0o777),
                           ("d/up", "link", "../../..", 0o777),
                           ("d/run.sh", "file", b"#!/bin/sh\n", 0o755),
                           ("d/sub", "dir", b"", 0o500), ("d/sub/ro", "file", b"r", 0o400)),
                    writer, "d")
        writer.commit()
    out = dest / "d"
    assert os.readlink(out / "x") == "/etc/passwd" and os.readlink(out / "up") == "../../.."
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o500
    assert (out / "sub" / "ro").read_bytes() == b"r"
    assert sorted(p.name for p in dest.iterdir()) == ["d"]  # nothing staged is left


def test_an_entry_behind_a_guest_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    crafted = tar_of(("d", "dir", b"", 0o755), ("d/up", "link", str(outside), 0o777),
                     ("d/up/evil", "file", b"pwned", 0o644))
    with pytest.raises(UnsafeCopyError, match="symlink"), \
            HostWriter(dest, "d", archive=False) as writer:
        extract_tar(crafted, writer, "d")
    assert list(outside.iterdir()) == []
    assert list(dest.iterdir()) == []  # the staged directory was dropped


def test_dotdot_entries_write_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeCopyError, match=r"'\.\.'"), \
            HostWriter(dest, "d", archive=False) as writer:
        extract_tar(tar_of(("d", "dir", b"", 0o755), ("d/../../escaped", "file", b"x", 0o644)),
                    writer, "d")
    assert not (tmp_path / "escaped").exists() and list(dest.iterdir()) == []


def test_a_host_symlink_at_the_destination_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "f").symlink_to(victim)
    with HostWriter(dest, "f", archive=False) as writer:
        writer.file((), lambda fd: (os.write(fd, b"new"), _meta())[1])
        writer.commit()
    assert victim.read_text() == "keep me"
    assert not (dest / "f").is_symlink() and (dest / "f").read_text() == "new"
    (dest / "sub").symlink_to(tmp_path)
    with pytest.raises(UnsafeCopyError), HostWriter(dest, "sub", archive=False) as w:
        w.directory((), _meta())


def test_a_wide_tree_keeps_few_fds_open(tmp_path: Path) -> None:
    """Only the current path's directories stay open: 400 directories copy under an fd
    limit of 64 (every directory's fd used to stay open until the end: EMFILE)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        with HostWriter(tmp_path, "wide", archive=False) as writer:
            writer.directory((), _meta())
            for i in range(400):
                writer.directory((f"d{i}",), _meta())
                writer.file((f"d{i}", "f"), lambda fd: (os.write(fd, b"x"), _meta())[1])
            writer.commit()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(list((tmp_path / "wide").iterdir())) == 400
    assert (tmp_path / "wide" / "d399" / "f").read_bytes() == b"x"


def test_a_hard_link_across_directories(tmp_path: Path) -> None:
    with HostWriter(tmp_path, "t", archive=False) as writer:
        writer.directory((), _meta())
        writer.file(("a", "b", "f"), lambda fd: (os.write(fd, b"data"), _meta())[1])
        writer.hard_link(("c", "g"), ("a", "b", "f"))
        writer.commit()
    out = tmp_path / "t"
    assert (out / "c" / "g").stat().st_ino == (out / "a" / "b" / "f").stat().st_ino


def test_a_tree_deeper_than_the_limit_is_refused(tmp_path: Path) -> None:
    from microagent.disks.hostfiles import MAX_DEPTH

    deep = tuple("x" for _ in range(MAX_DEPTH + 1))
    with pytest.raises(UnsafeCopyError, match=f"deeper than {MAX_DEPTH}"), \
            HostWriter(tmp_path, "deep", archive=False) as writer:
        writer.directory((), _meta())
        writer.file(deep, lambda fd: (os.write(fd, b"x"), _meta())[1])
    assert list(tmp_path.iterdir()) == []  # the staged top was removed
    with HostWriter(tmp_path, "ok", archive=False) as writer:  # at the limit: copied
        writer.directory((), _meta())
        writer.file(deep[:-1], lambda fd: (os.write(fd, b"x"), _meta())[1])
        writer.commit()
    assert (tmp_path / "ok" / "/".join(deep[:-1])).read_bytes() == b"x"


def _meta() -> object:
    from microagent.disks.hostfiles import Meta

    return Meta(0o640)


# --- a workspace that is not running: its disk ------------------------------------------


@pytest.fixture
def stopped(layout: StateLayout, tmp_path: Path) -> str:
    """A prepared workspace whose rootfs.ext4 holds a small tree with hostile symlinks."""
    if shutil.which("mkfs.ext4", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        pytest.skip("needs e2fsprogs")
    make_workspace(layout, "ws")
    tree = tmp_path / "tree"
    (tree / "data" / "sub").mkdir(parents=True)
    (tree / "data" / "hello.txt").write_text("hello\n")
    (tree / "data" / "run.sh").write_text("#!/bin/sh\n")
    (tree / "data" / "run.sh").chmod(0o751)
    (tree / "data" / "sub" / "deep").write_text("deep")
    (tree / "data" / "passwd").symlink_to("/etc/passwd")
    (tree / "data" / "up").symlink_to("../../..")
    (tree / "data" / "long").symlink_to("x" * 100)
    disk = layout.workspace_rootfs("ws")
    with disk.open("wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(disk)], check=True,
                   env={**os.environ, "PATH": os.environ["PATH"] + ":/usr/sbin:/sbin"})
    return "ws"


def test_copy_out_of_a_stopped_workspace(layout: StateLayout, stopped: str,
                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = copy(layout, f"{stopped}:/data", str(out))
    assert (result.direction, result.via) == ("from-guest", "disk")
    data = out / "data"
    assert (data / "hello.txt").read_text() == "hello\n"
    assert stat.S_IMODE((data / "run.sh").stat().st_mode) == 0o751
    assert (data / "sub" / "deep").read_text() == "deep"
    assert os.readlink(data / "passwd") == "/etc/passwd"
    assert os.readlink(data / "up") == "../../.." and os.readlink(data / "long") == "x" * 100
    assert result.copied == 6 and result.bytes == len("hello\n#!/bin/sh\ndeep")
    assert sorted(p.name for p in out.iterdir()) == ["data"]
    single = copy(layout, f"{stopped}:/data/hello.txt", str(tmp_path / "h.txt"))
    assert (tmp_path / "h.txt").read_text() == "hello\n" and single.copied == 1
    with pytest.raises(NotFoundError, match=r"no such file: ws:/nope"):
        copy(layout, f"{stopped}:/nope", str(out))


def test_copy_into_a_stopped_workspace(layout: StateLayout, stopped: str,
                                       tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "inner").mkdir(parents=True)
    (src / "a file").write_text("spaces")
    (src / "tool").write_text("x")
    (src / "tool").chmod(0o700)
    (src / "inner" / "n").write_text("n")
    (src / "link").symlink_to("/nowhere")
    result = copy(layout, str(src), f"{stopped}:/data")  # an existing directory: inside
    assert (result.direction, result.via, result.copied) == ("to-guest", "disk", 4)
    copy(layout, str(src / "tool"), f"{stopped}:/renamed")  # a new path: that name
    back = tmp_path / "back"
    back.mkdir()
    copy(layout, f"{stopped}:/data/src", str(back))
    copy(layout, f"{stopped}:/renamed", str(back))
    assert (back / "src" / "a file").read_text() == "spaces"
    assert (back / "src" / "inner" / "n").read_text() == "n"
    assert stat.S_IMODE((back / "src" / "tool").stat().st_mode) == 0o700
    assert os.readlink(back / "src" / "link") == "/nowhere"
    assert (back / "renamed").read_text() == "x"
    (src / "a file").write_text("replaced")  # copying again replaces and merges
    copy(layout, str(src), f"{stopped}:/data")
    copy(layout, f"{stopped}:/data/src/a file", str(back / "again"))
    assert (back / "again").read_text() == "replaced"
    with pytest.raises(NotFoundError, match="no such file"):
        copy(layout, str(tmp_path / "missing"), f"{stopped}:/data")
    with pytest.raises(NotFoundError, match="no such directory"):
        copy(layout, str(src), f"{stopped}:/no/such/dir")


# --- privilege bits: setuid/setgid stay in the guest unless the copy is an archive -------


@pytest.fixture
def privileged(layout: StateLayout, tmp_path: Path) -> str:
    """A stopped workspace whose disk holds setuid, setgid and sticky entries, owned by
    uid 1000 (as root: a setuid-root file, like /usr/bin/passwd, is root's)."""
    if shutil.which("mkfs.ext4", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        pytest.skip("needs e2fsprogs")
    if os.geteuid() != 0:
        pytest.skip("owning files by another uid needs root")
    make_workspace(layout, "priv")
    tree = tmp_path / "privtree"
    data = tree / "data"
    (data / "sgid").mkdir(parents=True)
    for path, mode in ((data / "suid", 0o4755), (data / "sgid" / "both", 0o6755),
                       (data / "sgid" / "sticky", 0o1644)):
        path.write_text("#!/bin/sh\n")
        if path.name == "both":
            os.chown(path, 1000, 1000)  # before chmod: a chown clears setuid and setgid
        path.chmod(mode)
    (data / "sgid").chmod(0o2775)
    disk = layout.workspace_rootfs("priv")
    with disk.open("wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(disk)], check=True,
                   env={**os.environ, "PATH": os.environ["PATH"] + ":/usr/sbin:/sbin"})
    return "priv"


def modes(root: Path) -> dict[str, tuple[int, int]]:
    """Permission bits and owner of everything below ``root`` (and of a file ``root``)."""
    paths = [root] if root.is_file() else sorted(root.rglob("*"))
    return {str(p.relative_to(root)): (stat.S_IMODE(p.lstat().st_mode), p.lstat().st_uid)
            for p in paths}


def test_a_plain_copy_out_drops_setuid_setgid_and_owners(layout: StateLayout,
                                                         privileged: str,
                                                         tmp_path: Path) -> None:
    single = tmp_path / "suid"
    copy(layout, f"{privileged}:/data/suid", str(single))
    assert modes(single) == {".": (0o755, os.geteuid())}
    out = tmp_path / "out"
    copy(layout, f"{privileged}:/data/sgid", str(out))
    assert modes(out) == {"both": (0o755, os.geteuid()), "sticky": (0o644, os.geteuid())}
    assert stat.S_IMODE(out.stat().st_mode) == 0o775


def test_an_archive_copy_out_keeps_them(layout: StateLayout, privileged: str,
                                        tmp_path: Path) -> None:
    single = tmp_path / "suid"
    copy(layout, f"{privileged}:/data/suid", str(single), archive=True)
    assert modes(single) == {".": (0o4755, 0)}
    out = tmp_path / "out"
    copy(layout, f"{privileged}:/data/sgid", str(out), archive=True)
    assert modes(out) == {"both": (0o6755, 1000), "sticky": (0o1644, 0)}
    assert stat.S_IMODE(out.stat().st_mode) == 0o2775


def test_into_the_guest_owners_are_roots_unless_archive(layout: StateLayout,
                                                         privileged: str,
                                                         tmp_path: Path) -> None:
    from microagent.disks.diskfiles import stat_path

    src = tmp_path / "mine"
    src.write_text("x")
    os.chown(src, 1000, 1000)
    src.chmod(0o4750)
    copy(layout, str(src), f"{privileged}:/plain")
    copy(layout, str(src), f"{privileged}:/kept", archive=True)
    plain = stat_path(layout.workspace_rootfs(privileged), "/plain")
    kept = stat_path(layout.workspace_rootfs(privileged), "/kept")
    assert plain is not None and (plain.uid, plain.gid, plain.mode & 0o7777) == \
        (0, 0, 0o4750)  # the guest's own business: modes are kept going in
    assert kept is not None and (kept.uid, kept.gid) == (1000, 1000)
