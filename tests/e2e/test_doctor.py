"""``microagent doctor`` through the installed CLI: a healthy host, then one broken part at
a time (PATH without QEMU, without passt, no agent binary, a state directory that cannot be
written)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.support.fixtures import microagent

NAMES = ["qemu", "passt", "kvm", "e2fsprogs", "agent", "kernel", "state", "loopback",
         "memory"]


def checks(stdout: str) -> dict[str, dict[str, str]]:
    document = json.loads(stdout)
    return {c["name"]: c for c in document["checks"]}


def test_this_host_can_run_workspaces(tmp_path: Path) -> None:
    result = microagent("--state-dir", str(tmp_path / "state"), "--json", "doctor")
    assert result.returncode == 0, result.stdout
    found = checks(result.stdout)
    assert list(found) == NAMES
    assert json.loads(result.stdout)["ok"] is True
    assert found["qemu"]["status"] == "ok" and "QEMU emulator version" in found["qemu"]["detail"]
    assert found["e2fsprogs"]["status"] == "ok" and found["loopback"]["status"] == "ok"
    assert found["passt"]["status"] == "ok" and "/passt" in found["passt"]["detail"]
    assert found["state"]["status"] == "ok" and "writable" in found["state"]["detail"]
    assert found["memory"]["status"] == "ok" and "snapshots" in found["memory"]["detail"]
    # a fresh state directory has no kernel yet: obtainable here (apt), so a warning
    assert found["kernel"]["status"] in ("warn", "fail")
    assert "microagent kernel install" in found["kernel"]["fix"]
    text = microagent("--state-dir", str(tmp_path / "state"), "doctor").stdout
    assert text.splitlines()[-1].startswith("microagent can run workspaces here")
    assert [line.split()[1] for line in text.splitlines() if line[:4] in ("ok  ", "warn", "fail")] \
        == NAMES


def test_no_shm_for_guest_ram_is_a_warning(tmp_path: Path) -> None:
    result = microagent("--state-dir", str(tmp_path), "--json", "doctor",
                        env={"MICROAGENT_SHM_DIR": str(tmp_path / "missing")})
    memory = checks(result.stdout)["memory"]
    assert memory["status"] == "warn" and "cannot be snapshotted" in memory["detail"]
    assert result.returncode == 0, "workspaces still run"


def test_accelerator_choice_is_reported(tmp_path: Path) -> None:
    tcg = checks(microagent("--state-dir", str(tmp_path), "--json", "doctor",
                            env={"MICROAGENT_ACCEL": "tcg"}).stdout)["kvm"]
    assert tcg["status"] == "warn" and "TCG" in tcg["detail"] and tcg["fix"]
    kvm = checks(microagent("--state-dir", str(tmp_path), "--json", "doctor",
                            env={"MICROAGENT_ACCEL": "kvm"}).stdout)["kvm"]
    assert kvm["status"] == "ok"


def test_missing_qemu_fails_and_says_what_to_install(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("mkfs.ext4", "debugfs", "e2fsck", "cc"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    result = microagent("--state-dir", str(tmp_path / "s"), "doctor",
                        env={"PATH": str(bin_dir)})
    assert result.returncode == 1
    assert "fail  qemu" in result.stdout
    assert "apt-get install -y qemu-system-x86" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("microagent cannot run workspaces")


def test_missing_passt_fails_and_says_what_to_install(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("qemu-system-x86_64", "mkfs.ext4", "debugfs", "e2fsck", "cc"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    result = microagent("--state-dir", str(tmp_path / "s"), "--json", "doctor",
                        env={"PATH": str(bin_dir)})
    assert result.returncode == 1
    passt = checks(result.stdout)["passt"]
    assert passt["status"] == "fail" and "--network none" in passt["detail"]
    assert passt["fix"] == "sudo apt-get install -y --no-install-recommends passt"


def test_missing_agent_and_unwritable_state(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = microagent("--state-dir", str(blocker / "state"), "--json", "doctor",
                        env={"MICROAGENT_AGENT": str(tmp_path / "no-agent")})
    assert result.returncode == 1
    found = checks(result.stdout)
    assert found["agent"]["status"] == "fail" and "not built" in found["agent"]["detail"]
    assert "make -C" in found["agent"]["fix"]
    assert found["state"]["status"] == "fail" and "not writable" in found["state"]["detail"]
    assert json.loads(result.stdout)["ok"] is False
    assert os.listdir(tmp_path) == ["a-file"]  # doctor wrote nothing
