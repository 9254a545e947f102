"""A workspace created and running under ``umask 000``: every directory of the state
directory is 0700, every file 0600, every socket the owner's only (the supervisor's,
QEMU's), including the logs and the boot files of a running VM."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.fixtures import MICROAGENT, PushedImage
from tests.vm.cli import ma

pytestmark = pytest.mark.slow


def under_umask_000(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["sh", "-c", 'umask 000 && exec "$@"', "sh", MICROAGENT,
                             "--state-dir", str(home), *args],
                            capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, f"{args}: {result.stderr}"
    return result


def loose(home: Path) -> list[str]:
    wrong = []
    for path in [home, *home.rglob("*")]:
        st = path.lstat()
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            bad = mode != 0o700
        elif stat.S_ISREG(st.st_mode):
            bad = mode != 0o600
        else:
            bad = bool(mode & 0o077)
        if bad:
            wrong.append(f"{path.relative_to(home)} {stat.filemode(st.st_mode)}")
    return wrong


def test_a_running_workspace_under_umask_000_keeps_everything_private(
        own_home: Path, busybox_image: PushedImage) -> None:
    under_umask_000(own_home, "create", "w", "--image", busybox_image.ref, "--profile", "tiny",
                    "--volume", "data:/data")
    under_umask_000(own_home, "start", "w")
    try:
        run = own_home / "workspaces" / "w" / "run"
        assert any(stat.S_ISSOCK(p.lstat().st_mode) for p in run.iterdir())
        assert (own_home / "workspaces" / "w" / "serial.log").is_file()
        assert loose(own_home) == []
    finally:
        ma(own_home, "kill", "w")
