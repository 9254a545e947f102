"""Bad input to a running workspace, on a real microVM: exec's numeric and environment
flags as a user types them (issue 12's examples), refused or resolved by the CLI before
the agent sees them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.fixtures import PushedImage
from tests.vm.cli import ma, ok

pytestmark = pytest.mark.slow


def test_exec_flags_on_a_running_workspace(home: Path, busybox_image: PushedImage) -> None:
    env = {**os.environ, "MA_FROM_HOST": "from the host", "MA_AT_CREATE": "at create"}
    env.pop("MA_UNSET", None)
    ok(ma(home, "create", "flags", "--image", busybox_image.ref, "--profile", "tiny",
          "--env", "MA_AT_CREATE", "--env", "MA_UNSET", env=env))
    ok(ma(home, "start", "flags"))
    # --timeout -1 exited 126 with the agent's protocol text
    for value in ("-1", "nan", "inf"):
        refused = ma(home, "exec", "flags", "--timeout", value, "--", "true")
        assert refused.returncode == 2, refused
        assert "argument --timeout:" in refused.stderr and "timeout_ms" not in refused.stderr
    # -e NAME set NAME to an empty value; as docker: the host's value, or nothing
    shown = ok(ma(home, "exec", "-e", "MA_FROM_HOST", "-e", "MA_UNSET", "-e", "MA_SET=x",
                  "flags", "--", "env", env=env)).stdout.splitlines()
    assert "MA_FROM_HOST=from the host" in shown and "MA_SET=x" in shown
    assert "MA_AT_CREATE=at create" in shown  # create's --env NAME: the value at create
    assert not [line for line in shown if line.startswith("MA_UNSET")]
    for item in ("", "=v"):
        refused = ma(home, "--json", "exec", "-e", item, "flags", "--", "env")
        assert refused.returncode == 2
        assert json.loads(refused.stdout)["error"]["kind"] == "usage"
    ok(ma(home, "halt", "flags"))
    ok(ma(home, "delete", "flags", "--yes"))
