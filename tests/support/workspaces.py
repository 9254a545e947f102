"""Workspaces as ``create`` records them, and lock holders, for tests that boot nothing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from microagent.events import append_event
from microagent.images.manifests import ImageConfig
from microagent.layout import StateLayout
from microagent.store import ensure_dir, write_json_atomic

HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def make_workspace(layout: StateLayout, name: str) -> Path:
    """A workspace record and its first event, as ``create`` leaves them."""
    directory = layout.workspace_dir(name)
    ensure_dir(directory)
    write_json_atomic(layout.workspace_record(name), {
        "name": name, "created": "2024-01-01T00:00:00.000+00:00",
        "image": {"reference": "oci:/nowhere", "digest": "sha256:" + "0" * 64,
                  "config_digest": "sha256:" + "1" * 64, "config": ImageConfig().to_json()},
        "resources": {"profile": "tiny", "memory_mib": 256, "cpus": 1, "disk_mib": 512},
        "backend": "qemu", "network": "user", "restart": "never", "env": [],
        "hostname": name,
    })
    append_event(layout.workspace_events(name), "prepared", "created from oci:/nowhere")
    return directory


class LockHolder:
    """A child process holding an flock, like a supervisor (or a running ``start``)."""

    def __init__(self, path: Path) -> None:
        ensure_dir(path.parent)
        self.process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == b"held\n"

    def release(self) -> None:
        """End the process; the kernel drops its lock."""
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(10)


def later(seconds: float, action: object) -> threading.Thread:
    """Run ``action`` after ``seconds`` in a thread (joined by the caller)."""
    def run() -> None:
        time.sleep(seconds)
        action()  # type: ignore[operator]

    thread = threading.Thread(target=run)
    thread.start()
    return thread
