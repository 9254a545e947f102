"""Attached storage on real microVMs: the seed page's volume and bundle example, a
``--disk``, read-only devices, one running holder per volume, and the refusals.

QEMU boots the real Debian kernel with the real agent (TCG on this host); images come
from the session's loopback registry.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.support.fixtures import PushedImage
from tests.vm.cli import ma, ok

pytestmark = pytest.mark.slow
EROFS = "Read-only file system"


def sh(home: Path, name: str, script: str) -> subprocess.CompletedProcess[str]:
    return ma(home, "exec", name, "--", "/bin/sh", "-c", script)


def make_config_tar(path: Path, source: Path) -> Path:
    (source / "sub").mkdir(parents=True)
    (source / "app.conf").write_text("answer=42\n")
    (source / "sub" / "notes.txt").write_text("nested\n")
    with tarfile.open(path, "w") as tar:
        for item in sorted(source.rglob("*")):
            tar.add(item, str(item.relative_to(source)), recursive=False)
    return path


def ro_flag(home: Path, name: str, dest: str) -> str:
    """The guest's /sys/block/<dev>/ro of the device mounted on ``dest``."""
    script = (f"dev=$(awk '$2 == \"{dest}\" {{print $1}}' /proc/mounts); "
              "cat /sys/block/${dev#/dev/}/ro")
    return ok(sh(home, name, script)).stdout.strip()


def test_seed_example_volume_bundle_and_disk(home: Path, busybox_image: PushedImage,
                                             tmp_path: Path) -> None:
    config = make_config_tar(tmp_path / "config.tar", tmp_path / "config")
    tools = make_config_tar(tmp_path / "tools.tar", tmp_path / "tools")
    disk = tmp_path / "scratch.ext4"
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "hello").write_text("from the host\n")
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tmp_path / "scratch"), str(disk), "32M"],
                   check=True, env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})

    # the seed page's storage variant, plus a rw bundle and a --disk
    created = ok(ma(home, "create", "research", "--image", busybox_image.ref,
                    "--volume", "data:/work", "--bundle", f"config={config}:/config:ro",
                    "--bundle", f"tools={tools}:/opt/tools", "--disk",
                    f"scratch={disk}:/mnt/scratch"))
    assert created.stdout.splitlines()[:2] == ["Workspace: research", "State: prepared"]
    # create built the bundle disks (checking them); no start builds them again
    bundle_dir = home / "workspaces" / "research" / "bundles"
    built = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in bundle_dir.glob("*/*")}
    assert sorted(p.parent.name for p in built) == ["config", "tools"]
    assert ok(ma(home, "volume", "list")).stdout.splitlines()[1].split() == ["data", "1024", "-"]
    ok(ma(home, "start", "research"))

    # every disk is mounted before exec is ready: the first exec sees them
    assert ok(ma(home, "exec", "research", "--", "cat", "/config/app.conf",
                 "/config/sub/notes.txt", "/mnt/scratch/hello")).stdout == \
        "answer=42\nnested\nfrom the host\n"
    ok(sh(home, "research", "echo 'notes from run 1' > /work/notes.txt"))
    refused = sh(home, "research", "echo x > /config/new")
    assert refused.returncode != 0 and EROFS in refused.stderr
    # ro is the device's, not only the mount's: remounting rw cannot lift it
    assert ro_flag(home, "research", "/config") == "1"
    assert ro_flag(home, "research", "/work") == "0"
    assert sh(home, "research", "mount -o remount,rw /config").returncode != 0
    assert EROFS in sh(home, "research", "touch /config/again").stderr
    ok(sh(home, "research", "echo scratch > /opt/tools/written; echo more > /mnt/scratch/w"))

    # attached to one running workspace at a time
    row = ok(ma(home, "volume", "list")).stdout.splitlines()[1].split()
    assert row == ["data", "1024", "research"]
    busy = ma(home, "volume", "delete", "data")
    assert busy.returncode == 1 and "attached to the running workspace research" in busy.stderr
    ok(ma(home, "create", "other", "--image", busybox_image.ref, "--volume", "data:/data:ro"))
    second = ma(home, "start", "other")
    assert second.returncode == 1, second.stderr
    assert "volume data is attached to the running workspace research" in second.stderr
    assert json.loads(ok(ma(home, "--json", "status", "other")).stdout)["state"] == "prepared"
    # QEMU's image lock refuses a --disk image that another VM has open read-write
    ok(ma(home, "create", "third", "--image", busybox_image.ref, "--disk", f"s={disk}:/s"))
    third = ma(home, "start", "third")
    assert third.returncode == 1 and 'Failed to get "write" lock' in third.stderr, third.stderr
    ok(ma(home, "delete", "third", "--yes"))
    assert "Disk: /config bundle config (ro)" in ok(ma(home, "status", "research")).stdout

    # a rw bundle is a fresh copy at each start; the volume and the --disk keep their data
    ok(ma(home, "halt", "research"))
    ok(ma(home, "start", "research"))
    assert sh(home, "research", "cat /opt/tools/written").returncode != 0
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in bundle_dir.glob("*/*")} == built
    assert ok(sh(home, "research", "cat /work/notes.txt /mnt/scratch/w")).stdout == \
        "notes from run 1\nmore\n"
    ok(ma(home, "halt", "research"))
    ok(ma(home, "delete", "research", "--yes"))
    assert not (home / "workspaces" / "research").exists()

    # the data outlives the workspace; a ro volume is a read-only device too
    assert (home / "volumes" / "data.ext4").exists()
    ok(ma(home, "start", "other"))
    assert ok(ma(home, "exec", "other", "--", "cat", "/data/notes.txt")).stdout == \
        "notes from run 1\n"
    assert EROFS in sh(home, "other", "echo x > /data/x").stderr
    assert ro_flag(home, "other", "/data") == "1"
    assert json.loads(ok(ma(home, "--json", "volume", "status", "data")).stdout)[
        "attached_to"] == "other"
    ok(ma(home, "halt", "other"))
    ok(ma(home, "delete", "other", "--yes"))
    ok(ma(home, "volume", "delete", "data"))
    assert ok(ma(home, "volume", "list")).stdout == "No volumes.\n"


def test_a_mount_point_that_is_a_file_fails_the_start(home: Path,
                                                      busybox_image: PushedImage) -> None:
    ok(ma(home, "create", "badmount", "--image", busybox_image.ref,
          "--volume", "bm:/bin/busybox/sub"))
    failed = ma(home, "start", "badmount")
    assert failed.returncode == 1
    assert ("failed to start: disk bm cannot be mounted on /bin/busybox/sub: /bin/busybox is "
            "not a directory in the image") in failed.stderr, failed.stderr
    assert json.loads(ok(ma(home, "--json", "status", "badmount")).stdout)["state"] == "failed"
    assert ma(home, "volume", "status", "bm").returncode == 0  # the volume is intact
    ok(ma(home, "delete", "badmount", "--yes"))
    ok(ma(home, "volume", "delete", "bm"))


def test_refusals_before_any_boot(home: Path, busybox_image: PushedImage,
                                  tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(4 << 20))
    refused = ma(home, "create", "nodisk", "--image", busybox_image.ref,
                 "--disk", f"d={plain}:/d")
    assert refused.returncode == 2 and "is not an ext4 file system" in refused.stderr
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../../escape")
        tar.addfile(info)
    refused = ma(home, "create", "evil", "--image", busybox_image.ref,
                 "--bundle", f"e={evil}:/e")
    assert refused.returncode == 1 and "entry '../../escape'" in refused.stderr
    missing = ma(home, "create", "notar", "--image", busybox_image.ref,
                 "--bundle", f"c={tmp_path / 'missing.tar'}:/c")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    for name in ("nodisk", "evil", "notar"):
        assert not (home / "workspaces" / name).exists()

    # a --disk that stopped being ext4 after create: start refuses before booting
    disk = tmp_path / "d.ext4"
    subprocess.run(["mkfs.ext4", "-q", str(disk), "16M"], check=True,
                   env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    ok(ma(home, "create", "later", "--image", busybox_image.ref, "--disk", f"d={disk}:/d"))
    disk.write_bytes(bytes(16 << 20))
    refused = ma(home, "start", "later")
    assert refused.returncode == 2 and "is not an ext4 file system" in refused.stderr
    assert json.loads(ok(ma(home, "--json", "status", "later")).stdout)["state"] == "prepared"
    ok(ma(home, "delete", "later", "--yes"))


def test_a_killed_writer_then_a_read_only_reader(home: Path,
                                                 busybox_image: PushedImage) -> None:
    from microagent.disks.ext4 import journal_needs_recovery

    ok(ma(home, "create", "writer", "--image", busybox_image.ref, "--volume", "j:/j"))
    ok(ma(home, "start", "writer"))
    ok(sh(home, "writer", "echo journaled > /j/f; sync"))
    ok(ma(home, "kill", "writer"))
    assert journal_needs_recovery(home / "volumes" / "j.ext4")  # killed while mounted
    # a read-only device cannot replay the journal: the host replays it first
    ok(ma(home, "create", "reader", "--image", busybox_image.ref, "--volume", "j:/j:ro"))
    ok(ma(home, "start", "reader"))
    assert ok(ma(home, "exec", "reader", "--", "cat", "/j/f")).stdout == "journaled\n"
    ok(ma(home, "halt", "reader"))
    for name in ("writer", "reader"):
        ok(ma(home, "delete", name, "--yes"))
    ok(ma(home, "volume", "delete", "j"))


def test_a_read_only_disk_with_an_unreplayed_journal(home: Path, busybox_image: PushedImage,
                                                     tmp_path: Path) -> None:
    from microagent.disks.ext4 import journal_needs_recovery

    disk = tmp_path / "d.ext4"
    subprocess.run(["mkfs.ext4", "-q", str(disk), "32M"], check=True,
                   env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    ok(ma(home, "create", "dwriter", "--image", busybox_image.ref, "--disk", f"d={disk}:/d"))
    ok(ma(home, "start", "dwriter"))
    ok(sh(home, "dwriter", "echo x > /d/f; sync"))
    ok(ma(home, "kill", "dwriter"))
    assert journal_needs_recovery(disk)
    # microagent does not touch a user's image: the guest mounts it without the journal
    ok(ma(home, "create", "dreader", "--image", busybox_image.ref, "--disk", f"d={disk}:/d:ro"))
    ok(ma(home, "start", "dreader"))
    assert "disk d: its journal needs recovery" in ok(ma(home, "logs", "dreader")).stdout
    assert ok(sh(home, "dreader", "ls /d")).returncode == 0
    ok(ma(home, "halt", "dreader"))
    for name in ("dwriter", "dreader"):
        ok(ma(home, "delete", name, "--yes"))


def test_a_volume_in_use_is_kept_and_never_recreated_at_start(home: Path,
                                                              busybox_image: PushedImage) -> None:
    """``volume delete`` of a halted workspace's volume used to succeed, and the next start
    silently attached a new, empty one."""
    ok(ma(home, "create", "keeper", "--image", busybox_image.ref, "--volume", "kept:/kept"))
    ok(ma(home, "start", "keeper"))
    ok(sh(home, "keeper", "echo precious > /kept/f"))
    ok(ma(home, "halt", "keeper"))
    refused = ma(home, "volume", "delete", "kept")
    assert refused.returncode == 1, refused.stderr
    assert "cannot delete volume kept: the workspace keeper uses it" in refused.stderr
    assert "--force" in refused.stderr
    ok(ma(home, "create", "second", "--image", busybox_image.ref, "--volume", "kept:/k:ro"))
    refused = ma(home, "--json", "volume", "delete", "kept")
    assert json.loads(refused.stdout)["error"]["message"] == \
        "cannot delete volume kept: the workspaces keeper, second use it"
    assert (home / "volumes" / "kept.ext4").exists()

    ok(ma(home, "volume", "delete", "kept", "--force"))
    failed = ma(home, "start", "keeper")
    assert failed.returncode == 1, failed.stderr
    assert "volume kept of workspace keeper does not exist (it was deleted)" in failed.stderr
    assert "microagent volume create kept" in failed.stderr
    assert not (home / "volumes" / "kept.ext4").exists()
    assert json.loads(ok(ma(home, "--json", "status", "keeper")).stdout)["state"] == "halted"

    ok(ma(home, "volume", "create", "kept", "--size-mib", "64"))  # the way back: empty
    ok(ma(home, "start", "keeper"))
    assert ok(sh(home, "keeper", "ls -A /kept")).stdout.split() == ["lost+found"]
    ok(ma(home, "halt", "keeper"))
    for name in ("keeper", "second"):
        ok(ma(home, "delete", name, "--yes"))
    ok(ma(home, "volume", "delete", "kept"))
