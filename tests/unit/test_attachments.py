"""Attached storage without a VM: the three flag forms, their refusals, named volumes and
their holds, bundle disks, and the guest's command-line parameters."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from microagent.cli import main
from microagent.disks.attachments import (
    Attachment,
    boot_disks,
    encode_dest,
    parse_bundle,
    parse_disk,
    parse_volume,
    validate_attachments,
)
from microagent.disks.bundles import build_bundle
from microagent.disks.volumes import (
    create_volume,
    delete_volume,
    get_volume,
    hold_volumes,
    list_volumes,
    volume_holder,
)
from microagent.errors import ConflictError, UnsafeImageError, UsageError
from microagent.layout import StateLayout
from microagent.vm.backends.base import guest_cmdline


def make_tar(path: Path, members: dict[str, bytes | str], *, gz: bool = False) -> Path:
    """A tar of regular files (bytes) and symlinks (str targets)."""
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# --- parsing ---------------------------------------------------------------------------


def test_the_three_forms() -> None:
    assert parse_volume("data:/work") == Attachment("volume", "data", "/work")
    assert parse_volume("data:/work:ro") == Attachment("volume", "data", "/work", True)
    assert parse_volume("data:/work/:rw") == Attachment("volume", "data", "/work", False)
    disk = parse_disk("img=/tmp/a:b.ext4:/mnt/x:ro")  # the path may hold a colon
    assert disk == Attachment("disk", "img", "/mnt/x", True, "/tmp/a:b.ext4")
    bundle = parse_bundle("config=rel/config.tar:/config")
    assert bundle.kind == "bundle" and bundle.source == str(Path("rel/config.tar").absolute())
    assert bundle.flag.startswith("--bundle config=")


@pytest.mark.parametrize(("parser", "value", "words"), [
    (parse_volume, "data", "use --volume NAME:/dst"),
    (parse_volume, "../x:/work", "is a path"),
    (parse_volume, "/host/dir:/work", "is a path"),
    (parse_volume, "a b:/work", "invalid volume name"),
    (parse_volume, "-x:/work", "invalid volume name"),
    (parse_volume, "data:work", "must be an absolute path"),
    (parse_volume, "data:/work/../etc", "must not contain '.' or '..'"),
    (parse_volume, "data:/", "cannot mount over the root"),
    (parse_volume, "data:/proc/x", "reserved"),
    (parse_disk, "img:/work", "use --disk NAME="),
    (parse_disk, "img=/a.ext4", "use --disk NAME="),
    (parse_disk, "b@d=/a.ext4:/work", "invalid disk name"),
    (parse_bundle, "cfg=/a.tar:../config", "must be an absolute path"),
    (parse_bundle, "=/a.tar:/config", "invalid bundle name"),
])
def test_bad_flags(parser: object, value: str, words: str) -> None:
    with pytest.raises(UsageError) as info:
        parser(value)  # type: ignore[operator]
    assert words in f"{info.value.message} {info.value.hint}"


@pytest.mark.parametrize(("parser", "value", "words"), [
    (parse_volume, "data:/work:RO", "unknown mode 'RO'"),  # docker's modes are lowercase
    (parse_volume, "data:/work:RW", "unknown mode 'RW'"),
    (parse_volume, "data:/work:rox", "unknown mode 'rox'"),
    (parse_volume, "data:/work:", "unknown mode ''"),
    (parse_volume, "data:/a:b", "unknown mode 'b'"),
    (parse_volume, "data:/a:/b", "contains ':'"),
    (parse_volume, "data:/work:ro:rw", "contains ':'"),
    (parse_disk, "img=/a.ext4:/work:RO", "unknown mode 'RO'"),
    (parse_disk, "img=/a:b.ext4:/work:wr", "unknown mode 'wr'"),
    (parse_disk, "img=/a.ext4:/work:", "unknown mode ''"),
    (parse_bundle, "cfg=/a.tar:/config:Ro", "unknown mode 'Ro'"),
    (parse_bundle, "cfg=/a.tar:/config:z", "unknown mode 'z'"),
])
def test_a_mode_is_ro_or_rw_and_a_destination_has_no_colon(parser: object, value: str,
                                                            words: str) -> None:
    """``--volume data:/work:RO`` used to mount read-write at ``/work:RO``."""
    with pytest.raises(UsageError) as info:
        parser(value)  # type: ignore[operator]
    assert words in info.value.message
    assert "ro or rw" in info.value.hint or "cannot contain ':'" in info.value.hint


@pytest.mark.parametrize("flag", [["--volume", "data:/work:RO"],
                                  ["--disk", "d=/nonexistent.ext4:/d:RO"],
                                  ["--bundle", "b=/nonexistent.tar:/b:RW"]])
def test_create_and_run_refuse_an_unknown_mode(state_dir: Path, flag: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--json", "create", "ws", "--image", "oci:/nonexistent", *flag],
                 ["--json", "run", *flag, "oci:/nonexistent", "true"]):
        assert main(argv) == 2
        error = json.loads(capsys.readouterr().out)["error"]
        assert error["kind"] == "usage" and "unknown mode" in error["message"]
    assert not state_dir.exists() or not any(state_dir.rglob("*.ext4"))


def test_same_destination_or_volume_twice() -> None:
    with pytest.raises(UsageError, match="destination /work is used twice"):
        validate_attachments([parse_volume("a:/work"), parse_bundle("b=/t.tar:/work/")])
    with pytest.raises(UsageError, match="volume a is attached twice"):
        validate_attachments([parse_volume("a:/x"), parse_volume("a:/y")])
    validate_attachments([parse_volume("a:/x"), parse_disk("a=/i.ext4:/y")])


# --- what the guest is told ----------------------------------------------------------------


def test_boot_disks_serials_order_and_cmdline(layout: StateLayout) -> None:
    files = layout.run_files("ws")
    attached = boot_disks(layout, files, [
        parse_volume("cache:/work/cache"), parse_volume("data:/work:ro"),
        parse_bundle("cfg=/t.tar:/etc/my app")])
    # parents before children, else in the order given
    assert [(d.serial, d.name, d.read_only) for d in attached.disks] == [
        ("ma-disk1", "data", True), ("ma-disk2", "cache", False), ("ma-disk3", "cfg", False)]
    assert attached.disks[0].path == layout.volume_disk("data")
    assert attached.disks[2].path == files.bundle_disk("cfg")
    assert attached.params[2] == "ma-disk3:cfg:/etc/my%20app:rw"
    assert encode_dest("/a:b\"c") == "/a%3Ab%22c"
    line = guest_cmdline(hostname="h", network="none", accel="kvm", tsc_khz=None,
                         disks=attached.params)
    assert line.endswith("microagent.disk=ma-disk1:data:/work:ro microagent.disk=ma-disk2:"
                         "cache:/work/cache:rw microagent.disk=ma-disk3:cfg:/etc/my%20app:rw")
    with pytest.raises(UsageError, match="kernel command line"):
        guest_cmdline(hostname="h", network="none", accel="kvm", tsc_khz=None,
                      disks=["x" * 300] * 8)


# --- bundles ------------------------------------------------------------------------------


def test_bundle_disk_is_ext4_sized_to_fit(tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "config.tgz", {"app.conf": b"key=value\n", "sub/x": b"x" * 5000},
                   gz=True)
    disk = tmp_path / "out" / "bundle.ext4"
    disk.parent.mkdir()
    build_bundle(parse_bundle(f"config={tar}:/config"), disk, work_dir=tmp_path / "out")
    assert disk.read_bytes()[1024 + 0x38:1024 + 0x3A] == b"\x53\xef"
    assert disk.stat().st_size <= 64 << 20
    assert files_under(tmp_path / "out") == ["bundle.ext4"]  # no staging left


@pytest.mark.parametrize(("members", "entry"), [
    ({"ok": b"1", "../escape": b"x"}, "../escape"),
    ({"/etc/abs": b"x"}, "/etc/abs"),
    ({"link": "/etc", "link/passwd": b"x"}, "link/passwd"),
])
def test_malicious_bundle_refused_naming_the_entry(tmp_path: Path, members: dict[str, bytes | str],
                                                   entry: str) -> None:
    tar = make_tar(tmp_path / "evil.tar", members)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsafeImageError) as info:
        build_bundle(parse_bundle(f"evil={tar}:/x"), out / "b.ext4", work_dir=out)
    assert f"bundle evil ({tar}): entry {entry!r}" in info.value.message
    assert "the bundle is refused" in info.value.message
    assert files_under(out) == []


def test_not_a_tar(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UsageError, match="is not a readable tar archive"):
        build_bundle(parse_bundle(f"j={junk}:/x"), out / "b.ext4", work_dir=out)


# --- create refuses bad attachments before writing anything ------------------------------


def create_args(state_dir: Path, *extra: str) -> list[str]:
    return ["--json", "create", "ws", "--image", "oci:/nonexistent", *extra]


@pytest.mark.parametrize(("extra", "code", "words"), [
    (["--volume", "b@d:/work"], 2, "invalid volume name"),
    (["--volume", "data:work"], 2, "must be an absolute path"),
    (["--volume", "data:/a/../b"], 2, "'..'"),
    (["--volume", "a:/work", "--volume", "b:/work"], 2, "used twice"),
    (["--disk", "d=/nonexistent.ext4:/d"], 1, "does not exist"),
    (["--bundle", "c=/nonexistent.tar:/c"], 1, "does not exist"),
])
def test_create_refuses_bad_attachments(state_dir: Path, capsys: pytest.CaptureFixture[str],
                                        extra: list[str], code: int, words: str) -> None:
    assert main(create_args(state_dir, *extra)) == code
    error = json.loads(capsys.readouterr().out)["error"]
    assert words in error["message"]
    assert not (state_dir / "workspaces" / "ws").exists()
    assert not list(state_dir.glob("volumes/*.ext4"))


def test_create_refuses_a_disk_that_is_not_ext4(state_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "plain.img"
    image.write_bytes(bytes(1 << 20))
    assert main(create_args(state_dir, "--disk", f"d={image}:/d")) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["message"] == f"--disk d={image}:/d: {image} is not an ext4 file system"
    assert image.read_bytes() == bytes(1 << 20)
    assert not (state_dir / "workspaces").exists()


def test_create_refuses_a_malicious_bundle(state_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    tar = make_tar(tmp_path / "evil.tar", {"fine": b"1", "../../etc/cron.d/x": b"boom"})
    assert main(create_args(state_dir, "--bundle", f"c={tar}:/config")) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["kind"] == "unsafe-image"
    assert "entry '../../etc/cron.d/x'" in error["message"]
    assert not (state_dir / "workspaces").exists()
    assert files_under(state_dir / "tmp") == []


# --- named volumes -----------------------------------------------------------------------


def test_volume_verbs(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["volume", "list"]) == 0
    assert capsys.readouterr().out == "No volumes.\n"
    assert main(["volume", "create", "data", "--size-mib", "64"]) == 0
    assert capsys.readouterr().out == "Created volume data (64 MiB)\n"
    disk = state_dir / "volumes" / "data.ext4"
    assert disk.stat().st_size == 64 << 20
    assert disk.stat().st_blocks * 512 < 16 << 20  # sparse
    assert main(["volume", "create", "data"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["volume", "create", "../x"]) == 2
    assert "invalid volume name" in capsys.readouterr().err
    assert main(["volume", "create", "big", "--size-mib", "8"]) == 2
    capsys.readouterr()
    assert main(["volume", "ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SIZE-MIB", "ATTACHED"]
    assert lines[1].split() == ["data", "64", "-"]
    assert main(["--json", "volume", "status", "data"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["size_mib"] == 64 and doc["attached_to"] is None and doc["workspaces"] == []
    assert main(["volume", "status", "nope"]) == 1
    assert "no volume named nope" in capsys.readouterr().err
    assert main(["volume", "delete", "data"]) == 0
    assert capsys.readouterr().out == "Deleted volume data\n"
    assert not disk.exists() and not (state_dir / "volumes" / "data.json").exists()
    assert main(["volume", "rm", "data"]) == 0
    assert "nothing to delete" in capsys.readouterr().out


def test_volume_held_by_a_running_workspace(layout: StateLayout) -> None:
    create_volume(layout, "data", 32)
    with hold_volumes(layout, "alpha", ["data"]):
        assert volume_holder(layout, "data") == "alpha"
        assert get_volume(layout, "data").attached_to == "alpha"
        with pytest.raises(ConflictError) as info, hold_volumes(layout, "beta", ["data"]):
            pass
        assert info.value.message == "volume data is attached to the running workspace alpha"
        with pytest.raises(ConflictError, match=r"cannot delete volume data.*workspace alpha"):
            delete_volume(layout, "data")
        assert layout.volume_disk("data").exists()
    assert volume_holder(layout, "data") is None
    assert [v.name for v in list_volumes(layout)] == ["data"]
    assert delete_volume(layout, "data")


def test_a_killed_holder_leaves_no_stale_hold(layout: StateLayout) -> None:
    create_volume(layout, "data", 32)
    code = ("import sys, time; from microagent.layout import StateLayout; "
            "from microagent.disks.volumes import hold_volumes\n"
            f"with hold_volumes(StateLayout.resolve({str(layout.root)!r}), 'alpha', ['data']):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert volume_holder(layout, "data") == "alpha"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert volume_holder(layout, "data") is None
    with hold_volumes(layout, "beta", ["data"]):
        assert volume_holder(layout, "data") == "beta"


def _record_using(layout: StateLayout, workspace: str, volume: str) -> None:
    """A workspace record attaching ``volume`` (what ``create`` writes, less the image)."""
    from microagent.store import write_json_atomic

    write_json_atomic(layout.workspace_record(workspace), {
        "name": workspace, "disks": [parse_volume(f"{volume}:/data").to_json()]})


def test_a_volume_a_workspace_uses_is_not_deleted_unless_forced(
        layout: StateLayout, capsys: pytest.CaptureFixture[str]) -> None:
    create_volume(layout, "data", 32)
    create_volume(layout, "free", 32)
    _record_using(layout, "beta", "data")
    _record_using(layout, "alpha", "data")
    _record_using(layout, "gamma", "other")
    (layout.workspaces_dir / "broken").mkdir()
    (layout.workspaces_dir / "broken" / "workspace.json").write_text("{trunc")
    with pytest.raises(ConflictError) as info:
        delete_volume(layout, "data")
    assert info.value.message == "cannot delete volume data: the workspaces alpha, beta use it"
    assert "--force" in info.value.hint and "volume create data" in info.value.hint
    assert main(["volume", "delete", "data"]) == 1
    assert "the workspaces alpha, beta use it" in capsys.readouterr().err
    assert layout.volume_disk("data").exists()
    assert delete_volume(layout, "free")
    with hold_volumes(layout, "alpha", ["data"]), \
            pytest.raises(ConflictError, match="attached to the running workspace alpha"):
        delete_volume(layout, "data", force=True)  # never under a running workspace
    assert main(["volume", "delete", "data", "--force"]) == 0
    assert not layout.volume_disk("data").exists()


def test_start_never_creates_a_volume(layout: StateLayout) -> None:
    from microagent.disks.attachments import check_before_start
    from microagent.errors import NotFoundError

    with pytest.raises(NotFoundError) as info:
        check_before_start(layout, "ws", [parse_volume("gone:/data")])
    assert info.value.message.startswith("volume gone of workspace ws does not exist")
    assert info.value.hint == "create it, empty: microagent volume create gone"
    assert not layout.volume_disk("gone").exists()
