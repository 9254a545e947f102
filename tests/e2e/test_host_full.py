"""A host file system that fills up during pull or mkfs: a HostError that says so, names
the directory and its free space, and leaves nothing half written.

For real, not mocked: the state directory is a small tmpfs mounted in a private mount
namespace (``unshare --mount``; as an ordinary user, in a user namespace too) that
vanishes with the command. What the command left is listed inside the namespace.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ocilayout import ImageSpec, Layer, build_layout

from tests.e2e.conftest import MICROAGENT
from tests.support.images import layer_of

# mount a tmpfs of $1 on $2, run the rest, then list what the state dir holds into $3
_SCRIPT = """
mount -t tmpfs -o size="$1",mode=0700 tmpfs "$2" || exit 99
state=$2 listing=$3
shift 3
"$@"
rc=$?
(cd "$state" && find . -mindepth 1 | sort) > "$listing"
exit $rc
"""


def _unshare_argv() -> list[str] | None:
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    argv = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        argv[1:1] = ["--user", "--map-root-user"]
    return argv


@functools.cache
def _why_not() -> str:
    """Why a test cannot mount a tmpfs here ("" when it can)."""
    argv = _unshare_argv()
    if argv is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run([*argv, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private namespace: {probe.stderr.strip()}"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "n/a")


def on_small_fs(size: str, state: Path, listing: Path, *args: str
                ) -> subprocess.CompletedProcess[str]:
    """The CLI with its state directory on a fresh ``size`` tmpfs."""
    state.mkdir(parents=True, exist_ok=True)
    argv = [*(_unshare_argv() or []), "sh", "-c", _SCRIPT, "sh", size, str(state),
            str(listing), MICROAGENT, "--state-dir", str(state), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def random_image(dest: Path, mib: int) -> Path:
    """An OCI layout whose one layer is ``mib`` MiB that do not compress."""
    layer = layer_of({"data/blob": os.urandom(mib << 20), "etc/motd": b"hi\n"})
    build_layout(dest, [ImageSpec(layers=[Layer(layer, "none")])])
    return dest


def half_written(listing: Path) -> list[str]:
    """Temporary files and staging the command should have removed."""
    return [line for line in listing.read_text().splitlines()
            if "/." in line or line.startswith(("./tmp/", "./workspaces/"))]


def test_a_pull_that_fills_the_host_says_so(tmp_path: Path) -> None:
    src = random_image(tmp_path / "img", 12)
    state, listing = tmp_path / "state", tmp_path / "listing"
    result = on_small_fs("8m", state, listing, "image", "pull", f"oci:{src}")
    assert result.returncode == 1, result.stderr
    assert "internal error" not in result.stderr
    assert "the host file system is full in " + str(state / "images" / "blobs") \
        in result.stderr, result.stderr
    assert "MiB free)" in result.stderr and "--state-dir" in result.stderr
    assert half_written(listing) == []
    assert "./images/index.json" not in listing.read_text()


def test_a_disk_build_that_cannot_fit_on_the_host_says_so(tmp_path: Path) -> None:
    # room for the layer and its staging, not for the disk as well
    src = random_image(tmp_path / "img", 6)
    state, listing = tmp_path / "state", tmp_path / "listing"
    result = on_small_fs("16m", state, listing, "create", "w", "--image", f"oci:{src}",
                         "--size-mib", "64")
    assert result.returncode == 1, result.stderr
    assert "needs at least" not in result.stderr and "internal error" not in result.stderr
    assert f"the host file system has too little room in {state / 'images' / 'disks'} (" \
        in result.stderr, result.stderr
    assert "MiB needed)" in result.stderr
    assert half_written(listing) == []
    assert not [line for line in listing.read_text().splitlines() if line.endswith(".ext4")]


def test_mkfs_on_a_full_host_is_a_host_error(tmp_path: Path) -> None:
    """mkfs.ext4 itself hitting ENOSPC, not the disk being too small for the image."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "blob").write_bytes(os.urandom(6 << 20))
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from microagent.disks import ext4\n"
        "from microagent.errors import MicroagentError\n"
        "image = Path(sys.argv[1]) / 'disk.ext4'\n"
        "image.touch()\n"
        "import os; os.truncate(image, 64 << 20)\n"
        "try:\n"
        "    ext4.make_filesystem(ext4.find_tools(), Path(sys.argv[2]), image, inodes=1024,"
        " label='t')\n"
        "except MicroagentError as e:\n"
        "    print(type(e).__name__, e.message)\n"
    )
    state, listing = tmp_path / "state", tmp_path / "listing"
    argv = [*(_unshare_argv() or []), "sh", "-c", _SCRIPT, "sh", "4m", str(state),
            str(listing), sys.executable, "-c", code, str(state), str(tree)]
    state.mkdir()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.stdout.startswith("HostError mkfs.ext4 cannot write the disk image: the "
                                    f"host file system is full in {state}"), result
