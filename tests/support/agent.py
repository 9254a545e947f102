"""The guest agent binary, built from the current sources for the tests that run it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

GUEST_DIR = Path(__file__).resolve().parents[2] / "src" / "microagent" / "guest"


def build_guest_agent() -> Path:
    """``make`` the agent (a no-op when it is up to date); its path."""
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.skip("building the guest agent needs make and gcc")
    run = subprocess.run(["make", "-C", str(GUEST_DIR)], capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, f"building the agent failed:\n{run.stdout}\n{run.stderr}"
    return GUEST_DIR / "build" / "microagent-init"
