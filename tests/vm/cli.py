"""The installed CLI as the VM tests drive it, and what they look at afterwards."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support.fixtures import MICROAGENT
from tests.vm.qemu import vm_pids


def ma(home: Path, *args: str, timeout: float = 300, **kwargs: object
       ) -> subprocess.CompletedProcess[str]:
    """The installed CLI against ``home``."""
    return subprocess.run([MICROAGENT, "--state-dir", str(home), *args], capture_output=True,
                          text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}\nstdout: {result.stdout}\n{result.stderr}"
    return result


def events(home: Path, name: str) -> list[dict[str, str]]:
    lines = (home / "workspaces" / name / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def qemu_pids(name: str) -> list[int]:
    """QEMU processes of workspace ``name`` (by their -name argument) started by this test
    session: their working directory (the workspace's run dir) is under the session's
    temporary base, so a second test run on the same host does not count."""
    return vm_pids(lambda argv: f"microagent-{name}".encode() in argv)
