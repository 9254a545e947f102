"""The seed page's transcript and the lifecycle verbs, on real microVMs.

QEMU boots the real Debian kernel with the real agent (TCG on this host). The workspaces
live in one state directory for the module, which gets the kernel bundle the VM tests
cache; images come from the session's registry.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.state.runtime import same_process_alive
from tests.support.fixtures import MICROAGENT, PushedImage
from tests.vm.cli import events, ma, ok, qemu_pids

pytestmark = pytest.mark.slow



def seed_transcript(home: Path, name: str, image: str) -> None:
    """The seed page, step by step, checking what it shows."""
    created = ok(ma(home, "create", name, "--image", image, "--profile", "medium"))
    assert created.stdout.splitlines() == [
        f"Workspace: {name}", "State: prepared",
        f"Rootfs: {home / 'workspaces' / name / 'rootfs.ext4'}", "Profile: medium",
        "Resources: memory=2048MiB cpus=2 disk=8192MiB"]
    ok(ma(home, "start", name))
    ok(ma(home, "exec", name, "--", "sh", "-c", "echo 'notes from run 1' > /root/notes.txt"))
    assert ok(ma(home, "exec", name, "--", "/bin/cat", "/root/notes.txt")).stdout == \
        "notes from run 1\n"
    row = [line.split() for line in ok(ma(home, "list")).stdout.splitlines()
           if line.startswith(name + " ")]
    assert row == [[name, "running", "qemu", "medium", "user", "never"]]
    assert name in ok(ma(home, "ps")).stdout
    words = ok(ma(home, "status", name)).stdout
    assert "State: running" in words and "PID: " in words
    status = json.loads(ok(ma(home, "--json", "status", name)).stdout)
    for key in ("guestReady", "execReady", "consoleReady", "networkReady"):
        assert status[key]["ok"] is True, (key, status[key])
    assert status["pid"] and status["image_digest"].startswith("sha256:")
    ok(ma(home, "halt", name))
    assert ok(ma(home, "list")).stdout.count("halted") >= 1
    assert qemu_pids(name) == []
    ok(ma(home, "start", name))
    assert ok(ma(home, "exec", name, "--", "/bin/cat", "/root/notes.txt")).stdout == \
        "notes from run 1\n"
    refused = ma(home, "delete", name, "--yes")
    assert refused.returncode == 1 and "halt, stop, or kill it first" in refused.stderr
    ok(ma(home, "halt", name))
    ok(ma(home, "delete", name, "--yes"))
    assert not (home / "workspaces" / name).exists()


def test_seed_transcript_on_debian(home: Path, debian_image: PushedImage) -> None:
    seed_transcript(home, "research", debian_image.ref)


def test_seed_transcript_on_busybox(home: Path, busybox_image: PushedImage) -> None:
    seed_transcript(home, "bb", busybox_image.ref)


@pytest.fixture(scope="module")
def running(home: Path, busybox_image: PushedImage) -> Iterator[str]:
    """One running busybox workspace shared by the tests that do not stop it."""
    ok(ma(home, "create", "shared", "--image", busybox_image.ref, "--profile", "tiny"))
    ok(ma(home, "start", "shared"))
    yield "shared"
    ma(home, "kill", "shared")


def test_exit_codes(home: Path, running: str) -> None:
    assert ma(home, "exec", running, "--", "sh", "-c", "exit 3").returncode == 3
    missing = ma(home, "exec", running, "--", "no-such-command")
    assert missing.returncode == 127 and "no-such-command" in missing.stderr
    assert ma(home, "exec", running, "--", "sh", "-c", "kill -9 $$").returncode == 137
    assert ma(home, "exec", running, "--", "/etc/passwd").returncode == 126
    timed = ma(home, "exec", running, "--timeout", "1", "--", "sleep", "30")
    assert timed.returncode == 124
    captured = ma(home, "--json", "exec", running, "--", "sh", "-c",
                  "echo out; echo err >&2; exit 5")
    assert captured.returncode == 5
    result = json.loads(captured.stdout)
    assert (result["exit_code"], result["stdout"], result["stderr"]) == (5, "out\n", "err\n")


def test_image_env_and_workdir_apply(home: Path, running: str) -> None:
    out = ok(ma(home, "exec", running, "--", "sh", "-c", 'echo "$HOME $PWD"')).stdout
    assert out == "/root /root\n"
    out = ok(ma(home, "exec", "-e", "HOME=/tmp", "-w", "/tmp", running, "--", "sh", "-c",
                'echo "$HOME $PWD"')).stdout
    assert out == "/tmp /tmp\n"


def test_eight_simultaneous_execs(home: Path, running: str) -> None:
    results: dict[int, subprocess.CompletedProcess[str]] = {}

    def one(i: int) -> None:
        results[i] = ma(home, "exec", running, "--", "sh", "-c",
                        f"sleep 1; echo out-{i}; echo err-{i} >&2; exit {i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(8):
        assert (results[i].returncode, results[i].stdout, results[i].stderr) == \
            (i, f"out-{i}\n", f"err-{i}\n")


def test_stdin_and_binary_output(home: Path, running: str) -> None:
    data = bytes(range(256)) * 1000
    result = subprocess.run([MICROAGENT, "--state-dir", str(home), "exec", "-i", running,
                             "--", "cat"], input=data, capture_output=True, timeout=120)
    assert result.returncode == 0 and result.stdout == data


def test_stdin_from_a_regular_file(home: Path, running: str, tmp_path: Path) -> None:
    """A file as stdin (not a pipe): epoll cannot watch it, the exec must still work."""
    source = tmp_path / "input.bin"
    source.write_bytes(bytes(range(256)) * 4000)
    with source.open("rb") as stdin:
        result = subprocess.run([MICROAGENT, "--state-dir", str(home), "exec", "-i", running,
                                 "--", "sh", "-c", "cat > /root/in.bin && md5sum /root/in.bin"],
                                stdin=stdin, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    import hashlib

    assert result.stdout.split()[0].decode() == hashlib.md5(source.read_bytes()).hexdigest()


def test_guest_reaches_a_server_beside_the_host(home: Path, running: str,
                                                tmp_path: Path) -> None:
    """On a non-loopback address of the host (a test network namespace): the host's own
    loopback is out of reach by default (tests/vm/test_network.py)."""
    from tests.support.netns import Netns, NetnsHttpServer

    netns = Netns()
    try:
        server = NetnsHttpServer(netns, tmp_path / "requests.log")
        result = ok(ma(home, "exec", running, "--", "wget", "-q", "-O", "-",
                       f"{server.url}/hello"))
        assert result.stdout == "pong\n" and server.requests() == ["/hello"]
    finally:
        netns.close()


def test_verbs_refuse_a_workspace_that_is_not_running(home: Path,
                                                      busybox_image: PushedImage) -> None:
    ok(ma(home, "create", "idle", "--image", busybox_image.ref, "--profile", "tiny"))
    result = ma(home, "exec", "idle", "--", "true")
    assert result.returncode == 125 and "not running" in result.stderr
    for verb in ("halt", "stop", "kill"):
        result = ma(home, verb, "idle")
        assert result.returncode == 1 and "idle" in result.stderr, (verb, result.stderr)
    assert events(home, "idle")[-1]["state"] == "prepared"
    ok(ma(home, "delete", "idle", "--yes"))


def test_two_starts_at_once_boot_one_vm(home: Path, busybox_image: PushedImage) -> None:
    ok(ma(home, "create", "race", "--image", busybox_image.ref, "--profile", "tiny"))
    args = [MICROAGENT, "--state-dir", str(home), "start", "race"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outcomes = sorted([(first.wait(240), first.communicate()[1]),
                       (second.wait(240), second.communicate()[1])])
    assert outcomes[0][0] == 0
    assert outcomes[1][0] != 0 and "already running" in outcomes[1][1]
    assert len(qemu_pids("race")) == 1
    ok(ma(home, "kill", "race"))
    assert qemu_pids("race") == []
    assert events(home, "race")[-1]["state"] == "stopped"


def test_two_workspaces_at_once_and_kill_then_recover(home: Path,
                                                      busybox_image: PushedImage) -> None:
    for name in ("one", "two"):
        ok(ma(home, "create", name, "--image", busybox_image.ref, "--profile", "tiny"))
        ok(ma(home, "start", name))
    ok(ma(home, "exec", "one", "--", "sh", "-c", "echo unsynced > /root/file"))
    assert ok(ma(home, "exec", "two", "--", "hostname")).stdout == "two\n"
    ok(ma(home, "kill", "one"))
    assert events(home, "one")[-1]["state"] == "stopped"
    assert qemu_pids("one") == [] and len(qemu_pids("two")) == 1
    ok(ma(home, "start", "one"))
    running = [e for e in events(home, "one") if e["state"] == "running"][-1]
    assert "journal was recovered" in running["detail"]
    ok(ma(home, "halt", "one"))
    ok(ma(home, "halt", "two"))


def test_supervisor_killed_leaves_the_vm_which_start_reattaches_and_kill_ends(
        home: Path, busybox_image: PushedImage) -> None:
    """QEMU outlives a SIGKILLed supervisor: status says so and keeps the state; `start`
    re-attaches a supervisor (the guest's /tmp is still there: no reboot; the console log
    goes on, saying what it could not keep); after a second
    SIGKILL, `kill` ends the VM and its RAM file."""
    ok(ma(home, "create", "orphan", "--image", busybox_image.ref, "--profile", "tiny"))
    ok(ma(home, "start", "orphan"))
    ok(ma(home, "exec", "orphan", "--", "sh", "-c", "echo kept > /tmp/mark"))
    status = json.loads(ok(ma(home, "--json", "status", "orphan")).stdout)
    vm = status["pid"]
    console_before = ok(ma(home, "logs", "orphan")).stdout.strip().splitlines()
    os.kill(status["supervisor_pid"], signal.SIGKILL)
    time.sleep(1)
    assert Path(f"/proc/{vm}").exists(), "the VM died with its supervisor"
    after = json.loads(ok(ma(home, "--json", "status", "orphan")).stdout)
    assert after["state"] == "running" and "supervisor is gone" in after["detail"]
    text = ok(ma(home, "status", "orphan")).stdout
    assert "supervisor is gone" in text and "re-attaches" in text, text
    ok(ma(home, "start", "orphan"))
    again = json.loads(ok(ma(home, "--json", "status", "orphan")).stdout)
    assert again["pid"] == vm and again["supervisor_pid"] != status["supervisor_pid"]
    assert events(home, "orphan")[-1]["detail"].startswith("re-attached to its VM")
    assert ok(ma(home, "exec", "orphan", "--", "cat", "/tmp/mark")).stdout == "kept\n"
    console = ok(ma(home, "logs", "orphan")).stdout  # the same boot's log, and the gap said
    assert console_before and console_before[0] in console
    assert f"until now was not kept: its supervisor (pid {status['supervisor_pid']}) was " \
        "gone" in console, console[-500:]

    memory = Path(json.loads((home / "workspaces" / "orphan" / "run" / "status.json")
                             .read_text())["memory_file"])
    os.kill(again["supervisor_pid"], signal.SIGKILL)
    time.sleep(1)
    ok(ma(home, "kill", "orphan"))
    assert not same_process_alive(vm, None)  # gone, or a zombie its new parent reaps
    assert events(home, "orphan")[-1]["state"] == "stopped"
    assert not memory.exists(), "the RAM file outlived its VM"
    ok(ma(home, "start", "orphan"))
    assert ok(ma(home, "top", "orphan")).stdout == "orphan has no background processes.\n"
    ok(ma(home, "halt", "orphan"))


def test_vmm_killed_is_failed_and_restarted_by_policy(home: Path,
                                                      busybox_image: PushedImage) -> None:
    ok(ma(home, "create", "phoenix", "--image", busybox_image.ref, "--profile", "tiny",
          "--restart", "on-failure"))
    ok(ma(home, "start", "phoenix"))
    (vm,) = qemu_pids("phoenix")
    os.kill(vm, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = [e["state"] for e in events(home, "phoenix")]
        if states[-1] == "running" and "failed" in states:
            break
        time.sleep(0.2)
    states = [e["state"] for e in events(home, "phoenix")]
    assert states[-3:] == ["failed", "starting", "running"], states
    restart = [e for e in events(home, "phoenix") if e["state"] == "starting"][-1]
    assert "restart 1" in restart["detail"]
    ok(ma(home, "halt", "phoenix"))
    assert events(home, "phoenix")[-1]["state"] == "halted"


def test_guest_that_is_not_ready_in_time(home: Path, busybox_image: PushedImage) -> None:
    ok(ma(home, "create", "slow", "--image", busybox_image.ref, "--profile", "tiny"))
    result = ma(home, "start", "slow", "--timeout", "1")
    assert result.returncode == 1
    assert "did not become ready within 1s" in result.stderr
    assert "last console lines" in result.stderr
    assert qemu_pids("slow") == []
    assert events(home, "slow")[-1]["state"] == "failed"
    ok(ma(home, "delete", "slow", "--yes"))


def test_start_without_an_obtainable_kernel(tmp_path: Path, busybox_image: PushedImage,
                                            guest_agent: Path) -> None:
    home = tmp_path / "no-kernel"
    ok(ma(home, "create", "k", "--image", busybox_image.ref, "--profile", "tiny"))
    assert list((home / "kernels").iterdir()), "create installs the default kernel"
    shutil.rmtree(home / "kernels")  # and now none can be had
    bin_dir = tmp_path / "bin"  # a PATH with QEMU but no apt-get: no kernel source works
    bin_dir.mkdir()
    for tool in ("qemu-system-x86_64", "passt", "dpkg-deb"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    result = ma(home, "start", "k", env={**os.environ, "PATH": str(bin_dir)})
    assert result.returncode == 1, result.stderr
    assert "kernel" in result.stderr and ("install" in result.stderr or "--from" in
                                          result.stderr)
    assert events(home, "k")[-1]["state"] == "prepared"
    assert qemu_pids("k") == []


def test_stop_records_stopped(home: Path, busybox_image: PushedImage) -> None:
    ok(ma(home, "create", "stopme", "--image", busybox_image.ref, "--profile", "tiny"))
    ok(ma(home, "start", "stopme"))
    ok(ma(home, "exec", "stopme", "--", "sh", "-c", "echo kept > /root/kept"))
    started = time.monotonic()
    ok(ma(home, "stop", "stopme"))
    assert time.monotonic() - started < 10
    last = events(home, "stopme")[-1]
    assert (last["state"], last["detail"]) == ("stopped", "stopped by request")
    assert qemu_pids("stopme") == []
    refused = ma(home, "stop", "stopme")
    assert refused.returncode == 1 and "not running" in refused.stderr
    ok(ma(home, "start", "stopme"))
    assert ok(ma(home, "exec", "stopme", "--", "cat", "/root/kept")).stdout == "kept\n"
    ok(ma(home, "halt", "stopme"))


def test_network_none_has_only_loopback(home: Path, busybox_image: PushedImage,
                                        tmp_path: Path) -> None:
    ok(ma(home, "create", "offline", "--image", busybox_image.ref, "--profile", "tiny",
          "--network", "none"))
    bin_dir = tmp_path / "bin"  # no passt: a workspace without a network does not need it
    bin_dir.mkdir()
    (bin_dir / "qemu-system-x86_64").symlink_to(shutil.which("qemu-system-x86_64") or "qemu")
    ok(ma(home, "start", "offline", env={**os.environ, "PATH": str(bin_dir)}))
    assert ok(ma(home, "exec", "offline", "--", "ls", "/sys/class/net")).stdout.split() == ["lo"]
    status = json.loads(ok(ma(home, "--json", "status", "offline")).stdout)
    assert status["network"] == "none" and status["networkReady"]["ok"] is True
    listed = [line.split() for line in ok(ma(home, "list")).stdout.splitlines()]
    assert ["offline", "running", "qemu", "tiny", "none", "never"] in listed
    ok(ma(home, "halt", "offline"))


def test_stop_of_a_guest_that_does_not_exit_is_failed(home: Path,
                                                      busybox_image: PushedImage) -> None:
    """A frozen VM (QEMU stopped with SIGSTOP) cannot act on stop: after five seconds the
    workspace is failed, its VM is left running (stop never falls back to kill), and kill
    ends it."""
    ok(ma(home, "create", "stuck", "--image", busybox_image.ref, "--profile", "tiny"))
    ok(ma(home, "start", "stuck"))
    (vm,) = qemu_pids("stuck")
    os.kill(vm, signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = ma(home, "stop", "stuck")
        assert result.returncode == 1, result
        assert "did not stop within 5 seconds" in result.stderr
        assert "microagent kill stuck" in result.stderr
        assert 5 <= time.monotonic() - started < 20
        assert qemu_pids("stuck") == [vm], "stop must not kill the VM"
        status = json.loads(ok(ma(home, "--json", "status", "stuck")).stdout)
        assert status["state"] == "failed" and status["pid"] == vm, status
        assert events(home, "stuck")[-1]["state"] == "failed"
        refused = ma(home, "start", "stuck")
        assert refused.returncode != 0
        assert qemu_pids("stuck") == [vm]
        # still frozen: kill must end it (SIGKILL works on a stopped process); resuming
        # it first would let the guest finish the earlier shutdown request on its own
        ok(ma(home, "kill", "stuck"))
    finally:
        if qemu_pids("stuck"):
            os.kill(vm, signal.SIGKILL)
    assert qemu_pids("stuck") == []
    assert events(home, "stuck")[-1]["state"] == "stopped"
    ok(ma(home, "delete", "stuck", "--yes"))


def test_restart_always_reboots_a_guest_that_powered_off(home: Path,
                                                         busybox_image: PushedImage) -> None:
    """`--restart always` also restarts after the guest powers off by itself (init gets
    busybox's poweroff signal), but not after halt."""
    ok(ma(home, "create", "again", "--image", busybox_image.ref, "--profile", "tiny",
          "--restart", "always"))
    ok(ma(home, "start", "again"))
    ok(ma(home, "exec", "again", "--", "sh", "-c", "echo kept > /root/kept"))
    (first,) = qemu_pids("again")
    ma(home, "exec", "again", "--", "sh", "-c", "kill -USR2 1")  # may end with the VM
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = [e["state"] for e in events(home, "again")]
        if "stopped" in states and states[-1] == "running":
            break
        time.sleep(0.2)
    log = events(home, "again")
    assert [e["state"] for e in log][-3:] == ["stopped", "starting", "running"], log
    assert "powered off" in log[-3]["detail"]
    assert "restart 1 (policy always)" in log[-2]["detail"]
    assert qemu_pids("again") not in ([], [first])
    assert ok(ma(home, "exec", "again", "--", "cat", "/root/kept")).stdout == "kept\n"
    ok(ma(home, "halt", "again"))
    time.sleep(3)
    assert events(home, "again")[-1]["state"] == "halted"
    assert qemu_pids("again") == []
    ok(ma(home, "delete", "again", "--yes"))
