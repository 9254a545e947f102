"""``microagent cp`` on real microVMs: through the agent while running, through the
root disk while halted; files and trees both ways, modes, hostile guest symlinks."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fixtures import PushedImage
from tests.vm.cli import ma, ok

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def running(home: Path, busybox_image: PushedImage) -> Iterator[str]:
    """One running busybox workspace shared by the tests that do not stop it."""
    ok(ma(home, "create", "cpws", "--image", busybox_image.ref, "--profile", "tiny"))
    ok(ma(home, "start", "cpws"))
    yield "cpws"
    ma(home, "kill", "cpws")


def make_tree(root: Path) -> Path:
    """A small host tree: modes, a nested dir, a symlink, a name with a space."""
    tree = root / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "plain.txt").write_text("plain\n")
    (tree / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    (tree / "tool.sh").chmod(0o750)
    (tree / "with space").write_bytes(bytes(range(256)) * 64)
    (tree / "sub" / "deeper" / "leaf").write_text("leaf")
    (tree / "sub").chmod(0o710)
    (tree / "link").symlink_to("plain.txt")
    return tree


def same_tree(a: Path, b: Path) -> None:
    """Same names, kinds, modes, contents and link targets below ``a`` and ``b``."""
    names_a = sorted(str(p.relative_to(a)) for p in a.rglob("*"))
    names_b = sorted(str(p.relative_to(b)) for p in b.rglob("*"))
    assert names_a == names_b
    for name in names_a:
        pa, pb = a / name, b / name
        sa, sb = pa.lstat(), pb.lstat()
        assert stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode), name
        if not pa.is_symlink():
            assert stat.S_IMODE(sa.st_mode) == stat.S_IMODE(sb.st_mode), name
        if pa.is_symlink():
            assert os.readlink(pa) == os.readlink(pb), name
        elif pa.is_file():
            assert pa.read_bytes() == pb.read_bytes(), name


def test_a_file_both_ways_keeps_its_mode(home: Path, running: str, tmp_path: Path) -> None:
    src = tmp_path / "script.sh"
    src.write_bytes(b"#!/bin/sh\necho hi\n" + os.urandom(300_000))
    src.chmod(0o741)
    result = json.loads(ok(ma(home, "--json", "cp", str(src), f"{running}:/root/")).stdout)
    assert (result["copied"], result["bytes"], result["direction"]) == \
        (1, src.stat().st_size, "to-guest")
    listing = ok(ma(home, "exec", running, "--", "ls", "-l", "/root/script.sh")).stdout
    assert listing.startswith("-rwxr----x")
    back = tmp_path / "back.sh"
    result = json.loads(ok(ma(home, "--json", "cp", f"{running}:/root/script.sh",
                              str(back))).stdout)
    assert result["direction"] == "from-guest" and result["bytes"] == src.stat().st_size
    assert back.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(back.stat().st_mode) == 0o741


def test_a_directory_both_ways(home: Path, running: str, tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    ok(ma(home, "exec", running, "--", "mkdir", "-p", "/srv"))
    ok(ma(home, "cp", str(tree), f"{running}:/srv/copied"))  # a new path: created
    ok(ma(home, "cp", str(tree), f"{running}:/srv"))  # an existing directory: inside
    modes = ok(ma(home, "exec", running, "--", "ls", "-ld", "/srv/copied/sub",
                  "/srv/tree/tool.sh")).stdout
    assert "drwx--x---" in modes and "-rwxr-x---" in modes
    out = tmp_path / "out"
    out.mkdir()
    ok(ma(home, "cp", f"{running}:/srv/copied", str(out)))
    same_tree(tree, out / "copied")
    ok(ma(home, "cp", f"{running}:/srv/tree", str(tmp_path / "fresh")))
    same_tree(tree, tmp_path / "fresh")


def test_guest_symlinks_stay_symlinks_and_nothing_escapes(home: Path, running: str,
                                                          tmp_path: Path) -> None:
    ok(ma(home, "exec", running, "--", "sh", "-c",
          "mkdir -p /root/t/a/b && cd /root/t/a/b && ln -s /etc/passwd x && "
          "ln -s ../../.. up && ln -s ../../../../../../tmp climb && echo in > f"))
    box = tmp_path / "box"
    dest = box / "dest"
    dest.mkdir(parents=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    ok(ma(home, "cp", f"{running}:/root/t", str(dest)))
    b = dest / "t" / "a" / "b"
    assert os.readlink(b / "x") == "/etc/passwd"
    assert os.readlink(b / "up") == "../../.."
    assert os.readlink(b / "climb") == "../../../../../../tmp"
    assert (b / "f").read_text() == "in\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert sorted(p.name for p in box.iterdir()) == ["dest"]
    assert sorted(p.name for p in dest.iterdir()) == ["t"]
    ok(ma(home, "cp", f"{running}:/root/t/a/b/x", str(tmp_path / "lone")))
    assert os.readlink(tmp_path / "lone") == "/etc/passwd"  # the link, like docker cp


def test_errors(home: Path, running: str, tmp_path: Path) -> None:
    missing = ma(home, "cp", f"{running}:/no/such/file", str(tmp_path))
    assert missing.returncode == 1 and f"no such file: {running}:/no/such/file" in missing.stderr
    missing = ma(home, "cp", str(tmp_path / "nothing"), f"{running}:/root")
    assert missing.returncode == 1 and "no such file" in missing.stderr
    both = ma(home, "cp", str(tmp_path), str(tmp_path / "x"))
    assert both.returncode == 2 and "exactly one" in both.stderr
    both = ma(home, "cp", f"{running}:/a", f"{running}:/b")
    assert both.returncode == 2
    unknown = ma(home, "--json", "cp", "ghost:/etc/passwd", str(tmp_path))
    assert unknown.returncode == 1
    assert json.loads(unknown.stdout)["error"]["kind"] == "not-found"
    nodir = ma(home, "cp", str(tmp_path), f"{running}:/no/such/dir")
    assert nodir.returncode == 1 and "no such directory" in nodir.stderr


def test_a_halted_workspace_through_its_disk(home: Path, busybox_image: PushedImage,
                                             tmp_path: Path) -> None:
    name = "cpdisk"
    ok(ma(home, "create", name, "--image", busybox_image.ref, "--profile", "tiny"))
    tree = make_tree(tmp_path)
    result = json.loads(ok(ma(home, "--json", "cp", str(tree), f"{name}:/root")).stdout)
    assert (result["via"], result["copied"]) == ("disk", 5)
    ok(ma(home, "cp", str(tree / "tool.sh"), f"{name}:/usr/bin/tool"))
    ok(ma(home, "start", name))
    try:
        assert ok(ma(home, "exec", name, "--", "tool")).stdout == "tool\n"
        assert ok(ma(home, "exec", name, "--", "cat", "/root/tree/sub/deeper/leaf")
                  ).stdout == "leaf"
        ok(ma(home, "exec", name, "--", "sh", "-c",
              "mkdir /root/made && echo guest > /root/made/g && chmod 604 /root/made/g && "
              "ln -s ../../.. /root/made/up"))
        ok(ma(home, "halt", name))
        out = tmp_path / "out"
        result = json.loads(ok(ma(home, "--json", "cp", f"{name}:/root/tree", str(out))
                               ).stdout)
        assert result["via"] == "disk"
        same_tree(tree, out)
        ok(ma(home, "cp", f"{name}:/root/made", str(tmp_path / "made")))
        assert (tmp_path / "made" / "g").read_text() == "guest\n"
        assert stat.S_IMODE((tmp_path / "made" / "g").stat().st_mode) == 0o604
        assert os.readlink(tmp_path / "made" / "up") == "../../.."
        missing = ma(home, "cp", f"{name}:/nope", str(tmp_path))
        assert missing.returncode == 1 and f"no such file: {name}:/nope" in missing.stderr
    finally:
        ma(home, "kill", name)


def test_setuid_and_setgid_stay_in_the_guest_unless_archive(home: Path, running: str,
                                                           tmp_path: Path) -> None:
    """Through the agent: a single file (get) and a tree (tar through exec)."""
    ok(ma(home, "exec", running, "--", "sh", "-c",
          "mkdir -p /root/priv/sgid && cp /bin/busybox /root/priv/suid && "
          "chmod 4755 /root/priv/suid && echo x > /root/priv/sgid/both && "
          "chown 1000:1000 /root/priv/sgid/both && chmod 6755 /root/priv/sgid/both && "
          "echo y > /root/priv/sgid/sticky && chmod 1644 /root/priv/sgid/sticky && "
          "chmod 2775 /root/priv/sgid"))

    def bits(path: Path) -> tuple[int, int]:
        st = path.lstat()
        return stat.S_IMODE(st.st_mode), st.st_uid

    me = os.geteuid()
    ok(ma(home, "cp", f"{running}:/root/priv/suid", str(tmp_path / "plain")))
    assert bits(tmp_path / "plain") == (0o755, me)
    ok(ma(home, "cp", f"{running}:/root/priv", str(tmp_path / "tree")))
    tree = tmp_path / "tree"
    assert [bits(tree / "suid"), bits(tree / "sgid"), bits(tree / "sgid" / "both"),
            bits(tree / "sgid" / "sticky")] == [(0o755, me), (0o775, me), (0o755, me),
                                                (0o644, me)]
    if me != 0:
        return  # keeping owners, and with them setuid, needs root on the host
    ok(ma(home, "cp", "-a", f"{running}:/root/priv/suid", str(tmp_path / "kept")))
    assert bits(tmp_path / "kept") == (0o4755, 0)
    ok(ma(home, "cp", "--archive", f"{running}:/root/priv", str(tmp_path / "archive")))
    archive = tmp_path / "archive"
    assert [bits(archive / "suid"), bits(archive / "sgid"), bits(archive / "sgid" / "both"),
            bits(archive / "sgid" / "sticky")] == [(0o4755, 0), (0o2775, 0), (0o6755, 1000),
                                                   (0o1644, 0)]
