"""``create --setup`` and ``run`` on real microVMs (TCG here)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from ocilayout import ImageSpec, Layer, build_layout, busybox_tree, tar_directory

from tests.support.fixtures import MICROAGENT, PushedImage, RunningRegistry
from tests.support.push import push_layout
from tests.vm.cli import events, ma, ok, qemu_pids
from tests.vm.qemu import vm_pids

pytestmark = pytest.mark.slow


def scratch(home: Path) -> list[str]:
    workspaces = home / "workspaces"
    return sorted(p.name for p in workspaces.iterdir()) if workspaces.is_dir() else []


def test_setup_runs_once_before_the_first_start(home: Path,
                                                busybox_image: PushedImage) -> None:
    created = ok(ma(home, "create", "prov", "--image", busybox_image.ref, "--profile", "tiny",
                    "--setup", "echo installing; echo v1 > /root/tool",
                    "--setup", "cat /root/tool >&2"))
    assert created.stdout.splitlines() == [
        "Workspace: prov", "State: prepared",
        f"Rootfs: {home / 'workspaces' / 'prov' / 'rootfs.ext4'}", "Profile: tiny",
        "Resources: memory=256MiB cpus=1 disk=512MiB"]
    assert "[setup 1/2] installing" in created.stderr
    assert "[setup 2/2] v1" in created.stderr
    assert qemu_pids("prov") == []
    states = [e["state"] for e in events(home, "prov")]
    assert states[-2:] == ["halted", "prepared"], states
    ok(ma(home, "start", "prov"))
    assert ok(ma(home, "exec", "prov", "--", "cat", "/root/tool")).stdout == "v1\n"
    status = json.loads(ok(ma(home, "--json", "status", "prov")).stdout)
    assert status["setup"]["pending"] is False and status["setup"]["failure"] is None
    ok(ma(home, "halt", "prov"))
    ok(ma(home, "delete", "prov", "--yes"))


def test_failed_setup_stays_pending_and_start_reruns_it(home: Path,
                                                        busybox_image: PushedImage) -> None:
    # fails the first time, passes the second: its first run leaves a mark on the disk
    command = ("if [ -f /root/tried ]; then echo second-try; else touch /root/tried; "
               "echo first-try; exit 5; fi")
    failed = ma(home, "create", "flaky", "--image", busybox_image.ref, "--profile", "tiny",
                "--setup", command)
    assert failed.returncode == 5, failed
    assert "setup command 1 of 1 failed with exit code 5" in failed.stderr
    assert "[setup 1/1] first-try" in failed.stderr
    assert qemu_pids("flaky") == []
    words = ok(ma(home, "status", "flaky")).stdout
    assert "Setup: pending" in words and "exited 5" in words and "first-try" in words
    started = ok(ma(home, "start", "flaky"))
    assert "[setup 1/1] second-try" in started.stderr
    status = json.loads(ok(ma(home, "--json", "status", "flaky")).stdout)
    assert status["state"] == "running" and status["setup"]["pending"] is False
    ok(ma(home, "halt", "flaky"))
    ok(ma(home, "delete", "flaky", "--yes"))
    assert ma(home, "create", "x", "--image", busybox_image.ref, "--setup", "").returncode == 2
    assert not (home / "workspaces" / "x").exists()


def test_the_seed_setup_installs_a_debian_package(home: Path,
                                                  debian_image: PushedImage) -> None:
    """The seed's example with Debian from the test registry: apt-get reaches Debian's
    mirrors through user networking (package registries are reachable here)."""
    ok(ma(home, "create", "rg", "--image", debian_image.ref, "--profile", "medium",
          "--setup", "apt-get update && apt-get install -y ripgrep", timeout=900))
    ok(ma(home, "start", "rg"))
    assert ok(ma(home, "exec", "rg", "--", "rg", "--version")).stdout.startswith("ripgrep ")
    ok(ma(home, "halt", "rg"))
    ok(ma(home, "delete", "rg", "--yes"))


def test_run_streams_returns_the_code_and_cleans_up(home: Path,
                                                    busybox_image: PushedImage) -> None:
    before = scratch(home)
    result = ma(home, "run", "--profile", "tiny", busybox_image.ref, "sh", "-c",
                "echo out; echo err >&2; exit 4")
    assert result.returncode == 4, result
    assert result.stdout == "out\n" and "err" in result.stderr
    assert scratch(home) == before and run_vms() == []
    document = json.loads(ok(ma(home, "--json", "run", "--profile", "tiny", busybox_image.ref,
                                "--", "echo", "hi")).stdout)
    assert document["stdout"] == "hi\n" and document["exit_code"] == 0
    assert document["name"].startswith("run-") and document["kept"] is False
    assert scratch(home) == before
    # a command that cannot run: 127, and nothing left
    assert ma(home, "run", "--profile", "tiny", busybox_image.ref, "nosuch").returncode == 127
    assert scratch(home) == before


def test_run_uses_the_image_entrypoint_and_cmd(home: Path, registry: RunningRegistry,
                                               tmp_path: Path) -> None:
    """Like docker: Entrypoint + Cmd by default; given arguments replace Cmd only."""
    layout = tmp_path / "echo-image"
    build_layout(layout, [ImageSpec(layers=[Layer(tar_directory(busybox_tree(tmp_path / "t")))],
                                    entrypoint=["/bin/echo", "says:"], cmd=["default"],
                                    env=["PATH=/bin"])])
    push_layout(registry.host, "test/echo", "1", layout)
    ref = f"{registry.host}/test/echo:1"
    assert ok(ma(home, "run", "--profile", "tiny", ref)).stdout == "says: default\n"
    assert ok(ma(home, "run", "--profile", "tiny", ref, "hello")).stdout == "says: hello\n"


def test_run_keep(home: Path, busybox_image: PushedImage) -> None:
    kept = ma(home, "run", "--keep", "--name", "kept", "--profile", "tiny",
              busybox_image.ref, "sh", "-c", "echo data > /root/kept")
    assert kept.returncode == 0, kept
    assert "kept workspace kept (halted)" in kept.stderr
    ok(ma(home, "start", "kept"))
    assert ok(ma(home, "exec", "kept", "--", "cat", "/root/kept")).stdout == "data\n"
    ok(ma(home, "halt", "kept"))
    ok(ma(home, "delete", "kept", "--yes"))


@pytest.mark.parametrize("delay", [0.5, 2.0, 4.0])
def test_run_interrupted_leaves_nothing(home: Path, busybox_image: PushedImage,
                                        delay: float) -> None:
    """Ctrl-C while booting and while the command runs: no workspace, no VM."""
    before = scratch(home)
    proc = subprocess.Popen([MICROAGENT, "--state-dir", str(home), "run", "--profile", "tiny",
                             busybox_image.ref, "sleep", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert scratch(home) == before
    assert run_vms() == []


def run_vms() -> list[int]:
    """QEMU processes of scratch workspaces (``-name microagent-run-...``) of this session."""
    return vm_pids(lambda argv: any(arg.startswith(b"microagent-run-") for arg in argv))
