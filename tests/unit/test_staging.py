"""Staging entries are locked while their owner lives; the sweep removes exactly those a
dead owner left (the real kills of ``create`` and ``image pull`` are in
tests/vm/test_interrupted.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from microagent.layout import StateLayout
from microagent.staging import stage_dir, stage_file, sweep, sweep_abandoned
from microagent.store import ensure_dir

OWNER = """
import json, sys
from pathlib import Path
from microagent.staging import stage_dir, stage_file
directory = Path(sys.argv[1])
tree = stage_dir(directory, "rootfs-")
(tree.path / "file").write_text("x")
blob = stage_file(directory, ".incoming-")
print(json.dumps([str(tree.path), str(blob.path)]), flush=True)
sys.stdin.read()
"""


def test_a_live_owners_staging_stays_and_a_killed_ones_goes(tmp_path: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None
        tree, blob = map(Path, json.loads(owner.stdout.readline()))
        assert sweep(tmp_path, "rootfs-") == [] and sweep(tmp_path, ".incoming-") == []
        assert (tree / "file").is_file() and blob.is_file()
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert sweep(tmp_path, "rootfs-") == [tree]
        assert sweep(tmp_path, ".incoming-") == [blob]
        assert list(tmp_path.iterdir()) == []
    finally:
        owner.kill()
        owner.wait(10)


def test_staging_goes_on_failure_and_stays_once_placed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), stage_dir(tmp_path, "rootfs-") as staged:
        (staged.path / "inside").write_text("x")
        raise RuntimeError("build failed")
    assert list(tmp_path.iterdir()) == []
    with stage_file(tmp_path, ".incoming-") as incoming:
        os.write(incoming.fd, b"verified")
        incoming.replace(tmp_path / "blob")
    assert (tmp_path / "blob").read_bytes() == b"verified"
    assert os.stat(tmp_path / "blob").st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob"]


def test_sweep_abandoned_takes_only_staging(layout: StateLayout) -> None:
    """Unlocked staging of every kind goes (as an older microagent or a killed one left
    it); finished things and records' own temporary files stay."""
    left = [
        ensure_dir(layout.blobs_dir) / ".incoming-abc",
        ensure_dir(layout.base_disks_dir) / ".1234-64m.ext4.xyz.tmp",
        ensure_dir(layout.tmp_dir) / "rootfs-abc",
        layout.tmp_dir / "bundle-abc",
        layout.tmp_dir / "kernel-abc",
        ensure_dir(layout.kernels_dir) / ".new-6.1.0-abc",
        layout.kernels_dir / ".old-6.1.0-abc",
        ensure_dir(layout.workspaces_dir) / ".new-w-abcdefgh",
        layout.workspaces_dir / ".deleting-w-123",
    ]
    kept = [
        layout.blobs_dir / ("a" * 64),
        layout.base_disks_dir / "1234-64m.ext4",
        layout.kernels_dir / ".default.json.abc.tmp",
        layout.workspaces_dir / "w",
    ]
    for path in left + kept:
        if path.name.startswith(("rootfs-", "bundle-", "kernel-", ".new-", ".old-",
                                 ".deleting-")) or path.name == "w":
            ensure_dir(path)
            (path / "inside").write_text("x")
        else:
            path.write_text("x")
    assert sorted(sweep_abandoned(layout)) == sorted(left)
    assert [p for p in left if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
