"""The state directory is private: 0700 directories and 0600 files whatever the umask,
another local user cannot write in it, and one that others can write is refused."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.disks.basedisks import ensure_base_disk
from microagent.disks.volumes import create_volume
from microagent.events import append_event
from microagent.images.blobs import BlobStore
from microagent.images.catalog import pull_image
from microagent.layout import StateLayout
from microagent.store import ensure_dir, file_lock, write_json_atomic
from tests.rootfs.unprivileged import NOBODY, require_setpriv
from tests.support.images import simple_layout

MICROAGENT = str(Path(sys.executable).parent / "microagent")


def needs_e2fsprogs() -> None:
    if shutil.which("mkfs.ext4", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        pytest.skip("needs e2fsprogs")


def under_umask_000(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed CLI started from a shell whose umask is 000."""
    return subprocess.run(["sh", "-c", 'umask 000 && exec "$@"', "sh", MICROAGENT, *args],
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())


def loose_modes(root: Path) -> list[str]:
    """Every entry under ``root`` (and root) that is not a 0700 directory or 0600 file."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            loose = mode != 0o700
        elif stat.S_ISREG(st.st_mode):
            loose = mode != 0o600
        else:  # sockets: the owner's only
            loose = bool(mode & 0o077)
        if loose:
            wrong.append(f"{path.relative_to(root.parent)} {stat.filemode(st.st_mode)}")
    return wrong


@pytest.fixture
def oci(tmp_path: Path) -> str:
    return f"oci:{simple_layout(tmp_path / 'layout')}"


# --- modes whatever the umask -----------------------------------------------------------


def test_the_cli_under_umask_000_makes_everything_private(state_dir: Path, oci: str) -> None:
    needs_e2fsprogs()
    assert under_umask_000("image", "pull", oci).returncode == 0
    result = under_umask_000("volume", "create", "data", "--size-mib", "16")
    assert result.returncode == 0, result.stderr
    assert (state_dir / "images" / "blobs" / "sha256").is_dir()
    assert loose_modes(state_dir) == []


@pytest.fixture
def umask_000() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_the_library_under_umask_000_makes_everything_private(
        layout: StateLayout, oci: str, umask_000: None) -> None:
    """Without the CLI's own umask: what the library itself creates."""
    needs_e2fsprogs()
    image = pull_image(layout, oci)
    ensure_base_disk(layout, image, 32)
    create_volume(layout, "data", 16)
    write_json_atomic(layout.root / "deep" / "er" / "rec.json", {"a": 1})
    append_event(ensure_dir(layout.workspace_dir("w")) / "events.jsonl", "prepared")
    with file_lock(layout.lock_file("workspace", "w"), what="w"):
        pass
    assert BlobStore(layout).has(image.config_digest)
    assert list(layout.base_disks_dir.glob("*.ext4"))
    assert loose_modes(layout.root) == []


# --- another user ---------------------------------------------------------------------


TRY_WRITES = """
import json, os, sys
state = sys.argv[1]
attempts = {
    "a file in the root": lambda: open(os.path.join(state, "planted"), "w"),
    "images/disks": lambda: os.mkdir(os.path.join(state, "images", "disks")),
    "rename images/blobs": lambda: os.rename(os.path.join(state, "images", "blobs"),
                                             os.path.join(state, "images", "old")),
    "a blob": lambda: open(os.path.join(state, "images", "blobs", "sha256", "x"), "w"),
}
results = {}
for what, attempt in attempts.items():
    try:
        attempt()
        results[what] = "written"
    except OSError as e:
        results[what] = type(e).__name__
print(json.dumps(results))
"""


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A directory under /tmp that every user may enter (as a home directory would be)."""
    base = Path(tempfile.mkdtemp(prefix="ma-private-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_another_user_cannot_write_in_a_state_dir_made_under_umask_000(
        shared_base: Path, oci: str) -> None:
    require_setpriv()
    state = shared_base / "state"
    result = under_umask_000("--state-dir", str(state), "image", "pull", oci)
    assert result.returncode == 0, result.stderr
    tried = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "/usr/bin/python3", "-c", TRY_WRITES, str(state)],
        capture_output=True, text=True, timeout=60, check=True, cwd="/")
    assert set(json.loads(tried.stdout).values()) == {"PermissionError"}, tried.stdout


# --- a state directory others can write is refused ---------------------------------------


def test_a_state_dir_others_can_write_is_refused_with_the_fix(state_dir: Path) -> None:
    ensure_dir(state_dir / "images" / "blobs")
    (state_dir / "images").chmod(0o777)
    (state_dir / "images" / "blobs").chmod(0o775)
    for args in (["list"], ["image", "list"], ["volume", "list"]):
        result = subprocess.run([MICROAGENT, "--json", *args], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 1, result.stdout
        error = json.loads(result.stdout)["error"]
        assert error["kind"] == "host"
        assert f"{state_dir / 'images'}," in error["message"]
        assert str(state_dir / "images" / "blobs") in error["message"]
        assert error["hint"] == (f"make it private: chmod go-rwx {state_dir / 'images'} "
                                 f"{state_dir / 'images' / 'blobs'}")
    doctor = subprocess.run([MICROAGENT, "--json", "doctor"], capture_output=True, text=True,
                            timeout=120)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["state"]["status"] == "fail" and "chmod go-rwx" in checks["state"]["fix"]
    assert doctor.returncode == 1
    subprocess.run(["chmod", "go-rwx", str(state_dir / "images"),
                    str(state_dir / "images" / "blobs")], check=True)
    assert subprocess.run([MICROAGENT, "list"], capture_output=True, timeout=60
                          ).returncode == 0


def test_a_state_dir_of_another_user_is_refused(state_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    ensure_dir(state_dir / "workspaces")
    os.chown(state_dir / "workspaces", NOBODY, NOBODY)
    result = subprocess.run([MICROAGENT, "list"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"{state_dir / 'workspaces'} belongs to uid {NOBODY}" in result.stderr
    assert "chown -R 0" in result.stderr


def test_an_older_0755_state_dir_is_accepted(state_dir: Path) -> None:
    from microagent.store import check_state_dir

    ensure_dir(state_dir / "images" / "blobs" / "sha256")
    for path in (state_dir, state_dir / "images", state_dir / "images" / "blobs"):
        path.chmod(0o755)  # what main made under the usual umask: not writable by others
    check_state_dir(state_dir)


def test_a_state_dir_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = subprocess.run([MICROAGENT, "--state-dir", str(tmp_path / "file"), "list"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "is not a directory" in result.stderr
